"""``LLM``: a model on the NPU, through the exact C ABI of the runtime library in use.

Threading: ``rkllm_run`` blocks while the runtime calls back from its own thread. Each generation runs
``rkllm_run`` on a worker thread; one trampoline per handle copies each callback into a queue (routing by
the run id passed as ``userdata``), and the caller's iterator turns events into text. One generation per
handle at a time: a second concurrent call raises :class:`~rkedge.errors.BusyError` (the server queues).
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import queue
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkedge.errors import (
    BusyError,
    ContextLengthExceeded,
    GenerationError,
    InputError,
    LibraryNotFoundError,
    ModelFileError,
    RkedgeError,
    RuntimeInitError,
)
from rkedge.runtime import failures
from rkedge.runtime._stderr import capture_native_stderr, echo_to_stderr
from rkedge.runtime.abi._native import NativeLibrary, NativeModel
from rkedge.runtime.library import RuntimeLibrary, resolve_library
from rkedge.runtime.simmodel import is_simulated_model, read_simulated_model
from rkedge.runtime.templates import ChatTemplate, get_template
from rkedge.runtime.types import CallState, InferMode, InitParams, PerfStats, RunEvent, RunRequest, Sampling

if TYPE_CHECKING:
    from rkedge.runtime.chat import ChatSession

log = logging.getLogger("rkedge.runtime")

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
    text: str
    finish_reason: str  # stop | length | abort | error
    stats: GenerationStats
    values: array | None = None  # logits or hidden states (num_tokens x width), for those modes
    num_tokens: int = 0
    width: int = 0
    error: str | None = None


@dataclass
class _RunState:
    run_id: int
    max_new_tokens: int
    on_token: TokenHook | None
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    pause_requested: bool = False
    hook_failed: bool = False
    kv_owner: object | None = None  # who owns the KV cache after this run (keep_history runs)
    aborted: bool = False  # abort() was called for this run (from any thread)


class _End:
    __slots__ = ("rc", "exc")

    def __init__(self, rc: int, exc: BaseException | None = None) -> None:
        self.rc, self.exc = rc, exc


class _HookFailure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


#: Queued when the token hook returns True: stop like a stop sequence.
_STOP_SIGNAL = object()


class GenerationStream(Iterator[str]):
    """Text chunks of one generation as they arrive; :attr:`result` once exhausted.

    Closing the stream before its end (``close()``, leaving a ``with`` block, garbage collection) aborts
    the run on the NPU.
    """

    def __init__(self, llm: "LLM", run: _RunState, stop: Sequence[str], on_done: Callable[[GenerationResult], None] | None) -> None:
        self._llm = llm
        self._run = run
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._buffer = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._chunks: list[str] = []
        self._pending: list[str] = []
        self._perf: PerfStats | None = None
        self._values: tuple[array | None, int, int] = (None, 0, 0)
        self._error: str | None = None
        self._stopped = False
        self._delivered = 0  # token events taken before a stop (what the caller actually received)
        self._abort_sent = False
        self._hook_exc: BaseException | None = None
        self._raise_after: BaseException | None = None
        self._on_done = on_done
        self._done = False
        self.result: GenerationResult | None = None

    def __iter__(self) -> "GenerationStream":
        return self

    def __enter__(self) -> "GenerationStream":
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
            if state == CallState.NORMAL:
                if item.values is not None:
                    self._values = (item.values, item.num_tokens, item.width)
                if item.text and not self._stopped:
                    self._emit(self._decoder.decode(item.text))
            elif state == CallState.FINISH:
                self._perf = item.perf
            elif state == CallState.ERROR:
                self._error = "the runtime reported RKLLM_RUN_ERROR"
            elif state == CallState.HIDDEN_LAYER and item.values is not None:
                self._values = (item.values, item.num_tokens, item.width)
            # WAITING: the token ends inside a multi-byte character; its text is not emitted (the runtime
            # delivers the whole character with the next NORMAL token).
        elif item is _STOP_SIGNAL:
            self._stopped = True
            self._send_abort()
        elif isinstance(item, _HookFailure):
            self._hook_exc = item.exc
            self._send_abort()
        elif isinstance(item, _End):
            self._finish(item)

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

    def _finish(self, end: _End) -> None:
        tail = self._decoder.decode(b"", final=True)
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
        elif run.tokens >= run.max_new_tokens:
            reason = "length"
        elif self._perf is not None and \
                self._perf.prefill_tokens + self._perf.generate_tokens >= self._llm.max_context_len:
            reason = "length"  # the context filled up
        else:
            reason = "stop"
        values, rows, width = self._values
        self.result = GenerationResult("".join(self._chunks), reason, self._stats(), values, rows, width, self._error)
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
        if not self._llm.features.callback_returns_int:
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
                    self._finish(_End(0))
                continue
            self._handle(item)
        self._pending.clear()

    def __del__(self) -> None:
        try:
            if not self._done:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def collect(self) -> GenerationResult:
        """Consumes the rest of the stream and returns the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class LLM:
    """A model loaded on the NPU (or the simulated NPU).

    Args:
        model_path: the ``.rkllm`` file (or an rkedge simulated model for ``library="mock"``).
        library: path of ``librkllmrt.so``, ``"mock"`` for the simulated NPU, or None to search.
        abi: the runtime's ABI or release (``1.1``, ``1.2.0``, ``1.2.2``, ``1.2.3``, ``1.3.0``); detected when
            the library tells, required when it does not.
        chat_template: a template family (``gemma``, ``llama3``, ``qwen2``...); default: the model's
            manifest. With a known family rkedge renders prompts itself and turns the runtime's embedded
            template off, so nothing is templated twice.
        verbose: echo the runtime's init log.
        **params: ``RKLLMParam`` fields (``max_context_len``, ``max_new_tokens``, ``top_k``, ``temperature``,
            ``base_domain_id``...).
    """

    def __init__(self, model_path: str | os.PathLike[str], library: str | os.PathLike[str] | None = None,
                 abi: str | None = None, *, chat_template: str | None = None, verbose: bool = False,
                 **params: Any) -> None:
        self._closed = True
        self.model_path = Path(model_path)
        from rkedge.runtime.rknn.bundle import is_rknn_bundle

        rknn_bundle = is_rknn_bundle(self.model_path)
        if self.model_path.is_dir() and not rknn_bundle:
            raise ModelFileError(f"{self.model_path} is a folder without bundle.json, so not an RKNN bundle.",
                                 fix="pass a .rkllm file, or the folder rkedge convert --backend rknn wrote")
        if not (self.model_path.is_file() or rknn_bundle):
            raise ModelFileError(f"model file not found: {self.model_path}",
                                 fix="pass the path of a .rkllm file (or create a simulated one: rkedge mock-model)")
        try:
            init = InitParams(**params)
        except TypeError as exc:
            raise InputError(f"unknown runtime parameter: {exc}") from None
        self.params = init
        self._lock = threading.Lock()
        self._runs: dict[int, _RunState] = {}
        self._next_run = 0
        self._active: tuple[_RunState, threading.Thread] | None = None
        self._kv_owner: object | None = None
        self.init_log = ""
        self.warnings: list[str] = []
        if rknn_bundle:
            self._open_rknn(library, verbose)
        else:
            self._open_rkllm(library, abi, init, verbose)
        self._closed = False
        family = chat_template or self.metadata.get("chat_family")
        self.template: ChatTemplate | None = get_template(family) if family else None
        if self.template is not None and self.features.has_chat_template:
            # We render the whole prompt ourselves: switch the runtime's embedded template off so nothing is
            # templated twice. Done once, before any KV exists (it also clears the cache, rknn-llm#377).
            self._native.set_chat_template("", "", "")

    def _open_rkllm(self, library: str | os.PathLike[str] | None, abi: str | None, init: InitParams,
                    verbose: bool) -> None:
        """librkllmrt (or the simulated NPU) through the ABI of its version."""
        self.runtime: RuntimeLibrary = resolve_library(library, abi)
        self.abi = self.runtime.abi
        self.metadata = load_model_metadata(self.model_path)
        if is_simulated_model(self.model_path) and not self.runtime.simulated:
            raise ModelFileError(
                f"{self.model_path} is an rkedge simulated model (written without rkllm-toolkit, no weights); "
                f"the real runtime {self.runtime.path} cannot load it.",
                fix="run it on the simulated NPU (--mock), or convert the checkpoint with the real rkllm-toolkit "
                "(rkedge convert --toolkit PYTHON)",
            )
        native_library = NativeLibrary.load(self.runtime.path, self.abi)
        self.features = native_library.features
        with capture_native_stderr() as captured:
            self._native = NativeModel(native_library, str(self.model_path), init, self._on_event)
        self.init_log = captured.text
        found = failures.scan(self.init_log)
        error = next((m for m in found if m.failure.severity == "error"), None)
        if verbose or error or self._native.init_rc != 0:
            echo_to_stderr(self.init_log)
        self.warnings = [f"{m.failure.id}: {m.summary} (fix: {failures.fix_for(m)})"
                         for m in found if m.failure.severity == "warning"]
        for warning in self.warnings:
            log.warning(warning)
        if error is not None or self._native.init_rc != 0 or not self._native.alive:
            self._native.destroy()
            raise self._init_error(error)

    def _open_rknn(self, library: str | os.PathLike[str] | None, verbose: bool) -> None:
        """An RKNN bundle (RecurrentGemma): RKNNLite on the board, the rknn-toolkit2 simulator with --mock."""
        try:
            from rkedge.runtime.rknn.engine import RknnModel
        except ImportError as exc:
            raise LibraryNotFoundError(f"the RKNN backend needs numpy ({exc}).",
                                       fix="pip install 'rkedge[rknn-board]' (numpy, tokenizers, and on aarch64 "
                                           "rknn-toolkit-lite2)") from None
        engine = RknnModel(self.model_path, str(library) if library is not None else None, self.params,
                           self._on_event, verbose=verbose)
        self._native = engine  # type: ignore[assignment]
        self.features = engine.features
        self.abi = "rknn"
        self.init_log = engine.init_log
        self.metadata = dict(engine.bundle)
        self.runtime = RuntimeLibrary(engine.folder, "rknn", engine.graphs.version,
                                      f"RKNN bundle ({engine.backend})", engine.backend == "simulator")

    def _init_error(self, match: failures.FailureMatch | None) -> RuntimeInitError:
        if match is not None:
            return RuntimeInitError(f"rkllm_init failed: {match.summary} ({match.failure.id}). Runtime said: {match.line}",
                                    fix=failures.fix_for(match), failure=match.failure.id, log=self.init_log)
        said = "; ".join(line for line in self.init_log.splitlines() if line.startswith(("E ", "W "))) or "nothing"
        return RuntimeInitError(
            f"rkllm_init failed (returned {self._native.init_rc}). Runtime said: {said}",
            fix="run `rkedge doctor --model FILE --trial-init` on the board for a diagnosis",
            log=self.init_log)

    # -- properties ---------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def encode(self) -> Callable[[str], list[int]] | None:
        """The model's tokenizer where the backend runs one on the host (RKNN bundles); None for librkllmrt, whose
        tokenizer is inside the runtime."""
        tokenizer = getattr(self._native, "tokenizer", None)
        return tokenizer.encode if tokenizer is not None else None

    @property
    def max_context_len(self) -> int:
        return int(self._native.init_values.get("max_context_len") or self.params.max_context_len or 4096)

    @property
    def max_new_tokens(self) -> int:
        return int(self._native.init_values.get("max_new_tokens") or self.params.max_new_tokens or 1024)

    def info(self) -> dict[str, Any]:
        return {
            "model": str(self.model_path),
            "library": str(self.runtime.path),
            "abi": self.abi,
            "runtime_version": self.runtime.runtime_version,
            "abi_selected_by": self.runtime.selected_by,
            "simulated": self.runtime.simulated,
            "chat_template": self.template.family if self.template else None,
            "max_context_len": self.max_context_len,
            "warnings": list(self.warnings),
        }

    # -- generation ---------------------------------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, stream: bool = True, max_new_tokens: int | None = None,
                 stop: Sequence[str] = (), on_token: TokenHook | None = None, token_ids: Sequence[int] | None = None,
                 mode: str = "generate", lora: str | None = None, prompt_cache: str | None = None,
                 save_prompt_cache: bool = False, role: str = "user", enable_thinking: bool = False,
                 keep_history: bool = False, top_k: int | None = None, top_p: float | None = None,
                 temperature: float | None = None, repeat_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 ) -> GenerationStream | GenerationResult:
        """Runs the model on ``prompt`` (sent as is: no chat template; use :meth:`chat_session` for chat).

        Per-run sampling and ``max_new_tokens`` are applied on ABI 1.3.0; older ABIs fix them at init and
        refuse per-run values that differ (they would be silently ignored otherwise).
        """
        request = RunRequest(
            prompt=prompt.encode("utf-8") if prompt is not None else None,
            token_ids=list(token_ids) if token_ids is not None else None,
            role=role, enable_thinking=enable_thinking, mode=_mode(mode), lora_name=lora,
            prompt_cache_path=prompt_cache, save_prompt_cache=save_prompt_cache, keep_history=keep_history,
            sampling=Sampling(top_k=top_k, top_p=top_p, temperature=temperature, repeat_penalty=repeat_penalty,
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty),
            max_new_tokens=max_new_tokens)
        result = self._start(request, stop=stop, on_token=on_token, owner=None)
        return result if stream else result.collect()

    def _start(self, request: RunRequest, *, stop: Sequence[str] = (), on_token: TokenHook | None = None,
               owner: object | None = None, on_done: Callable[[GenerationResult], None] | None = None
               ) -> GenerationStream:
        if self._closed:
            raise RkedgeError("this LLM is closed.", fix="create a new LLM")
        if request.prompt is None and request.token_ids is None:
            raise InputError("nothing to generate from: pass a prompt or token_ids")
        self._check_request(request)
        if not self._lock.acquire(blocking=False):
            raise BusyError("a generation is already running on this model; the NPU serves one at a time.",
                            fix="wait for it to finish (or abort it), or queue requests (rkedge serve does)")
        try:
            if self._kv_owner is not None and self._kv_owner is not owner and self.features.clear_kv_cache_arity:
                self._native.clear_kv_cache(False)
                self._kv_owner = None
            self._next_run += 1
            limit = request.max_new_tokens if (request.max_new_tokens and self.features.has_sampling_params) \
                else self.max_new_tokens
            run = _RunState(self._next_run, limit, on_token)
            self._runs[run.run_id] = run
            stream = GenerationStream(self, run, stop, on_done)
            thread = threading.Thread(target=self._run_native, args=(run, request), daemon=True,
                                      name=f"rkedge-run-{run.run_id}")
            self._active = (run, thread)
            run.kv_owner = owner if request.keep_history else None
            thread.start()
            return stream
        except BaseException:
            self._lock.release()
            raise

    def _check_request(self, request: RunRequest) -> None:
        features = self.features
        if request.keep_history and not features.has_keep_history:
            raise InputError(f"keep_history needs ABI 1.2.0 or newer (this library is {self.abi}).")
        if request.mode == InferMode.GET_LOGITS and not features.has_logits_mode:
            raise InputError(f"logits mode needs ABI 1.2.0 or newer (this library is {self.abi}).")
        if request.enable_thinking and not features.has_role:
            raise InputError(f"enable_thinking needs ABI 1.2.1 or newer (this library is {self.abi}).")
        if not features.has_sampling_params:
            fixed = {name: value for name, value in vars(request.sampling or Sampling()).items() if value is not None}
            if request.max_new_tokens:
                fixed["max_new_tokens"] = request.max_new_tokens
            init_values = self._native.init_values
            differing = {k: v for k, v in fixed.items()
                         if k not in init_values or abs(float(init_values[k]) - float(v)) > 1e-6}
            if differing:
                raise InputError(
                    f"ABI {self.abi} sets sampling and max_new_tokens once at init; per-run values "
                    f"{differing} would be ignored.",
                    fix="pass them when creating the LLM (e.g. --temperature), or use runtime 1.3.0 for per-run values")

    def _run_native(self, run: _RunState, request: RunRequest) -> None:
        try:
            rc = self._native.run(run.run_id, request)
            run.events.put(_End(rc))
        except BaseException as exc:  # noqa: BLE001 - reported to the consumer
            run.events.put(_End(-1, exc))

    def _on_event(self, run_id: int, event: RunEvent) -> int:
        """Runs on the runtime's thread for every callback; returns the callback's int."""
        run = self._runs.get(run_id)
        if run is None:
            return 0
        state = event.state
        if state == CallState.NORMAL or state == CallState.WAITING:
            now = time.perf_counter()
            if run.first_token is None:
                run.first_token = now
            run.last_token = now
            run.tokens += 1
            if run.on_token is not None and not run.hook_failed and state == CallState.NORMAL and event.text:
                try:
                    if run.on_token(event.text.decode("utf-8", "replace")) is True:
                        run.events.put(event)
                        run.events.put(_STOP_SIGNAL)
                        return 0
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    run.hook_failed = True
                    run.events.put(event)
                    run.events.put(_HookFailure(exc))
                    return 0
            run.events.put(event)
            if run.pause_requested:
                run.pause_requested = False
                return 1
            return 0
        run.events.put(event)
        return 0

    def _run_finished(self, run: _RunState, result: GenerationResult) -> None:
        active = self._active
        if active is not None and active[0] is run:
            active[1].join()
            self._active = None
            self._kv_owner = run.kv_owner if result.finish_reason != "error" else None
            self._runs.pop(run.run_id, None)
            self._native.forget_run(run.run_id)
            self._lock.release()

    def _run_thread_alive(self, run: _RunState) -> bool:
        active = self._active
        return active is not None and active[0] is run and active[1].is_alive()

    def _native_abort(self) -> None:
        if not self._closed:
            self._native.abort()

    def abort(self) -> None:
        """Aborts the running generation, if any (safe from any thread)."""
        active = self._active
        if active is not None:
            active[0].aborted = True
            self._native_abort()

    def is_running(self) -> bool:
        return self._native.is_running() if not self._closed else False

    # -- sessions, caches, adapters -------------------------------------------------------------------------

    def chat_session(self, system: str | None = None) -> "ChatSession":
        from rkedge.runtime.chat import ChatSession

        return ChatSession(self, system=system)

    def clear_kv_cache(self, keep_system_prompt: bool = False) -> None:
        if self.features.clear_kv_cache_arity == 0:
            return  # ABI 1.1 keeps no history between runs
        if self._native.clear_kv_cache(keep_system_prompt) != 0:
            raise GenerationError("rkllm_clear_kv_cache failed (is a generation running?)")
        self._kv_owner = None

    def kv_cache_size(self) -> int | None:
        sizes = self._native.kv_cache_sizes(self.params.n_batch or 1)
        return sizes[0] if sizes else None

    def load_lora(self, path: str | os.PathLike[str], name: str | None = None, scale: float = 1.0) -> str:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"LoRA adapter not found: {path}", fix="pass the <model>_lora.rkllm written by convert")
        name = name or path.stem
        with capture_native_stderr() as captured:
            rc = self._native.load_lora(str(path), name, scale)
        if rc != 0:
            echo_to_stderr(captured.text)
            raise InputError(f"rkllm_load_lora refused {path} (returned {rc}): {captured.text.strip() or 'no message'}",
                             fix="the adapter must be converted by the same toolkit for this base model")
        return name

    def load_prompt_cache(self, path: str | os.PathLike[str]) -> None:
        with capture_native_stderr() as captured:
            rc = self._native.load_prompt_cache(str(path))
        if rc != 0:
            raise InputError(f"rkllm_load_prompt_cache refused {path}: {captured.text.strip() or rc}")
        self._kv_owner = None

    def release_prompt_cache(self) -> None:
        self._native.release_prompt_cache()

    def set_function_tools(self, system_prompt: str, tools: list[dict[str, Any]] | str,
                           tool_response_str: str = "tool_response") -> None:
        tools_json = tools if isinstance(tools, str) else json.dumps(tools)
        if self._native.set_function_tools(system_prompt, tools_json, tool_response_str) != 0:
            raise InputError("rkllm_set_function_tools failed")

    # -- lifetime -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Aborts a running generation, waits for it, and frees the handle. Safe to call twice."""
        if self._closed:
            return
        active = self._active
        if active is not None:
            active[0].aborted = True
            self._native.abort()
            active[1].join(timeout=30)
        self._closed = True
        self._native.destroy()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _mode(name: str) -> InferMode:
    modes = {"generate": InferMode.GENERATE, "hidden": InferMode.GET_LAST_HIDDEN_LAYER,
             "last_hidden_layer": InferMode.GET_LAST_HIDDEN_LAYER, "logits": InferMode.GET_LOGITS}
    try:
        return modes[name]
    except KeyError:
        raise InputError(f"unknown mode {name!r}; use generate, hidden or logits") from None


def load_model_metadata(model_path: Path) -> dict[str, Any]:
    """The model's manifest: embedded in a simulated model, else the ``<file>.json`` sidecar convert writes."""
    if is_simulated_model(model_path):
        return read_simulated_model(model_path)
    sidecar = model_path.with_name(model_path.name + ".json")
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError:
            log.warning("ignoring unreadable manifest %s", sidecar)
            return {}
        runtime = data.get("runtime", {}) if isinstance(data, dict) else {}
        return {**data, **{k: v for k, v in runtime.items() if k not in data}} if isinstance(data, dict) else {}
    return {}


__all__ = ["LLM", "GenerationStream", "GenerationResult", "GenerationStats", "ContextLengthExceeded"]
