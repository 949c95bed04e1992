"""The owning wrapper around one ABI's raw interface: the only code that calls into librkllmrt.

:class:`NativeLibrary` loads a library with the function table of exactly one ABI (a path is never bound
to two ABIs in one process). :class:`NativeModel` owns one ``LLMHandle``: it fills ``RKLLMParam`` from
plain values, keeps the callback object alive as long as the handle, copies every callback result into
:class:`~rkedge.runtime.types.RunEvent` and converts return codes. Above this module nothing sees a pointer.
"""

from __future__ import annotations

import ctypes
import threading
from array import array
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from rkedge.errors import AbiSelectionError, GenerationError, InputError, LibraryNotFoundError
from rkedge.runtime.abi import for_version
from rkedge.runtime.abi._common import AbiFeatures, bind
from rkedge.runtime.types import CallState, InferMode, InitParams, PerfStats, RunEvent, RunRequest

#: Called for every callback: (run id from userdata, event) -> the int to return to the runtime.
EventHandler = Callable[[int, RunEvent], int]

_loaded: dict[str, NativeLibrary] = {}
_loaded_lock = threading.Lock()


class NativeLibrary:
    """A loaded ``librkllmrt.so`` bound to one ABI's function table."""

    def __init__(self, path: Path, abi: str) -> None:
        self.path = path
        self.abi: ModuleType = for_version(abi)
        self.features: AbiFeatures = self.abi.FEATURES
        try:
            self.cdll = ctypes.CDLL(str(path))
        except OSError as exc:
            raise LibraryNotFoundError(
                f"could not load {path}: {exc}",
                fix="check that the library is built for this machine (rkedge doctor shows its architecture)",
            ) from exc
        try:
            self.fn = bind(self.cdll, self.abi.FUNCTIONS)
        except AttributeError as exc:
            raise AbiSelectionError(
                f"{path} lacks a function of ABI {self.abi.ABI} ({exc}); it is not a library of that ABI.",
                fix="pass the --abi of the runtime release you installed",
            ) from exc

    @classmethod
    def load(cls, path: str | Path, abi: str) -> NativeLibrary:
        """Loads (once per process) ``path`` with ABI ``abi``; refuses a second ABI for the same file."""
        key = str(Path(path).resolve())
        with _loaded_lock:
            existing = _loaded.get(key)
            if existing is not None:
                if existing.abi.ABI != for_version(abi).ABI:
                    raise AbiSelectionError(
                        f"{path} is already loaded with ABI {existing.abi.ABI} in this process; "
                        f"it cannot also be called as ABI {abi}.",
                    )
                return existing
            library = cls(Path(path), abi)
            _loaded[key] = library
            return library


