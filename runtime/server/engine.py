"""One model, one NPU generation at a time, a bounded FIFO queue in front of it.

Requests wait in arrival order (``asyncio.Lock`` wakes waiters first-in first-out); when ``max_queue`` are
already waiting, the next gets 429 with ``Retry-After``. A generation runs on a worker thread and its chunks
cross into the event loop through an ``asyncio.Queue``; when the client goes away the generation is aborted
on the NPU (the runtime stops within one token) and the next request is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from rkedge.errors import BusyError, ContextLengthExceeded, RkedgeError
from rkedge.runtime.chat import ChatSession
from rkedge.runtime.llm import LLM, GenerationResult, GenerationStream
from rkedge.runtime.server.metrics import Metrics
from rkedge.runtime.tokens import TokenCounter


class QueueFull(BusyError):
    def __init__(self, retry_after: int) -> None:
        super().__init__("the model is busy and its queue is full.",
                         fix=f"retry in about {retry_after} s, or start rkedge serve with a larger --max-queue")
        self.retry_after = retry_after


class QueueTimeout(BusyError):
    pass


@dataclass
class Params:
    """Per-request generation parameters, as the client sent them."""

    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignored: list[str] = field(default_factory=list)  # parameters this ABI cannot apply per request


@dataclass
class Outcome:
    text: str
    result: GenerationResult | None
    error: RkedgeError | None
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int


class Engine:
    def __init__(self, llm: LLM, *, max_queue: int, queue_timeout_s: float, counter: TokenCounter | None,
                 metrics: Metrics | None = None) -> None:
        self.llm = llm
        self.session = ChatSession(llm)  # shares the KV cache across requests whose history matches
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.counter = counter
        self.metrics = metrics or Metrics()
        self.waiting = 0
        self.running = 0
        self._lock: asyncio.Lock | None = None
        self._recent_seconds: list[float] = []

    # -- queue --------------------------------------------------------------------------------------------

    def retry_after(self) -> int:
        typical = sorted(self._recent_seconds)[len(self._recent_seconds) // 2] if self._recent_seconds else 5.0
        return max(1, int(typical * (self.waiting + 1) + 0.999))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Waits for the NPU in FIFO order; yields how long the request waited."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        lock = self._lock
        if lock.locked() and self.waiting >= self.max_queue:
            raise QueueFull(self.retry_after())
        started = time.monotonic()
        self.waiting += 1
        try:
            await asyncio.wait_for(lock.acquire(), timeout=self.queue_timeout_s)
        except asyncio.TimeoutError:
            raise QueueTimeout(f"waited {self.queue_timeout_s:.0f} s for the NPU.", fix="retry later") from None
        finally:
            self.waiting -= 1
        waited = time.monotonic() - started
        self.metrics.queue_wait.observe(waited)
        self.running = 1
        try:
            yield waited
        finally:
            self.running = 0
            self._recent_seconds = (self._recent_seconds + [time.monotonic() - started - waited])[-20:]
            lock.release()

    # -- request shaping ----------------------------------------------------------------------------------

    def runtime_kwargs(self, params: Params) -> tuple[dict[str, Any], Callable[[str], Any] | None]:
        """What the ABI can take per run, and a token hook that enforces max_tokens where it cannot."""
        kwargs: dict[str, Any] = {}
        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "frequency_penalty": params.frequency_penalty, "presence_penalty": params.presence_penalty}
        if self.llm.features.has_sampling_params:
            kwargs.update({k: v for k, v in sampling.items() if v is not None})
            if params.max_tokens:
                kwargs["max_new_tokens"] = params.max_tokens
            return kwargs, None
        params.ignored += [k for k, v in sampling.items() if v is not None]
        if not params.max_tokens:
            return kwargs, None
        limit = params.max_tokens
        count = [0]

        def stop_at_limit(_text: str) -> bool:  # max_tokens for ABIs without per-run max_new_tokens
            count[0] += 1
            return count[0] >= limit

        return kwargs, stop_at_limit

    def check_context(self, prompt_text: str, params: Params) -> int | None:
        """The prompt's token count when it can be known; 400 context_length_exceeded when it cannot fit."""
        if self.counter is None:
            return None
        tokens = self.counter(prompt_text)
        limit = self.llm.max_context_len
        if tokens + 1 > limit:
            raise ContextLengthExceeded(
                f"this conversation is {tokens} tokens; the model's context is {limit} tokens "
                f"(counted with the {self.counter.source}).",
                fix="shorten the conversation, or start rkedge serve with a larger --max-context (up to the "
                    "model's max_context_limit)")
        if params.max_tokens and tokens + params.max_tokens > limit:
            params.max_tokens = max(1, limit - tokens)
        return tokens

    def chat_prompt_text(self, messages: list[dict[str, str]]) -> str:
        template = self.llm.template
        return template.render(messages, True) if template is not None else messages[-1]["content"]

    # -- generation ---------------------------------------------------------------------------------------

    async def generate(self, start: Callable[[], GenerationStream], params: Params,
                       prompt_tokens: int | None) -> AsyncIterator[str | Outcome]:
        """Yields text chunks, then one :class:`Outcome`. Closing the iterator early aborts the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        box: dict[str, Any] = {}
        done = threading.Event()

        def worker() -> None:
            stream = None
            try:
                stream = start()
                box["stream"] = stream
                for chunk in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except RkedgeError as exc:
                box["error"] = exc
            except Exception as exc:  # noqa: BLE001 - reported to the client as a server error
                box["error"] = RkedgeError(f"generation failed: {exc}")
            finally:
                box["result"] = stream.result if stream is not None else None
                done.set()
                loop.call_soon_threadsafe(queue.put_nowait, None)

        thread = threading.Thread(target=worker, name="rkedge-serve-generation", daemon=True)
        thread.start()
        completed = False
        try:
            while True:
                chunk = await queue.get()
                if chunk is None:
                    break
                yield chunk
            completed = True
        finally:
            if not completed:  # the client went away: stop the NPU now, then wait for the run to end
                stream = box.get("stream")
                if stream is not None:
                    stream.abort()
                else:
                    self.llm.abort()
                await asyncio.get_running_loop().run_in_executor(None, done.wait)
        result: GenerationResult | None = box.get("result")
        error: RkedgeError | None = box.get("error")
        yield self._outcome(result, error, params, prompt_tokens)

    def _outcome(self, result: GenerationResult | None, error: RkedgeError | None, params: Params,
                 prompt_tokens: int | None) -> Outcome:
        if result is None:
            return Outcome("", None, error or RkedgeError("generation did not start"), "error", prompt_tokens, 0)
        stats = result.stats
        reason = result.finish_reason
        if reason == "stop" and params.max_tokens and stats.completion_tokens >= params.max_tokens and not \
                self.llm.features.has_sampling_params:
            reason = "length"  # stopped by the emulated max_tokens
        prompt = stats.prompt_tokens if stats.prompt_tokens is not None else prompt_tokens
        self.metrics.generation(stats.ttft_ms / 1000 if stats.ttft_ms is not None else None, stats.tokens_per_s,
                                prompt, stats.completion_tokens)
        return Outcome(result.text, result, error, "error" if error else reason, prompt, stats.completion_tokens)
