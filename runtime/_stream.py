"""One generation as it arrives: stop strings, incremental UTF-8, finish reasons and figures, parsed output.

The backend's callbacks (on the runtime's thread) land in a :class:`RunState`'s queue; the caller's thread
iterates a :class:`GenerationStream`, which turns those events into text and, at the end, a
:class:`GenerationResult`. The stream knows its :class:`~rkedge.runtime.llm.LLM` only through
:class:`StreamOwner`: how to abort, whether the run's thread is alive, and whom to tell when the run is over.
"""

from __future__ import annotations

import codecs
import queue
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rkedge.errors import GenerationError, InputError
from rkedge.runtime.output_parsers import OutputDelta, OutputFormat, OutputParser, ToolCall, parse_output
from rkedge.runtime.types import CallState, PerfStats, RunEvent

#: Token callback for :meth:`LLM.generate`: called on the runtime's thread with each token's text; return
#: True to stop the generation.
TokenHook = Callable[[str], Any]


@dataclass
class GenerationStats:
    """Figures of one generation. From ABI 1.2.1 token counts and times come from the runtime's perf stats."""

    prompt_tokens: int | None
    completion_tokens: int
    ttft_ms: float | None
    prefill_ms: float | None
    decode_ms: float | None
    tokens_per_s: float | None
    memory_mb: float | None
    source: str  # "runtime" (RKLLMPerfStat) or "measured" (counted callbacks, ABI < 1.2.1)


@dataclass
class GenerationResult:
    """``text`` is what the model wrote; ``content``/``reasoning``/``tool_calls`` are it parsed (for a run given
    an :class:`~rkedge.runtime.output_parsers.OutputFormat`; otherwise ``content`` is ``text``)."""

    text: str
    finish_reason: str  # stop | length | abort | error | pause | tool_calls
    stats: GenerationStats
    values: array[float] | None = None  # logits or hidden states: every row the runtime gave (num_tokens x width)
    num_tokens: int = 0
    width: int = 0
    error: str | None = None
    content: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


class ByteJoiner:
    """Text of NORMAL and WAITING callbacks into characters, never losing or repeating a byte.

    A token that ends inside a multi-byte character is reported as WAITING (SEMANTICS.md: "wait for the next
    call and join"). What WAITING and the following callback carry is not documented (UNKNOWN), and the field
    relies on three answers: the partial bytes then only the rest ("pieces"), the partial bytes then the whole
    character again ("overlap"), or nothing then the whole character ("whole"). UTF-8 tells them apart: held
    bytes are an unfinished character, so a piece that starts with a continuation byte continues them, and a
    piece that starts with the held bytes themselves repeats them. Anything else means the held bytes were a
    character the runtime never finished: they are decoded (as U+FFFD), not dropped.
    """

    def __init__(self) -> None:
        self._held = b""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, state: int, text: bytes | None) -> str:
        piece = text or b""
        if self._held:
            if piece[:1] and 0x80 <= piece[0] <= 0xBF:
                piece = self._held + piece  # pieces: the rest of the character
            elif not piece.startswith(self._held):
                piece = self._held + piece  # the held character was never finished: decoded as it is
            # else overlap: the piece repeats the held bytes and goes on
            self._held = b""
        if state == CallState.WAITING:
            self._held = piece
            return ""
        return self._decoder.decode(piece)

    def finish(self) -> str:
        held, self._held = self._held, b""
        return self._decoder.decode(held, final=True)


class RunEnd:
    """The backend's ``run`` returned (``rc``) or raised (``exc``): nothing more will arrive."""

    __slots__ = ("rc", "exc")

    def __init__(self, rc: int, exc: BaseException | None = None) -> None:
        self.rc, self.exc = rc, exc


