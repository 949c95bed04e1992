"""One model, one NPU generation at a time, a bounded FIFO queue in front of it.

A request is shaped once into a :class:`Job` (prompt rendered and counted, parameters mapped to what the ABI
takes), then waits for the NPU in arrival order. The queue's entries belong to their clients: a client that
leaves while queued takes its entry out before it reaches the NPU, and one that leaves mid-run has its run
aborted. Each run happens on a worker thread (:class:`Run`) that owns the NPU slot from the start of the run
until the *native* run has ended, and releases it itself: a cancelled or never-started response can neither
keep the slot nor free it while an orphan run is still on the NPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rkedge.errors import BusyError, ContextLengthExceeded, GenerationError, InputError, RkedgeError
from rkedge.runtime.chat import ChatSession
from rkedge.runtime.llm import LLM, GenerationResult, GenerationStream
from rkedge.runtime.output_parsers import OutputDelta, OutputFormat, ToolCall
from rkedge.runtime.server.constrained import ConstrainedStream
from rkedge.runtime.server.metrics import Metrics
from rkedge.runtime.tokens import TokenCounter

T = TypeVar("T")

#: Service time assumed before the first generation has been measured (for Retry-After only).
FIRST_GUESS_S = 2.0


class QueueFull(BusyError):
    def __init__(self, retry_after: int) -> None:
        super().__init__("the model is busy and its queue is full.",
                         fix=f"retry in about {retry_after} s, or start rkedge serve with a larger --max-queue",
                         code="queue_full")
        self.retry_after = retry_after


class QueueTimeout(BusyError):
    def __init__(self, waited_s: float, retry_after: int) -> None:
        super().__init__(f"waited {waited_s:.0f} s for the NPU.", fix=f"retry in about {retry_after} s")
        self.retry_after = retry_after


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
    repeat_penalty: float | None = None
    ignored: list[str] = field(default_factory=list)  # parameters this ABI cannot apply per request
    # -- chat only -------------------------------------------------------------------------------------------
    tools: list[dict[str, Any]] | None = None  # rendered by the model's template; replies parsed for calls
    parallel_tool_calls: bool = True  # False: only the first call of a reply is kept
    require_tool_call: bool = False  # tool_choice "required" or a named function: constrained where possible
    enable_thinking: bool | None = None  # None: the template's default
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    lora: str | None = None  # a LoRA adapter loaded at startup (``name+adapter``)
    num_ctx: int | None = None  # Ollama's context size: checked against the model's
    grammar: str | None = None  # structured output: the llguidance grammar every token is constrained by
    seed: int | None = None  # the host sampler's seed (constrained output only: the NPU samples otherwise)


@dataclass
class Outcome:
    text: str  # the reply's content (reasoning and tool calls taken out)
    result: GenerationResult | None
    error: RkedgeError | None
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class Job:
    """A request shaped for the NPU: built once by :meth:`Engine.prepare_chat` or :meth:`Engine.prepare_text`."""

    params: Params
    prompt_tokens: int | None
    start: Callable[[], GenerationStream | ConstrainedStream]  # starts the run (on the worker thread)


class NpuQueue:
    """The NPU slot and the FIFO of requests waiting for it. Used from the event loop only."""

    def __init__(self, max_queue: int, timeout_s: float) -> None:
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.busy = False
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def full(self) -> bool:
        return self.busy and len(self._waiting) >= self.max_queue

    async def acquire(self, gone: asyncio.Event) -> float | None:
        """Waits for the slot; returns the seconds waited, or None when ``gone`` was set first (the entry is
        removed, so it never reaches the NPU). Raises :class:`asyncio.TimeoutError` after ``timeout_s``."""
        if not self.busy and not self._waiting:
            self.busy = True
            return 0.0
        started = time.monotonic()
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(granted)
        left = asyncio.ensure_future(gone.wait())
        either: list[asyncio.Future[Any]] = [granted, left]
        try:
            await asyncio.wait(either, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (shutdown, the response torn down)
            left.cancel()
            self._leave(granted)
            raise
        left.cancel()
        if granted.done() and not gone.is_set():
            return time.monotonic() - started
        self._leave(granted)
        if gone.is_set():
            return None
        raise asyncio.TimeoutError

    def _leave(self, granted: asyncio.Future[None]) -> None:
        if granted.done() and not granted.cancelled():
            self.release()  # the slot was handed over just as the client left: pass it on
            return
        granted.cancel()
        with contextlib.suppress(ValueError):
            self._waiting.remove(granted)

    async def hold(self, work: Callable[[], T]) -> T:
        """Runs ``work`` on a worker thread under the slot the caller acquired, and releases the slot when the
        work has ended: a caller cancelled meanwhile (client gone, shutdown) stops waiting, but the slot stays
        taken until the native call returns, so no other run reaches the NPU beside it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def finish(result: Any, error: BaseException | None) -> None:
            self.release()
            if done.cancelled():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        def target() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = work()
            except BaseException as exc:  # handed to the awaiting coroutine
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter shutdown): nobody to tell
                loop.call_soon_threadsafe(finish, result, error)

        # A caller cancelled meanwhile never reads the outcome: read it here, so a late error is not reported as
        # "never retrieved" (the caller who stayed still gets it through the shield).
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        threading.Thread(target=target, name="rkedge-serve-npu-call", daemon=True).start()
        return await asyncio.shield(done)

    def release(self) -> None:
        while self._waiting:
            granted = self._waiting.popleft()
            if not granted.done():
                granted.set_result(None)
                return
        self.busy = False


