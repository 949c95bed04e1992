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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from rkedge.errors import AbiSelectionError, GenerationError, InputError, LibraryNotFoundError
from rkedge.runtime.abi import for_version
from rkedge.runtime.abi._common import AbiFeatures, bind
from rkedge.runtime.types import CallState, InferMode, InitParams, PerfStats, RunEvent, RunRequest

#: Called for every callback: (run id from userdata, event) -> the int to return to the runtime.
EventHandler = Callable[[int, RunEvent], int]
#: ABI 1.3.0 tokenizer callback: the text the runtime wants tokenized (UTF-8, after its chat template) -> ids.
Tokenizer = Callable[[bytes], Sequence[int]]
#: ABI 1.3.0 embedding callback: token ids -> their rows, len(ids) x hidden size floats, row-major.
Embedder = Callable[[Sequence[int]], Sequence[float]]



@dataclass(frozen=True)
class MediaEmbeddings:
    """One kind of media of a multimodal input: ``count`` items of ``rows_per_item`` encoder rows each.

    ``embeddings`` holds count x rows_per_item x hidden size float32 values, row-major (ABI.md: image_embed,
    video_embed, audio_embed). The prompt holds one placeholder per item (``<image>``, ``<audio>``...). Tags
    (``start``/``end``/``content``) travel with the input from ABI 1.3.0; up to 1.2.3 they are set once at init
    (``NativeModel(image_tags=...)``).
    """

    embeddings: array[float]
    count: int
    rows_per_item: int  # n_image_tokens, n_frame_tokens (video) or n_audio_tokens
    start: str | None = None
    end: str | None = None
    content: str | None = None
    width: int = 0  # image_width / frame_width
    height: int = 0
    frames_per_item: int = 1  # video: n_frame_per_video