class HookFailure:
    """The token hook raised; the run is aborted and the stream re-raises it after the text."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


#: Queued when the token hook returns True: stop like a stop sequence.
STOP_SIGNAL = object()


@dataclass
class RunState:
    """One run, shared by the runtime's thread (callbacks) and the caller's (the stream)."""

    run_id: int
    max_new_tokens: int
    on_token: TokenHook | None
    events: queue.SimpleQueue[object] = field(default_factory=queue.SimpleQueue)
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    pause_requested: bool = False
    paused: bool = False  # the runtime was told to pause (callback return 1): the run ends as "pause"
    hook_failed: bool = False
    kv_owner: object | None = None  # who owns the KV cache after this run (keep_history runs)
    aborted: bool = False  # abort() was called for this run (from any thread)
    hook_joiner: ByteJoiner = field(default_factory=ByteJoiner)  # the token hook's own (runtime thread)
    ended: threading.Event = field(default_factory=threading.Event)  # the backend's run() returned

    def on_event(self, event: RunEvent) -> int:
        """Runs on the runtime's thread for every callback of this run; returns the callback's int."""
        state = event.state
        if state == CallState.NORMAL or state == CallState.WAITING:
            now = time.perf_counter()
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
            self.tokens += 1
            if self.on_token is not None and not self.hook_failed:
                try:
                    text = self.hook_joiner.feed(state, event.text)
                    if text and self.on_token(text) is True:
                        self.events.put(event)
                        self.events.put(STOP_SIGNAL)
                        return 0
                except BaseException as exc:  # handed to the caller's thread
                    self.hook_failed = True
                    self.events.put(event)
                    self.events.put(HookFailure(exc))
                    return 0
            self.events.put(event)
            return self._pause_reply()
        if state == CallState.HIDDEN_LAYER:
            self.events.put(event)
            return self._pause_reply()  # the runtime honours 1 in the logits / hidden-layer modes too
        self.events.put(event)
        return 0

    def _pause_reply(self) -> int:
        if self.pause_requested:
            self.pause_requested = False
            self.paused = True
            return 1
        return 0


class StreamOwner(Protocol):
    """What a stream needs from the model that runs it (:class:`~rkedge.runtime.llm.LLM`)."""

    @property
    def abi(self) -> str: ...

    @property
    def can_pause(self) -> bool: ...

    @property
    def max_context_len(self) -> int: ...

    def _native_abort(self) -> None: ...

    def _run_finished(self, run: RunState, result: GenerationResult) -> None: ...

    def _run_thread_alive(self, run: RunState) -> bool: ...


class GenerationStream(Iterator[str]):
    """Text chunks of one generation as they arrive; :attr:`result` once exhausted.

    Closing the stream before its end (``close()``, leaving a ``with`` block, garbage collection) aborts
    the run on the NPU.
    """

    def __init__(self, llm: StreamOwner, run: RunState, stop: Sequence[str],
                 on_done: Callable[[GenerationResult], None] | None, output: OutputFormat | None = None) -> None:
        self._llm = llm
        self._run = run
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._buffer = ""
        self._joiner = ByteJoiner()
        self._chunks: list[str] = []
        self._pending: list[str] = []
        self._perf: PerfStats | None = None
        self._rows: list[array[float]] = []  # logits / hidden-state buffers, in the order the runtime gave them
        self._num_rows = 0
        self._width = 0
        self._output = output
        self._error: str | None = None
        self._stopped = False
        self._delivered = 0  # token events taken before a stop (what the caller actually received)
        self._abort_sent = False
        self._hook_exc: BaseException | None = None
        self._raise_after: BaseException | None = None
        self._on_done = on_done
        self._done = False
        self.result: GenerationResult | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __next__(self) -> str:
        while True:
            if self._pending:
                return self._pending.pop(0)
            if self._done:
                if self._raise_after is not None:
                    exc, self._raise_after = self._raise_after, None
                    raise exc
                raise StopIteration
            self._handle(self._run.events.get())

    def _handle(self, item: object) -> None:
        if isinstance(item, RunEvent):
            state = item.state
            if state <= CallState.WAITING and not self._stopped:
                self._delivered += 1
            if state <= CallState.WAITING:
                if item.values is not None:
                    self._add_rows(item)
                if not self._stopped:
                    self._emit(self._joiner.feed(state, item.text))
            elif state == CallState.FINISH:
                self._perf = item.perf
            elif state == CallState.ERROR:
                # ERROR carries no token (SEMANTICS.md): whatever text it holds is not the model's.
                self._error = "the runtime reported RKLLM_RUN_ERROR"
            elif state == CallState.HIDDEN_LAYER and item.values is not None:
                self._add_rows(item)
        elif item is STOP_SIGNAL:
            self._stopped = True
            self._send_abort()
        elif isinstance(item, HookFailure):
            self._hook_exc = item.exc
            self._send_abort()
        elif isinstance(item, RunEnd):
            self._finish(item)

    def _add_rows(self, event: RunEvent) -> None:
        """Every buffer joins the run's values: the runtime may give the positions over several callbacks."""
        if event.values is None:
            return
        if self._rows and event.width != self._width:
            self._error = f"the runtime changed the buffer width mid-run ({self._width} -> {event.width})"
            return
        self._rows.append(event.values)
        self._num_rows += event.num_tokens
        self._width = event.width

    def _emit(self, text: str) -> None:
        if not text:
            return
        if not self._stop:
            self._chunks.append(text)
            self._pending.append(text)
            return
        self._buffer += text
        for stop in self._stop:
            index = self._buffer.find(stop)
            if index >= 0:
                out, self._buffer = self._buffer[:index], ""
                self._stopped = True
                self._send_abort()
                break
        else:
            cut = len(self._buffer) - self._hold
            out, self._buffer = self._buffer[:max(cut, 0)], self._buffer[max(cut, 0):]
        if out:
            self._chunks.append(out)
            self._pending.append(out)

    def _send_abort(self) -> None:
        if not self._abort_sent:
            self._abort_sent = True
            self._llm._native_abort()

    def _finish(self, end: RunEnd) -> None:
        tail = self._joiner.finish()
        if tail and not self._stopped:
            self._emit(tail)
        if self._buffer and not self._stopped:
            self._chunks.append(self._buffer)
            self._pending.append(self._buffer)
            self._buffer = ""
        run = self._run
        if end.exc is not None and self._error is None:
            self._error = str(end.exc)
        elif end.rc != 0 and self._error is None and not (run.aborted or self._stopped or self._hook_exc):
            self._error = f"rkllm_run returned {end.rc}"
        if self._error:
            reason = "error"
        elif self._stopped:
            reason = "stop"
        elif run.aborted or self._hook_exc is not None:
            reason = "abort"
        elif run.paused:
            reason = "pause"  # the KV cache holds the run so far; continue it with LLM.resume()
        elif run.tokens >= run.max_new_tokens:
            reason = "length"
        elif self._perf is not None and \
                self._perf.prefill_tokens + self._perf.generate_tokens >= self._llm.max_context_len:
            reason = "length"  # the context filled up
        else:
            reason = "stop"
        values: array[float] | None = None
        if self._rows:
            values = self._rows[0] if len(self._rows) == 1 else array("f", b"".join(r.tobytes() for r in self._rows))
        text = "".join(self._chunks)
        parsed = parse_output(text, self._output) if self._output is not None else None
        self.result = GenerationResult(text, reason, self._stats(), values, self._num_rows, self._width, self._error,
                                       content=parsed.content if parsed else text,
                                       reasoning=parsed.reasoning if parsed else None,
                                       tool_calls=parsed.tool_calls if parsed else [])
        if parsed is not None and parsed.tool_calls and reason == "stop":
            self.result.finish_reason = "tool_calls"
        self._done = True
        self._llm._run_finished(run, self.result)
        if self._on_done is not None:
            self._on_done(self.result)
        # After the text, the stream raises: the token hook's own exception, else why the run failed.
        if self._hook_exc is not None:
            self._raise_after = self._hook_exc
        elif end.exc is not None:
            self._raise_after = end.exc
        elif self._error:
            self._raise_after = GenerationError(f"generation failed: {self._error}.", result=self.result,
                                                fix="see the runtime's E lines on stderr; rkedge doctor checks the board")

    def _stats(self) -> GenerationStats:
        run, perf = self._run, self._perf
        ttft = (run.first_token - run.started) * 1000 if run.first_token is not None else None
        if perf is not None:
            tps = perf.generate_tokens / (perf.generate_time_ms / 1000) if perf.generate_time_ms > 0 else None
            # After a stop sequence or hook stop the runtime may have run on for a token or two before the
            # abort landed; the completion is what the caller received.
            completion = self._delivered if self._stopped else perf.generate_tokens
            return GenerationStats(perf.prefill_tokens, completion, ttft, perf.prefill_time_ms,
                                   perf.generate_time_ms, tps, perf.memory_usage_mb, "runtime")
        decode_ms = None
        tps = None
        if run.first_token is not None and run.last_token is not None and run.tokens > 1:
            decode_ms = (run.last_token - run.first_token) * 1000
            tps = (run.tokens - 1) / (decode_ms / 1000) if decode_ms > 0 else None
        return GenerationStats(None, self._delivered if self._stopped else run.tokens, ttft, ttft, decode_ms, tps,
                               None, "measured")

    def abort(self) -> None:
        """Stops the generation on the NPU; the stream then ends with ``finish_reason == "abort"``."""
        if not self._done:
            self._run.aborted = True
            self._send_abort()

    def pause(self) -> None:
        """Pauses at the next token (callback return 1, ABI >= 1.2.1); the KV cache is kept for a resume."""
        if not self._llm.can_pause:
            raise InputError(f"pause needs ABI 1.2.1 or newer (this library is {self._llm.abi}).")
        self._run.pause_requested = True

    def close(self) -> None:
        """Aborts the run if it is still going and waits for it to end."""
        if self._done:
            return
        self.abort()
        while not self._done:
            try:
                item = self._run.events.get(timeout=0.2)
            except queue.Empty:
                # An interrupt (Ctrl-C) can land between taking an item and handling it; once the run's
                # thread is gone and nothing is left, the run is over.
                if not self._llm._run_thread_alive(self._run) and self._run.events.empty():
                    self._finish(RunEnd(0))
                continue
            self._handle(item)
        self._pending.clear()

    def __del__(self) -> None:
        try:
            if not self._done:
                self.close()
        except Exception:  # interpreter shutdown
            pass

    @property
    def output(self) -> OutputFormat | None:
        """How this run's reply is parsed (None: it is not), for a caller that parses chunks itself."""
        return self._output

    def deltas(self) -> Iterator[OutputDelta]:
        """The rest of the stream parsed as it arrives: content and reasoning text, and each tool call once
        complete (needs a run given an output format; without one every chunk is content)."""
        parser = OutputParser(self._output) if self._output is not None else None
        for chunk in self:
            if parser is None:
                yield OutputDelta("content", chunk)
            else:
                yield from parser.feed(chunk)
        if parser is not None:
            yield from parser.finish()

    def collect(self) -> GenerationResult:
        """Consumes the rest of the stream and returns the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


__all__ = ["GenerationStream", "GenerationResult", "GenerationStats", "TokenHook", "RunState", "StreamOwner",
           "ByteJoiner"]