class Run:
    """One generation on a worker thread, holding the NPU slot until the native run has ended."""

    def __init__(self, engine: Engine, job: Job, waited_s: float) -> None:
        self._engine = engine
        self._job = job
        self.waited_s = waited_s
        self._loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[OutputDelta | None] = asyncio.Queue()
        self._abort = threading.Event()
        self._stream: GenerationStream | ConstrainedStream | None = None
        self._started = time.monotonic()
        self.ended = asyncio.Event()
        self.outcome: Outcome | None = None
        threading.Thread(target=self._work, name="rkedge-serve-generation", daemon=True).start()

    def abort(self) -> None:
        """Stops the run if it has not ended (safe to call any number of times, from the event loop)."""
        if self.ended.is_set():
            return  # the slot may already serve another run: llm.abort() would hit that one
        self._abort.set()
        if self._stream is not None:
            self._engine.llm.abort()
            if isinstance(self._stream, ConstrainedStream):
                self._stream.abort()  # it stops between tokens

    async def deltas(self) -> AsyncIterator[OutputDelta]:
        """The reply parsed as it comes: content, reasoning and (each once complete) tool calls."""
        while (delta := await self._chunks.get()) is not None:
            yield delta

    async def chunks(self) -> AsyncIterator[str]:
        """The reply's content text only."""
        async for delta in self.deltas():
            if delta.kind == "content" and delta.text:
                yield delta.text

    async def wait(self) -> Outcome:
        await self.ended.wait()
        assert self.outcome is not None
        return self.outcome

    def _work(self) -> None:
        stream: GenerationStream | ConstrainedStream | None = None
        error: RkedgeError | None = None
        try:
            if self._abort.is_set():
                return  # the client left between being granted the slot and the start
            stream = self._job.start()
            self._stream = stream
            calls = 0
            for delta in stream.deltas():
                if self._abort.is_set():
                    # The runtime resets its abort flag when a run begins, so an abort sent just before
                    # rkllm_run started is lost: send it again at each token until the run ends.
                    self._engine.llm.abort()
                    continue
                if delta.kind == "tool_call":
                    calls += 1
                    if calls > 1 and not self._job.params.parallel_tool_calls:
                        continue
                self._deliver(self._chunks.put_nowait, delta)
        except RkedgeError as exc:
            error = exc
        except Exception as exc:  # reported to the client as a server error
            error = GenerationError(f"generation failed: {exc}")
        finally:
            result = None
            if stream is not None:
                stream.close()  # returns at once when the run ended; else aborts and waits for the native run
                result = stream.result
            self._deliver(self._ended, result, error)

    def _deliver(self, callback: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter shutdown): nobody to tell
            self._loop.call_soon_threadsafe(callback, *args)

    def _ended(self, result: GenerationResult | None, error: RkedgeError | None) -> None:
        self.outcome = self._engine.outcome(result, error, self._job, aborted=self._abort.is_set())
        self.ended.set()
        self._chunks.put_nowait(None)
        self._engine.finished(self, time.monotonic() - self._started)


