"""The seam under :class:`~rkedge.runtime.llm.LLM`: what runs a model, whichever engine it is.

Two implementations: :class:`~rkedge.runtime.rkllm_backend.RkllmBackend` (``librkllmrt.so`` or the simulated NPU,
through the ctypes ABI of its version) and :class:`~rkedge.runtime.rknn.engine.RknnModel` (an RKNN bundle on
RKNNLite or the rknn-toolkit2 simulator). :func:`open_backend` picks one from the model path.

Contract: ``run`` blocks on the caller's thread (LLM calls it from its own worker thread) and reports every
token through the ``on_event`` handler given at open, with the run id; every other method either does what
it says or raises a :class:`~rkedge.errors.RkedgeError` that says why: return codes stop at the backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rkedge.errors import InputError, LibraryNotFoundError, ModelFileError
from rkedge.runtime.abi._common import AbiFeatures
from rkedge.runtime.types import InitParams, RunEvent, RunRequest

#: Called for every callback: (run id, event) -> the int to return to the runtime (0 go on, 1 pause).
EventHandler = Callable[[int, RunEvent], int]


@dataclass(frozen=True)
class RuntimeInfo:
    """What runs the model, as ``LLM.info()`` and the CLIs show it."""

    path: Path  # the runtime library, or the bundle folder for RKNN
    abi: str  # an rkllm ABI ("1.2.1"...) or "rknn"
    runtime_version: str | None
    selected_by: str  # how it was chosen (an --abi flag, the file's version string...; for RKNN, which engine)
    simulated: bool  # the simulated NPU or the rknn-toolkit2 simulator, not a board's NPU


class Backend(Protocol):
    """A loaded model that can run one generation at a time."""

    @property
    def runtime(self) -> RuntimeInfo: ...

    @property
    def features(self) -> AbiFeatures:
        """What this backend can do (the ABI's feature table; RKNN declares its own)."""
        ...

    @property
    def init_values(self) -> Mapping[str, Any]:
        """The init-time parameters as the runtime holds them (what per-run values are compared with)."""
        ...

    @property
    def init_log(self) -> str: ...

    @property
    def warnings(self) -> list[str]:
        """Known problems found in the init log that did not stop the model from loading."""
        ...

    @property
    def metadata(self) -> Mapping[str, Any]:
        """What the model's own files say about it (its manifest, or a simulated model's header); may be empty."""
        ...

    @property
    def encode(self) -> Callable[[str], list[int]] | None:
        """The tokenizer, where it runs on the host (RKNN); None where it is inside the runtime."""
        ...

    def run(self, run_id: int, request: RunRequest) -> int:
        """One generation, blocking; the runtime's return code (non-zero after an abort is expected)."""
        ...

    def forget_run(self, run_id: int) -> None: ...

    def abort(self) -> None: ...

    def is_running(self) -> bool: ...

    def clear_kv_cache(self, keep_system_prompt: bool = False, start: list[int] | None = None,
                       end: list[int] | None = None) -> None:
        """Clears the cache, or only positions ``start[i]..end[i]`` of each batch where the runtime can."""
        ...

    def kv_cache_sizes(self, batches: int = 1) -> list[int] | None:
        """Tokens held per batch, or None when this backend cannot tell."""
        ...

    def load_lora(self, path: str, name: str, scale: float) -> None: ...

    def load_prompt_cache(self, path: str) -> None: ...

    def release_prompt_cache(self) -> None: ...

    def set_chat_template(self, system_prompt: str, prefix: str, postfix: str) -> None: ...

    def set_function_tools(self, system_prompt: str, tools_json: str, tool_response_str: str) -> None: ...

    def close(self) -> None:
        """Frees the model (NPU memory, handles). Safe to call twice."""
        ...


#: The 1.3.0 tokenizer callback: text (after the runtime's chat template) -> token ids.
TextTokenizer = Callable[[str], Sequence[int]]
#: The 1.3.0 embedding callback: token ids -> their embedding rows, row-major floats.
TokenEmbedder = Callable[[Sequence[int]], Sequence[float]]


def open_backend(model_path: Path, library: str | os.PathLike[str] | None, abi: str | None, params: InitParams,
                 on_event: EventHandler, *, verbose: bool = False, tokenizer: TextTokenizer | None = None,
                 embedder: TokenEmbedder | None = None, image_tags: tuple[str, str, str] | None = None) -> Backend:
    """The backend for ``model_path``: an RKNN bundle folder, else a ``.rkllm`` (or simulated model) file.

    ``tokenizer``/``embedder``: Python callbacks the runtime calls for a model exported without its tokenizer or
    embedding (librkllmrt ABI >= 1.3.0). ``image_tags`` (start, end, content): a vision-language model's tags,
    set at init on the ABIs that take them there (up to 1.2.3)."""
    from rkedge.runtime.rknn.bundle import is_rknn_bundle

    if is_rknn_bundle(model_path):
        if tokenizer is not None or embedder is not None:
            raise InputError("tokenizer and embedding callbacks are librkllmrt's (ABI 1.3.0); an RKNN bundle "
                             "carries its own tokenizer and embedding table.", fix="drop tokenizer=/embedder=")
        try:
            from rkedge.runtime.rknn.engine import RknnModel
        except ImportError as exc:
            raise LibraryNotFoundError(f"the RKNN backend needs numpy ({exc}).",
                                       fix="pip install 'rkedge[rknn-board]' (numpy, tokenizers, and on aarch64 "
                                           "rknn-toolkit-lite2)") from None
        if image_tags is not None:
            raise InputError("an RKNN bundle takes no images (only librkllmrt runs a VLM's language model).",
                             fix="load the VLM folder's .rkllm")
        return RknnModel(model_path, str(library) if library is not None else None, params, on_event, verbose=verbose)
    if model_path.is_dir():
        raise ModelFileError(f"{model_path} is a folder without bundle.json, so not an RKNN bundle.",
                             fix="pass a .rkllm file, or the folder rkedge convert --backend rknn wrote")
    if not model_path.is_file():
        raise ModelFileError(f"model file not found: {model_path}",
                             fix="pass the path of a .rkllm file (or create a simulated one: rkedge mock-model)")
    from rkedge.runtime.rkllm_backend import RkllmBackend

    return RkllmBackend(model_path, library, abi, params, on_event, verbose=verbose, tokenizer=tokenizer,
                        embedder=embedder, image_tags=image_tags)


__all__ = ["Backend", "EventHandler", "RuntimeInfo", "TextTokenizer", "TokenEmbedder", "open_backend"]
