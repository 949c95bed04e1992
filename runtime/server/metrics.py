"""Prometheus text exposition (a few counters, gauges and histograms; no client library needed)."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 1000, 10000)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.total:.6f}",
                  f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram("rkedge_time_to_first_token_seconds", "Time to first token per generation.",
                              LATENCY_BUCKETS)
        self.queue_wait = Histogram("rkedge_queue_wait_seconds", "Time a request waited for the NPU.", LATENCY_BUCKETS)
        self.tokens_per_s = Histogram("rkedge_decode_tokens_per_second", "Decode speed per generation.", RATE_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def generation(self, ttft_s: float | None, tokens_per_s: float | None, prompt: int | None, completion: int) -> None:
        with self._lock:
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if tokens_per_s is not None:
                self.tokens_per_s.observe(tokens_per_s)
            self.prompt_tokens += prompt or 0
            self.completion_tokens += completion

    def render(self, queue_depth: int, running: int) -> str:
        with self._lock:
            lines = ["# HELP rkedge_requests_total Requests by endpoint and HTTP status.",
                     "# TYPE rkedge_requests_total counter"]
            lines += [f'rkedge_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP rkedge_queue_depth Requests waiting for the NPU.", "# TYPE rkedge_queue_depth gauge",
                      f"rkedge_queue_depth {queue_depth}",
                      "# HELP rkedge_generations_running Generations running on the NPU (0 or 1).",
                      "# TYPE rkedge_generations_running gauge", f"rkedge_generations_running {running}",
                      "# HELP rkedge_prompt_tokens_total Prompt tokens (runtime perf stats or tokenizer).",
                      "# TYPE rkedge_prompt_tokens_total counter", f"rkedge_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP rkedge_completion_tokens_total Generated tokens (one per runtime callback).",
                      "# TYPE rkedge_completion_tokens_total counter",
                      f"rkedge_completion_tokens_total {self.completion_tokens}"]
            lines += self.ttft.render() + self.queue_wait.render() + self.tokens_per_s.render()
        return "\n".join(lines) + "\n"