class Engine:
    def __init__(self, llm: LLM, *, max_queue: int, queue_timeout_s: float, counter: TokenCounter | None,
                 metrics: Metrics | None = None, queue: NpuQueue | None = None) -> None:
        self.llm = llm
        self.session = ChatSession(llm)  # shares the KV cache across requests whose history matches
        # Several models share one NPU: their engines share one queue, so a request waits behind any run.
        self.queue = queue or NpuQueue(max_queue, queue_timeout_s)
        self.counter = counter
        self.metrics = metrics or Metrics()
        self.metrics.watch_queue(lambda: self.queue.waiting, lambda: int(self.queue.busy))
        self._service_s: deque[float] = deque(maxlen=32)
        self._runs: set[Run] = set()
        self.adapters: set[str] = set()  # LoRA adapters loaded into this model (--lora)
        self._tokenizer: Any = None  # llguidance's tokenizer, made at the first constrained request

    @property
    def max_queue(self) -> int:
        return self.queue.max_queue

    @property
    def waiting(self) -> int:
        return self.queue.waiting

    @property
    def running(self) -> int:
        return int(self.queue.busy)

    # -- queue --------------------------------------------------------------------------------------------

    def retry_after(self) -> int:
        """Seconds until a queue place is likely to free: one typical generation (measured, median of the
        recent ones), since the head of the queue moves on when the running generation ends."""
        typical = statistics.median(self._service_s) if self._service_s else FIRST_GUESS_S
        return max(1, math.ceil(typical))

    def admit(self) -> None:
        """Raises :class:`QueueFull` (429) up front, before any response starts."""
        if self.queue.full():
            raise QueueFull(self.retry_after())

    async def start(self, job: Job, gone: asyncio.Event) -> Run | None:
        """Waits for the NPU and starts ``job``; None when the client left while queued."""
        try:
            waited = await self.queue.acquire(gone)
        except asyncio.TimeoutError:
            raise QueueTimeout(self.queue.timeout_s, self.retry_after()) from None
        if waited is None:
            return None
        self.metrics.queue_wait.observe(waited)
        run = Run(self, job, waited)
        self._runs.add(run)
        return run

    def finished(self, run: Run, service_s: float) -> None:
        """Called on the event loop once ``run``'s native run has ended: the slot goes to the next in line."""
        self._service_s.append(service_s)
        self._runs.discard(run)
        self.queue.release()

    def abort_all(self) -> None:
        """Aborts the running generation (shutdown after the grace period)."""
        for run in list(self._runs):
            run.abort()

    # -- request shaping ----------------------------------------------------------------------------------

    def prepare_chat(self, messages: list[dict[str, Any]], params: Params) -> Job:
        # Images become placeholders in their message's text (refused for a model without vision), as the session
        # renders them; the session takes these messages as they are.
        messages = self.session.with_placeholders(messages)
        images = sum(len(m.get("images") or ()) for m in messages)
        # Rendered once: counted here, and handed to the session, which would otherwise render it again.
        rendered = self.render(messages, params)
        last = messages[-1].get("content")
        prompt_tokens = self._check_context(rendered if rendered is not None else last if isinstance(last, str)
                                            else "", params, self._image_positions(images))
        if images and (params.grammar is not None or (params.require_tool_call and params.tools)):
            raise InputError("structured output (response_format, format, a required tool call) with images is not "
                             "supported: the host sampler takes text prompts only.",
                             fix="send the images without response_format / tool_choice, or text only")
        if params.grammar is not None:
            return self._constrained(rendered, last, params, prompt_tokens)
        if params.require_tool_call and params.tools and params.lora is None:
            constrained = self._constrained_tool_call(rendered, params, prompt_tokens)
            if constrained is not None:
                return constrained
        kwargs, hook = self._runtime_kwargs(params)
        self._check_lora(params)

        def start() -> GenerationStream:
            stream = self.session.respond(messages, stop=params.stop, on_token=hook, rendered=rendered,
                                          tools=params.tools, enable_thinking=params.enable_thinking,
                                          template_kwargs=params.template_kwargs or None, lora=params.lora, **kwargs)
            assert isinstance(stream, GenerationStream)
            return stream

        return Job(params, prompt_tokens, start)

    def render(self, messages: list[dict[str, Any]], params: Params) -> str | None:
        """The conversation as the model's template renders it (None: the runtime renders)."""
        from rkedge.runtime.chat_template import JinjaChatTemplate

        template = self.llm.template
        if template is None:
            return None
        if isinstance(template, JinjaChatTemplate):
            keywords = dict(params.template_kwargs)
            if params.enable_thinking is not None:
                keywords["enable_thinking"] = params.enable_thinking
            return template.render(messages, True, tools=params.tools, **keywords)
        if params.tools:
            raise InputError(f"this model's chat template is rkedge's hand-written {template.family} family, "
                             "which has no tool calling; the tools would be lost.",
                             fix="reconvert the model so its manifest carries its Hugging Face chat template, or "
                                 "start rkedge serve with --template FILE.jinja")
        return template.render(messages, True)

    def _constrained_tool_call(self, rendered: str | None, params: Params, prompt_tokens: int | None) -> Job | None:
        """The forced tool call constrained to the tools' schemas (Hermes/Qwen syntax, a template rkedge renders,
        an ABI with logits mode and a host tokenizer); None where one of those is missing: the call is then
        asked for (only the named tool offered) but not enforced."""
        from rkedge.runtime.server.constrained import check_abi, host_tokenizer, tool_call_grammar

        output = self.llm.output_format(tools=True, prompt=rendered or "")
        if rendered is None or output.tool_family != "hermes" or output.starts_in_reasoning:
            return None
        try:
            check_abi(self.llm)
            if self._tokenizer is None:
                self._tokenizer = host_tokenizer(self.llm)
            grammar = tool_call_grammar(params.tools or [])
        except InputError:
            return None
        return self._constrained(rendered, rendered, params, prompt_tokens, grammar=grammar, output=output)

    def _constrained(self, rendered: str | None, last: Any, params: Params, prompt_tokens: int | None, *,
                     grammar: str | None = None, output: OutputFormat | None = None) -> Job:
        """A job whose every token is masked by a grammar on the host (``params.grammar`` unless given; see
        constrained.py)."""
        from rkedge.runtime.server.constrained import Sampler, check_abi, host_tokenizer

        llm = self.llm
        check_abi(llm)
        if params.tools and grammar is None:
            raise InputError("response_format and tools together are not supported: send one or the other.")
        if params.lora is not None:
            raise InputError("constrained output with a LoRA adapter is not supported (logits runs take none).")
        if self._tokenizer is None:
            self._tokenizer = host_tokenizer(llm)
        tokenizer, grammar = self._tokenizer, grammar or params.grammar
        assert grammar is not None
        prompt = rendered if rendered is not None else str(last or "")
        budget = params.max_tokens or llm.max_new_tokens
        sampler = Sampler(params.temperature, params.top_k, params.top_p, params.seed)

        def start() -> ConstrainedStream:
            return ConstrainedStream(llm, prompt, grammar, tokenizer, max_tokens=budget, sampler=sampler,
                                     output=output)

        return Job(params, prompt_tokens, start)

    def _check_lora(self, params: Params) -> None:
        if params.lora is not None and params.lora not in self.adapters:
            raise InputError(f"no LoRA adapter {params.lora!r} is loaded for this model.",
                             fix="start rkedge serve with --lora for it; /v1/models lists the name+adapter ids")

    def prepare_text(self, prompt: str, params: Params, images: list[bytes] | None = None) -> Job:
        """A raw prompt (``images``: for a vision model, at the placeholders in ``prompt``, else in front)."""
        if images:
            if self.llm.vision is None:
                self.llm.encode_images([])  # raises: this model has no vision encoder (400)
            if params.grammar is not None:
                raise InputError("structured output with images is not supported: the host sampler takes text "
                                 "prompts only.", fix="send the images without format, or text only")
        prompt_tokens = self._check_context(prompt, params, self._image_positions(len(images or ())))
        if params.grammar is not None:
            return self._constrained(prompt, prompt, params, prompt_tokens)
        kwargs, hook = self._runtime_kwargs(params)
        self._check_lora(params)
        if params.lora is not None:
            kwargs["lora"] = params.lora
        if images:
            kwargs["images"] = list(images)

        def start() -> GenerationStream:
            stream = self.llm.generate(prompt, stop=params.stop, on_token=hook, **kwargs)
            assert isinstance(stream, GenerationStream)
            return stream

        return Job(params, prompt_tokens, start)

    def _runtime_kwargs(self, params: Params) -> tuple[dict[str, Any], Callable[[str], bool] | None]:
        """What the ABI can take per run, and a token hook that enforces max_tokens where it cannot."""
        kwargs: dict[str, Any] = {}
        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "frequency_penalty": params.frequency_penalty, "presence_penalty": params.presence_penalty,
                    "repeat_penalty": params.repeat_penalty}
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

    def _image_positions(self, images: int) -> int:
        """The context positions ``images`` images take beyond their placeholders (each one's image rows)."""
        vision = self.llm.vision
        return images * vision.image_tokens if vision is not None else 0

    def _check_context(self, prompt_text: str, params: Params, extra_tokens: int = 0) -> int | None:
        """The prompt's token count when it can be known; 400 context_length_exceeded when it cannot fit.
        ``extra_tokens``: positions the text does not show (image rows)."""
        limit = self.llm.max_context_len
        if params.num_ctx is not None and params.num_ctx > 0:
            if params.num_ctx > limit:
                raise InputError(f"num_ctx {params.num_ctx} is larger than the {limit}-token context this model "
                                 "was loaded with.",
                                 fix=f"send num_ctx <= {limit}, or restart rkedge serve with --max-context "
                                     f"{params.num_ctx} (up to the model's max_context_limit)", code="num_ctx")
            limit = params.num_ctx
        if self.counter is None:
            return None
        tokens = self.counter(prompt_text) + extra_tokens
        if tokens + 1 > limit:
            raise ContextLengthExceeded(
                f"this conversation is {tokens} tokens; the model's context is {limit} tokens "
                f"(counted with the {self.counter.source}).",
                fix="shorten the conversation, or start rkedge serve with a larger --max-context (up to the "
                    "model's max_context_limit)")
        if params.max_tokens and tokens + params.max_tokens > limit:
            params.max_tokens = max(1, limit - tokens)
        return tokens

    # -- outcome ------------------------------------------------------------------------------------------

    def outcome(self, result: GenerationResult | None, error: RkedgeError | None, job: Job, *,
                aborted: bool = False) -> Outcome:
        params, prompt_tokens = job.params, job.prompt_tokens
        if result is None:
            if error is None and aborted:
                return Outcome("", None, None, "abort", prompt_tokens, 0)
            return Outcome("", None, error or GenerationError("generation did not start"), "error", prompt_tokens, 0)
        stats = result.stats
        reason = result.finish_reason
        if reason == "stop" and params.max_tokens and stats.completion_tokens >= params.max_tokens and not \
                self.llm.features.has_sampling_params:
            reason = "length"  # stopped by the emulated max_tokens
        prompt = stats.prompt_tokens if stats.prompt_tokens is not None else prompt_tokens
        self.metrics.generation(stats.ttft_ms / 1000 if stats.ttft_ms is not None else None, stats.tokens_per_s,
                                prompt, stats.completion_tokens)
        if error is None and reason == "error":
            error = GenerationError(f"generation failed: {result.error or 'the runtime reported an error'}.")
        calls = result.tool_calls if params.parallel_tool_calls else result.tool_calls[:1]
        return Outcome(result.content, result, error, "error" if error else reason, prompt, stats.completion_tokens,
                       result.reasoning, list(calls))