class NativeModel:
    """One ``LLMHandle``: init, runs, KV cache, adapters, destroy."""

    def __init__(self, library: NativeLibrary, model_path: str, params: InitParams, on_event: EventHandler) -> None:
        self.library = library
        self.features = library.features
        self._abi = library.abi
        self._on_event = on_event
        self._inflight: dict[int, tuple[Any, ...]] = {}
        param = library.fn.rkllm_createDefaultParam()
        self._apply_params(param, params)
        param.model_path = model_path.encode()
        self._param = param  # keeps model_path's buffer alive for the handle's life
        # One callback object per handle, referenced for as long as the handle exists: a collected CFUNCTYPE
        # that C still calls crashes the process (SEMANTICS.md, measured).
        self._callback = self._abi.LLMResultCallback(self._trampoline)
        self._returns_int = self.features.callback_returns_int
        self._hidden_state = self.features.hidden_layer_state
        self.handle = ctypes.c_void_p()
        if self.features.init_takes_callback_struct:
            self._callbacks = self._abi.RKLLMCallback()
            self._callbacks.result_callback = self._callback
            self.init_rc = library.fn.rkllm_init(ctypes.byref(self.handle), ctypes.byref(param),
                                                 ctypes.byref(self._callbacks))
        else:
            self.init_rc = library.fn.rkllm_init(ctypes.byref(self.handle), ctypes.byref(param), self._callback)
        self.init_values = {name: _read_param(param, name) for name, _ in params.items()}

    @property
    def alive(self) -> bool:
        return bool(self.handle.value)

    # -- parameters -------------------------------------------------------------------------------------

    def _apply_params(self, param: Any, params: InitParams) -> None:
        param_fields = {name for name, *_ in type(param)._fields_}
        extend_fields = {name for name, *_ in type(param.extend_param)._fields_}
        for name, value in params.items():
            if name in InitParams.EXTEND_FIELDS:
                target, known = param.extend_param, extend_fields
            else:
                target, known = param, param_fields
            if name not in known:
                raise InputError(f"{name} does not exist in RKLLMParam of ABI {self._abi.ABI}.",
                                 fix=f"drop {name}, or use a runtime whose ABI has it")
            setattr(target, name, value)

    # -- callbacks --------------------------------------------------------------------------------------

    def _trampoline(self, result_ptr: Any, userdata: int | None, state: int) -> int:
        # Never let an exception reach C, and always return an explicit int: a raising ctypes callback
        # returns an undefined value (0 on x86_64, 1 on aarch64 - "pause" on ABI >= 1.2.1).
        try:
            return int(self._on_event(userdata or 0, self._read_event(result_ptr, state)))
        except BaseException:  # nothing may propagate into the runtime's thread
            return 0

    def _read_event(self, result_ptr: Any, state: int) -> RunEvent:
        if not result_ptr:
            return RunEvent(state, None, -1)
        result = result_ptr[0]
        if state <= CallState.WAITING:
            text = result.text
            values = None
            if state == CallState.NORMAL:
                values = self._read_buffer(result)
            if values is None:
                return RunEvent(state, text, result.token_id)
            return RunEvent(state, text, result.token_id, None, *values)
        if state == CallState.FINISH and self.features.has_perf_stats:
            p = result.perf
            perf = PerfStats(p.prefill_time_ms, p.prefill_tokens, p.generate_time_ms, p.generate_tokens,
                             p.memory_usage_mb)
            return RunEvent(state, None, -1, perf)
        if self._hidden_state is not None and state == self._hidden_state:
            values = self._read_buffer(result)
            return RunEvent(state, None, -1, None, *(values or (None, 0, 0)))
        return RunEvent(state, None, -1)

    def _read_buffer(self, result: Any) -> tuple[array[float], int, int] | None:
        hidden = result.last_hidden_layer
        if hidden.hidden_states:
            return _copy_floats(hidden.hidden_states, hidden.num_tokens, hidden.embd_size)
        if self.features.has_logits_mode:
            logits = result.logits
            if logits.logits:
                return _copy_floats(logits.logits, logits.num_tokens, logits.vocab_size)
        return None

    # -- runs -------------------------------------------------------------------------------------------

    def run(self, run_id: int, request: RunRequest, *, asynchronous: bool = False) -> int:
        """Calls ``rkllm_run`` (blocking: the runtime calls back from its own thread) or ``rkllm_run_async``."""
        abi, features = self._abi, self.features
        keep: list[Any] = []
        # This ABI's own RKLLMInput, zero-filled: on 1.3.1 that is the 208-byte layout whose audio block the runtime
        # reads (ABI.md "Hazard"). Multimodal input (image, video, 1.3.1's audio) is not sent: RunRequest carries
        # prompts, token ids and embeddings only.
        rkllm_input = abi.RKLLMInput()
        if request.token_ids is not None:
            ids = (ctypes.c_int32 * len(request.token_ids))(*request.token_ids)
            keep.append(ids)
            rkllm_input.input_type = abi.RKLLMInputType.RKLLM_INPUT_TOKEN
            rkllm_input.token_input.input_ids = ids
            rkllm_input.token_input.n_tokens = len(request.token_ids)
        elif request.embeddings is not None:
            floats = (ctypes.c_float * len(request.embeddings)).from_buffer(request.embeddings)
            keep.append(floats)
            rkllm_input.input_type = abi.RKLLMInputType.RKLLM_INPUT_EMBED
            rkllm_input.embed_input.embed = floats
            rkllm_input.embed_input.n_tokens = request.embed_tokens
        else:
            rkllm_input.input_type = abi.RKLLMInputType.RKLLM_INPUT_PROMPT
            rkllm_input.prompt_input = request.prompt if request.prompt is not None else b""
        if features.has_role:
            rkllm_input.role = request.role.encode() if request.role else None
            rkllm_input.enable_thinking = bool(request.enable_thinking)
        elif request.enable_thinking:
            raise InputError(f"enable_thinking needs ABI 1.2.1 or newer (this library is {abi.ABI}).")

        infer = abi.RKLLMInferParam()
        if request.mode == InferMode.GET_LOGITS and not features.has_logits_mode:
            raise InputError(f"logits mode needs ABI 1.2.0 or newer (this library is {abi.ABI}).")
        infer.mode = int(request.mode)
        if request.lora_name:
            lora = abi.RKLLMLoraParam(request.lora_name.encode())
            infer.lora_params = ctypes.pointer(lora)
        if request.prompt_cache_path:
            cache = abi.RKLLMPromptCacheParam(int(request.save_prompt_cache), request.prompt_cache_path.encode())
            infer.prompt_cache_params = ctypes.pointer(cache)
        if features.has_keep_history:
            infer.keep_history = int(request.keep_history)
        if features.has_sampling_params:
            if request.sampling is not None and not request.sampling.is_empty():
                sampling = abi.RKLLMSamplingParam()
                defaults = self._param
                for name, *_ in sampling._fields_:
                    value = getattr(request.sampling, name)
                    setattr(sampling, name, value if value is not None else getattr(defaults, name))
                infer.sampling_params = ctypes.pointer(sampling)
            if request.max_new_tokens:
                infer.max_new_tokens = request.max_new_tokens
        keep += [rkllm_input, infer]
        if asynchronous:
            self._inflight[run_id] = tuple(keep)  # the runtime reads these after the call returns
            return int(self.library.fn.rkllm_run_async(self.handle, ctypes.byref(rkllm_input), ctypes.byref(infer),
                                                       ctypes.c_void_p(run_id)))
        return int(self.library.fn.rkllm_run(self.handle, ctypes.byref(rkllm_input), ctypes.byref(infer),
                                             ctypes.c_void_p(run_id)))

    def forget_run(self, run_id: int) -> None:
        self._inflight.pop(run_id, None)

    def abort(self) -> int:
        return int(self.library.fn.rkllm_abort(self.handle)) if self.alive else -1

    def is_running(self) -> bool:
        """True while a run is in progress, whatever this ABI's encoding (it flipped in 1.3.0)."""
        if not self.alive:
            return False
        rc = int(self.library.fn.rkllm_is_running(self.handle))
        return rc == self.features.is_running_value_when_running

    # -- cache, templates, adapters ---------------------------------------------------------------------

    def clear_kv_cache(self, keep_system_prompt: bool = False, start: list[int] | None = None,
                       end: list[int] | None = None) -> int:
        arity = self.features.clear_kv_cache_arity
        if arity == 0:
            raise InputError(f"rkllm_clear_kv_cache does not exist in ABI {self._abi.ABI}.")
        if arity == 2:
            if start is not None or end is not None:
                raise InputError("KV cache ranges need ABI 1.2.1 or newer.")
            return int(self.library.fn.rkllm_clear_kv_cache(self.handle, int(keep_system_prompt)))
        if (start is None) != (end is None):
            raise InputError("pass both start and end positions, or neither")
        start_arr = (ctypes.c_int * len(start))(*start) if start is not None else None
        end_arr = (ctypes.c_int * len(end))(*end) if end is not None else None
        return int(self.library.fn.rkllm_clear_kv_cache(self.handle, int(keep_system_prompt), start_arr, end_arr))

    def kv_cache_sizes(self, batches: int = 1) -> list[int] | None:
        if not self.features.has_kv_cache_size:
            return None
        sizes = (ctypes.c_int * max(batches, 1))()
        if self.library.fn.rkllm_get_kv_cache_size(self.handle, sizes) != 0:
            raise GenerationError("rkllm_get_kv_cache_size failed")
        return list(sizes)

    def set_chat_template(self, system_prompt: str, prefix: str, postfix: str) -> int:
        if not self.features.has_chat_template:
            raise InputError(f"rkllm_set_chat_template does not exist in ABI {self._abi.ABI}.")
        return int(self.library.fn.rkllm_set_chat_template(self.handle, system_prompt.encode(), prefix.encode(),
                                                           postfix.encode()))

    def set_function_tools(self, system_prompt: str, tools_json: str, tool_response_str: str) -> int:
        if not self.features.has_function_tools:
            raise InputError(f"rkllm_set_function_tools needs ABI 1.2.1 or newer (this is {self._abi.ABI}).")
        return int(self.library.fn.rkllm_set_function_tools(self.handle, system_prompt.encode(), tools_json.encode(),
                                                            tool_response_str.encode()))

    def load_lora(self, path: str, name: str, scale: float) -> int:
        adapter = self._abi.RKLLMLoraAdapter(path.encode(), name.encode(), scale)
        return int(self.library.fn.rkllm_load_lora(self.handle, ctypes.byref(adapter)))

    def load_prompt_cache(self, path: str) -> int:
        return int(self.library.fn.rkllm_load_prompt_cache(self.handle, path.encode()))

    def release_prompt_cache(self) -> int:
        return int(self.library.fn.rkllm_release_prompt_cache(self.handle))

    def destroy(self) -> int:
        if not self.alive:
            return 0
        rc = int(self.library.fn.rkllm_destroy(self.handle))
        self.handle = ctypes.c_void_p()
        self._inflight.clear()
        return rc


def _copy_floats(pointer: Any, rows: int, width: int) -> tuple[array[float], int, int]:
    count = max(rows, 0) * max(width, 0)
    values = array("f")
    values.frombytes(ctypes.string_at(pointer, count * 4))
    return values, rows, width


def _read_param(param: Any, name: str) -> Any:
    target = param.extend_param if name in InitParams.EXTEND_FIELDS else param
    return getattr(target, name)