@dataclass(frozen=True)
class MultimodalInput:
    """The media of an ``RKLLM_INPUT_MULTIMODAL`` run (its text is the request's prompt)."""

    image: MediaEmbeddings | None = None
    video: MediaEmbeddings | None = None  # ABI >= 1.3.0
    audio: MediaEmbeddings | None = None  # ABI >= 1.3.1


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

    def __init__(self, library: NativeLibrary, model_path: str, params: InitParams, on_event: EventHandler, *,
                 tokenizer: Tokenizer | None = None, embedder: Embedder | None = None,
                 image_tags: tuple[str, str, str] | None = None) -> None:
        """Creates the handle (``rkllm_init``; its status is :attr:`init_rc`).

        ``tokenizer`` and ``embedder`` (ABI >= 1.3.0) are handed to the runtime in ``RKLLMCallback``, for models
        exported without their own tokenizer or embedding; the runtime calls them from its own thread.
        ``image_tags`` (start, end, content) are ``RKLLMParam``'s ``img_*`` fields (ABI 1.1-1.2.3; from 1.3.0 the
        tags travel with each multimodal input instead).
        """
        self.library = library
        self.features = library.features
        self._abi = library.abi
        self._on_event = on_event
        self._inflight: dict[int, tuple[Any, ...]] = {}
        param = library.fn.rkllm_createDefaultParam()
        self._apply_params(param, params)
        if image_tags is not None:
            if not hasattr(param, "img_content"):
                raise InputError(f"image tags are set per input from ABI 1.3.0 (this library is {self._abi.ABI}).",
                                 fix="pass the tags with each MediaEmbeddings instead")
            param.img_start, param.img_end, param.img_content = (tag.encode() for tag in image_tags)
        param.model_path = model_path.encode()
        self._param = param  # keeps model_path's buffer alive for the handle's life
        # One callback object per handle, referenced for as long as the handle exists: a collected CFUNCTYPE
        # that C still calls crashes the process (SEMANTICS.md, measured).
        self._callback = self._abi.LLMResultCallback(self._trampoline)
        self._returns_int = self.features.callback_returns_int
        self._hidden_state = self.features.hidden_layer_state
        self.handle = ctypes.c_void_p()
        self._tokenizer, self._embedder = tokenizer, embedder
        if (tokenizer or embedder) and not self.features.init_takes_callback_struct:
            raise InputError(f"tokenizer and embedding callbacks need ABI 1.3.0 or newer (this is {self._abi.ABI}).")
        if self.features.init_takes_callback_struct:
            self._callbacks = self._abi.RKLLMCallback()
            self._callbacks.result_callback = self._callback
            # Referenced as long as the handle, like the result callback.
            if tokenizer is not None:
                self._tokenizer_callback = self._abi.LLMTokenizerCallback(self._tokenize)
                self._callbacks.tokenizer_callback = self._tokenizer_callback
            if embedder is not None:
                self._embed_callback = self._abi.LLMGetEmbedCallback(self._embed)
                self._callbacks.embed_callback = self._embed_callback
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

    def _tokenize(self, userdata: int | None, text: bytes | None, text_len: int, tokens: Any,
                  n_tokens_max: int) -> int:
        # The header does not say what the return value means; the number of ids written, and -1 for a failure
        # (or more ids than the runtime has room for), is what the simulated NPU expects (UNKNOWN on hardware).
        try:
            assert self._tokenizer is not None
            ids = list(self._tokenizer((text or b"")[:max(text_len, 0)]))
            if len(ids) > n_tokens_max:
                return -1
            for index, token in enumerate(ids):
                tokens[index] = int(token)
            return len(ids)
        except BaseException:  # nothing may propagate into the runtime's thread
            return -1

    def _embed(self, userdata: int | None, tokens: Any, num_tokens: int, embed: int | None, size: int) -> int:
        # `len` is the output buffer's size; whether in bytes or floats is not documented, so a reply that fills
        # the buffer under either reading is accepted (the simulated NPU passes bytes). 0 = success.
        try:
            assert self._embedder is not None
            values = array("f", self._embedder([tokens[i] for i in range(num_tokens)]))
            nbytes = len(values) * values.itemsize
            if not embed or not values or size not in (nbytes, len(values)):
                return -1
            ctypes.memmove(embed, values.buffer_info()[0], nbytes)
            return 0
        except BaseException:  # nothing may propagate into the runtime's thread
            return -1

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

    def run(self, run_id: int, request: RunRequest, *, asynchronous: bool = False,
            media: MultimodalInput | None = None) -> int:
        """Calls ``rkllm_run`` (blocking: the runtime calls back from its own thread) or ``rkllm_run_async``.

        With ``media`` the input is ``RKLLM_INPUT_MULTIMODAL``: the request's prompt plus the media's embeddings.
        """
        abi, features = self._abi, self.features
        keep: list[Any] = []
        # This ABI's own RKLLMInput, zero-filled: on 1.3.1 that is the 208-byte layout whose audio block the runtime
        # reads (ABI.md "Hazard"); blocks left unset stay zero.
        rkllm_input = abi.RKLLMInput()
        if media is not None:
            rkllm_input.input_type = abi.RKLLMInputType.RKLLM_INPUT_MULTIMODAL
            self._fill_multimodal(rkllm_input.multimodal_input, request, media, keep)
        elif request.token_ids is not None:
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

    def _fill_multimodal(self, target: Any, request: RunRequest, media: MultimodalInput, keep: list[Any]) -> None:
        if request.token_ids is not None or request.embeddings is not None:
            raise InputError("a multimodal input carries a text prompt, not token ids or embeddings")
        target.prompt = request.prompt if request.prompt is not None else b""
        per_input_tags = hasattr(target, "image")  # ABI >= 1.3.0: nested image/video(/audio) blocks
        blocks = {"image": media.image, "video": media.video, "audio": media.audio}
        for kind, block in blocks.items():
            if block is None:
                continue
            if kind != "image" and not hasattr(target, kind):
                raise InputError(f"{kind} input needs ABI {'1.3.0' if kind == 'video' else '1.3.1'} or newer "
                                 f"(this library is {self._abi.ABI}).")
            expected = block.count * block.rows_per_item * block.frames_per_item
            if block.count < 0 or block.rows_per_item < 0 or block.frames_per_item < 1 or \
                    (expected and len(block.embeddings) % expected):
                raise InputError(f"the {kind} embedding holds {len(block.embeddings)} floats, not a multiple of "
                                 f"{block.count} x {block.frames_per_item} x {block.rows_per_item} rows")
            floats = (ctypes.c_float * len(block.embeddings)).from_buffer(block.embeddings)
            keep.append(floats)
            if not per_input_tags:
                if block.start is not None or block.end is not None or block.content is not None:
                    raise InputError(f"ABI {self._abi.ABI} takes the image tags once, at init.",
                                     fix="pass image_tags to NativeModel")
                if not hasattr(target, "n_image") and block.count != 1:
                    raise InputError(f"ABI {self._abi.ABI} takes one image per input (it has no n_image).")
                target.image_embed = floats
                target.n_image_tokens = block.rows_per_item
                if hasattr(target, "n_image"):
                    target.n_image, target.image_width, target.image_height = block.count, block.width, block.height
                continue
            slot = getattr(target, kind)
            setattr(slot, f"{kind}_embed", floats)
            for tag in ("start", "end", "content"):
                value = getattr(block, tag)
                setattr(slot, f"{kind}_{tag}", value.encode() if value is not None else None)
            if kind == "video":
                slot.n_frame_tokens, slot.n_frame_per_video, slot.n_video = (block.rows_per_item,
                                                                             block.frames_per_item, block.count)
                slot.frame_width, slot.frame_height = block.width, block.height
            else:
                setattr(slot, f"n_{kind}_tokens", block.rows_per_item)
                setattr(slot, f"n_{kind}", block.count)
                if kind == "image":
                    slot.image_width, slot.image_height = block.width, block.height

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