# -- embeddings ------------------------------------------------------------------------------------------------

Pooling = str  # "last" (the final position: Qwen3-Embedding-style models) or "mean" (every position)


def pooling_for(metadata: dict[str, Any]) -> Pooling:
    """The model's pooling: its manifest's ``embedding_pooling`` when recorded; else last-token for models
    trained that way (Qwen3-Embedding: its model card pools the last token), mean otherwise."""
    recorded = metadata.get("embedding_pooling")
    if recorded in ("last", "mean"):
        return str(recorded)
    name = f"{metadata.get('name') or ''} {metadata.get('architecture') or ''}".lower()
    return "last" if "qwen3" in name and "embed" in name else "mean"


def is_embedding_model(metadata: dict[str, Any]) -> bool:
    """The manifest says it is meant for embeddings (``embedding_model``), or its name does (``...-Embedding``)."""
    if isinstance(metadata.get("embedding_model"), bool):
        return bool(metadata["embedding_model"])
    return "embed" in str(metadata.get("name") or "").lower()


def pool_rows(values: Any, rows: int, width: int, pooling: Pooling) -> list[float]:
    """One normalised vector from ``rows x width`` hidden states."""
    if rows <= 0 or width <= 0:
        raise GenerationError("the runtime gave no hidden states for this input.")
    if pooling == "last" or rows == 1:
        vector = [float(v) for v in values[(rows - 1) * width:rows * width]]
    else:
        vector = [0.0] * width
        for row in range(rows):
            base = row * width
            for i in range(width):
                vector[i] += values[base + i]
        vector = [v / rows for v in vector]
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm > 0 else vector


