"""``LLM``: a model on the NPU, whichever backend runs it (:mod:`rkedge.runtime.backend`).

Threading: a backend's ``run`` blocks while the runtime calls back from its own thread. Each generation runs
on a worker thread; one handler per model routes each callback to its run (by the run id passed as
``userdata``) and into that run's queue, and the caller's :class:`GenerationStream` turns events into text.
One generation per model at a time: a second concurrent call raises :class:`~rkedge.errors.BusyError` (the
server queues).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from rkedge.errors import BusyError, ContextLengthExceeded, InputError, RkedgeError
from rkedge.runtime._stream import GenerationResult, GenerationStats, GenerationStream, RunEnd, RunState, TokenHook
from rkedge.runtime.abi._common import AbiFeatures
from rkedge.runtime.backend import Backend, RuntimeInfo, open_backend
from rkedge.runtime.rkllm_backend import load_model_metadata
from rkedge.runtime.templates import ChatTemplate, get_template
from rkedge.runtime.types import InferMode, InitParams, RunEvent, RunRequest, Sampling

if TYPE_CHECKING:
    from rkedge.runtime.chat import ChatSession

log = logging.getLogger("rkedge.runtime")


class LLM:
    """A model loaded on the NPU (or the simulated NPU).

    Args:
        model_path: the ``.rkllm`` file (or an rkedge simulated model for ``library="mock"``), or an RKNN bundle
            folder.
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
        try:
            init = InitParams(**params)
        except TypeError as exc:
            raise InputError(f"unknown runtime parameter: {exc}") from None
        self.params = init
        self._lock = threading.Lock()
        self._runs: dict[int, RunState] = {}
        self._next_run = 0
        self._active: tuple[RunState, threading.Thread] | None = None
        self._kv_owner: object | None = None
        self._backend: Backend = open_backend(self.model_path, library, abi, init, self._on_event, verbose=verbose)
        backend = self._backend
        self.runtime: RuntimeInfo = backend.runtime
        self.abi: str = backend.runtime.abi
        self.features: AbiFeatures = backend.features
        self.init_log: str = backend.init_log
        self.warnings: list[str] = list(backend.warnings)
        self.metadata: dict[str, Any] = dict(backend.metadata)
        self._closed = False
        family = chat_template or self.metadata.get("chat_family")
        self.template: ChatTemplate | None = get_template(family) if family else None
        if self.template is not None and self.features.has_chat_template:
            # We render the whole prompt ourselves: switch the runtime's embedded template off so nothing is
            # templated twice. Done once, before any KV exists (it also clears the cache, rknn-llm#377).
            try:
                backend.set_chat_template("", "", "")
            except RkedgeError as exc:  # the model still runs; its own template may then wrap our prompts
                self.warnings.append(f"could not switch the runtime's chat template off: {exc.message}")
                log.warning(self.warnings[-1])

    # -- properties ---------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backend(self) -> Backend:
        """What runs the model (see :mod:`rkedge.runtime.backend`)."""
        return self._backend

    @property
    def encode(self) -> Callable[[str], list[int]] | None:
        """The model's tokenizer where the backend runs one on the host (RKNN bundles); None for librkllmrt, whose
        tokenizer is inside the runtime."""
        return self._backend.encode

    @property
    def max_context_len(self) -> int:
        return int(self._backend.init_values.get("max_context_len") or self.params.max_context_len or 4096)

    @property
    def max_new_tokens(self) -> int:
        return int(self._backend.init_values.get("max_new_tokens") or self.params.max_new_tokens or 1024)

    @property
    def can_pause(self) -> bool:
        """A running generation can pause at a token (callback return 1, ABI >= 1.2.1)."""
        return self.features.callback_returns_int

    @property
    def kv_cache_owner(self) -> object | None:
        """Whose conversation the KV cache holds after the last ``keep_history`` run (the ``owner`` passed to
        :meth:`run`), or None when it holds nothing anyone can continue."""
        return self._kv_owner

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

    @overload
    def generate(self, prompt: str | None = None, *, stream: Literal[True] = ..., max_new_tokens: int | None = None,
                 stop: Sequence[str] = (), on_token: TokenHook | None = None, token_ids: Sequence[int] | None = None,
                 mode: str = "generate", lora: str | None = None, prompt_cache: str | None = None,
                 save_prompt_cache: bool = False, role: str = "user", enable_thinking: bool = False,
                 keep_history: bool = False, top_k: int | None = None, top_p: float | None = None,
                 temperature: float | None = None, repeat_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 ) -> GenerationStream: ...

    @overload
    def generate(self, prompt: str | None = None, *, stream: Literal[False], max_new_tokens: int | None = None,
                 stop: Sequence[str] = (), on_token: TokenHook | None = None, token_ids: Sequence[int] | None = None,
                 mode: str = "generate", lora: str | None = None, prompt_cache: str | None = None,
                 save_prompt_cache: bool = False, role: str = "user", enable_thinking: bool = False,
                 keep_history: bool = False, top_k: int | None = None, top_p: float | None = None,
                 temperature: float | None = None, repeat_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 ) -> GenerationResult: ...

    @overload
    def generate(self, prompt: str | None = None, *, stream: bool, max_new_tokens: int | None = None,
                 stop: Sequence[str] = (), on_token: TokenHook | None = None, token_ids: Sequence[int] | None = None,
                 mode: str = "generate", lora: str | None = None, prompt_cache: str | None = None,
                 save_prompt_cache: bool = False, role: str = "user", enable_thinking: bool = False,
                 keep_history: bool = False, top_k: int | None = None, top_p: float | None = None,
                 temperature: float | None = None, repeat_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 ) -> GenerationStream | GenerationResult: ...

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
        result = self.run(request, stop=stop, on_token=on_token)
        return result if stream else result.collect()

    def run(self, request: RunRequest, *, owner: object | None = None, stop: Sequence[str] = (),
            on_token: TokenHook | None = None, on_done: Callable[[GenerationResult], None] | None = None
            ) -> GenerationStream:
        """Starts one run of ``request`` and returns its stream (what :meth:`generate` and chat sessions use).

        Args:
            owner: whose conversation a ``keep_history`` run leaves in the KV cache (a chat session passes
                itself). A run for another owner first clears the cache, so no conversation continues another's.
            stop: stop strings (the text ends before the first one found).
            on_token: called on the runtime's thread with each token's text; True stops the run.
            on_done: called with the result once the run has ended, before the stream's last chunk is returned.

        Raises:
            BusyError: a run is already in progress on this model.
            InputError: the request asks for something this backend or ABI cannot do.
        """
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
                self._backend.clear_kv_cache(False)
                self._kv_owner = None
            self._next_run += 1
            limit = request.max_new_tokens if (request.max_new_tokens and self.features.has_sampling_params) \
                else self.max_new_tokens
            run = RunState(self._next_run, limit, on_token)
            self._runs[run.run_id] = run
            stream = GenerationStream(self, run, stop, on_done)
            thread = threading.Thread(target=self._run_backend, args=(run, request), daemon=True,
                                      name=f"rkedge-run-{run.run_id}")
            self._active = (run, thread)
            run.kv_owner = owner if request.keep_history else None
            thread.start()
            return stream
        except BaseException:
            self._lock.release()
            raise

    def _start(self, request: RunRequest, *, stop: Sequence[str] = (), on_token: TokenHook | None = None,
               owner: object | None = None, on_done: Callable[[GenerationResult], None] | None = None
               ) -> GenerationStream:
        """Kept for callers written before :meth:`run` existed (the server); use :meth:`run`."""
        return self.run(request, owner=owner, stop=stop, on_token=on_token, on_done=on_done)

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
            init_values = self._backend.init_values
            differing = {k: v for k, v in fixed.items()
                         if k not in init_values or abs(float(init_values[k]) - float(v)) > 1e-6}
            if differing:
                raise InputError(
                    f"ABI {self.abi} sets sampling and max_new_tokens once at init; per-run values "
                    f"{differing} would be ignored.",
                    fix="pass them when creating the LLM (e.g. --temperature), or use runtime 1.3.0 for per-run values")

    def _run_backend(self, run: RunState, request: RunRequest) -> None:
        try:
            rc = self._backend.run(run.run_id, request)
            run.events.put(RunEnd(rc))
        except BaseException as exc:  # reported to the consumer
            run.events.put(RunEnd(-1, exc))

    def _on_event(self, run_id: int, event: RunEvent) -> int:
        """Runs on the runtime's thread for every callback; returns the callback's int."""
        run = self._runs.get(run_id)
        return run.on_event(event) if run is not None else 0

    def _run_finished(self, run: RunState, result: GenerationResult) -> None:
        active = self._active
        if active is not None and active[0] is run:
            active[1].join()
            self._active = None
            self._kv_owner = run.kv_owner if result.finish_reason != "error" else None
            self._runs.pop(run.run_id, None)
            self._backend.forget_run(run.run_id)
            self._lock.release()

    def _run_thread_alive(self, run: RunState) -> bool:
        active = self._active
        return active is not None and active[0] is run and active[1].is_alive()

    def _native_abort(self) -> None:
        if not self._closed:
            self._backend.abort()

    def abort(self) -> None:
        """Aborts the running generation, if any (safe from any thread)."""
        active = self._active
        if active is not None:
            active[0].aborted = True
            self._native_abort()

    def is_running(self) -> bool:
        return self._backend.is_running() if not self._closed else False

    # -- sessions, caches, adapters -------------------------------------------------------------------------

    def chat_session(self, system: str | None = None) -> ChatSession:
        from rkedge.runtime.chat import ChatSession

        return ChatSession(self, system=system)

    def clear_kv_cache(self, keep_system_prompt: bool = False) -> None:
        if self.features.clear_kv_cache_arity == 0:
            return  # ABI 1.1 keeps no history between runs
        self._backend.clear_kv_cache(keep_system_prompt)
        self._kv_owner = None

    def kv_cache_size(self) -> int | None:
        sizes = self._backend.kv_cache_sizes(self.params.n_batch or 1)
        return sizes[0] if sizes else None

    def load_lora(self, path: str | os.PathLike[str], name: str | None = None, scale: float = 1.0) -> str:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"LoRA adapter not found: {path}", fix="pass the <model>_lora.rkllm written by convert")
        name = name or path.stem
        self._backend.load_lora(str(path), name, scale)
        return name

    def load_prompt_cache(self, path: str | os.PathLike[str]) -> None:
        self._backend.load_prompt_cache(str(path))
        self._kv_owner = None

    def release_prompt_cache(self) -> None:
        self._backend.release_prompt_cache()

    def set_function_tools(self, system_prompt: str, tools: list[dict[str, Any]] | str,
                           tool_response_str: str = "tool_response") -> None:
        tools_json = tools if isinstance(tools, str) else json.dumps(tools)
        self._backend.set_function_tools(system_prompt, tools_json, tool_response_str)

    # -- lifetime -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Aborts a running generation, waits for it, and frees the model. Safe to call twice."""
        if self._closed:
            return
        active = self._active
        if active is not None:
            active[0].aborted = True
            self._backend.abort()
            active[1].join(timeout=30)
        self._closed = True
        self._backend.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _mode(name: str) -> InferMode:
    modes = {"generate": InferMode.GENERATE, "hidden": InferMode.GET_LAST_HIDDEN_LAYER,
             "last_hidden_layer": InferMode.GET_LAST_HIDDEN_LAYER, "logits": InferMode.GET_LOGITS}
    try:
        return modes[name]
    except KeyError:
        raise InputError(f"unknown mode {name!r}; use generate, hidden or logits") from None


__all__ = ["LLM", "GenerationStream", "GenerationResult", "GenerationStats", "ContextLengthExceeded", "TokenHook",
           "load_model_metadata"]
