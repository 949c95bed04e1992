"""Prometheus metrics of one server, in a private registry (two apps in one process do not mix figures).

Label sets are bounded: ``endpoint`` is a route template or ``UNMATCHED`` (never a raw path), ``status`` an
HTTP status the server sent.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 1000, 10000)
#: The one label for every path that matches no route (404s, scans).
UNMATCHED = "unmatched"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("rkedge_requests", "Requests by route template and HTTP status.",
                                ("endpoint", "status"), registry=self.registry)
        self.prompt_tokens = Counter("rkedge_prompt_tokens", "Prompt tokens (runtime perf stats or tokenizer).",
                                     registry=self.registry)
        self.completion_tokens = Counter("rkedge_completion_tokens", "Generated tokens (one per runtime callback).",
                                         registry=self.registry)
        self.ttft = Histogram("rkedge_time_to_first_token_seconds", "Time to first token per generation.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("rkedge_queue_wait_seconds", "Time a request waited for the NPU.",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens_per_s = Histogram("rkedge_decode_tokens_per_second", "Decode speed per generation.",
                                      buckets=RATE_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("rkedge_queue_depth", "Requests waiting for the NPU.", registry=self.registry)
        self.running = Gauge("rkedge_generations_running", "Generations running on the NPU (0 or 1).",
                             registry=self.registry)

    def watch_queue(self, depth: Callable[[], float], running: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)
        self.running.set_function(running)

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def generation(self, ttft_s: float | None, tokens_per_s: float | None, prompt: int | None, completion: int) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tokens_per_s is not None:
            self.tokens_per_s.observe(tokens_per_s)
        self.prompt_tokens.inc(prompt or 0)
        self.completion_tokens.inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