@dataclass
class Embedded:
    vectors: list[list[float]]
    prompt_tokens: int


def _embed_all(engine: Engine, inputs: list[str | list[int]], pooling: Pooling) -> Embedded:
    vectors: list[list[float]] = []
    tokens = 0
    for item in inputs:
        if isinstance(item, str):
            result = engine.llm.generate(item, mode="hidden", stream=False)
        else:
            result = engine.llm.generate(token_ids=item, mode="hidden", stream=False)
        if result.finish_reason == "error":
            raise GenerationError(f"embedding failed: {result.error or 'the runtime reported an error'}.")
        # UNKNOWN for librkllmrt whether every position or only the last comes back (SEMANTICS.md gives
        # num_tokens x embd_size): with one row, mean and last pooling are the same vector.
        vectors.append(pool_rows(result.values, result.num_tokens, result.width, pooling))
        tokens += result.stats.prompt_tokens or result.num_tokens
    return Embedded(vectors, tokens)


async def embed(engine: Engine, inputs: list[str | list[int]], pooling: Pooling) -> Embedded:
    """Runs each input in the runtime's last-hidden-layer mode, behind the queue like a generation."""
    for item in inputs:
        if isinstance(item, str):
            engine._check_context(item, Params())
    engine.admit()
    try:
        waited = await engine.queue.acquire(asyncio.Event())
    except asyncio.TimeoutError:
        raise QueueTimeout(engine.queue.timeout_s, engine.retry_after()) from None
    assert waited is not None
    # Released when the native calls have ended, not when this coroutine is cancelled (see NpuQueue.hold).
    return await engine.queue.hold(lambda: _embed_all(engine, inputs, pooling))
