"""The rkllm backend: ``librkllmrt.so`` (or the simulated NPU) behind :class:`~rkedge.runtime.backend.Backend`.

It selects the library and its ABI, refuses a simulated model on a real runtime before ``rkllm_init``, scans
the init log against the failure catalogue, and turns every return code of :class:`NativeModel` into a
typed error once, so :class:`~rkedge.runtime.llm.LLM` never compares an int.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from rkedge import failures
from rkedge.errors import GenerationError, InputError, ModelFileError, RkedgeError, RuntimeInitError
from rkedge.manifest import Manifest, read_manifest
from rkedge.modelfile import check_model_file
from rkedge.runtime._stderr import capture_native_stderr, echo_to_stderr
from rkedge.runtime.abi._common import AbiFeatures
from rkedge.runtime.abi._native import NativeLibrary, NativeModel
from rkedge.runtime.backend import EventHandler, RuntimeInfo, TextTokenizer, TokenEmbedder
from rkedge.runtime.library import resolve_library
from rkedge.runtime.simmodel import is_simulated_model, read_simulated_model
from rkedge.runtime.types import InitParams, RunRequest

log = logging.getLogger("rkedge.runtime")


def _readable_manifest(model_path: Path) -> Manifest | None:
    """The model's manifest, or None when it has none or it cannot be read (then with a warning: the model still
    runs, without its template family)."""
    try:
        return read_manifest(model_path)
    except RkedgeError as exc:
        log.warning("ignoring the manifest of %s: %s", model_path, exc.message)
        return None


def load_model_metadata(model_path: Path, manifest: Manifest | None | Literal["read"] = "read") -> dict[str, Any]:
    """What the model's files say: a simulated model's own header, else its manifest (``<file>.json``; pass it
    when already read).

    The manifest's recommended runtime settings are merged in under their own names (``recommended``) where
    the manifest has no key of that name. An unreadable or incompatible manifest is ignored with a warning: the
    model still runs, without its template family.
    """
    if is_simulated_model(model_path):
        return read_simulated_model(model_path)
    if manifest == "read":
        manifest = _readable_manifest(model_path)
    if manifest is None:
        return {}
    data = manifest.to_dict()
    runtime = manifest.runtime or {}
    return {**data, **{k: v for k, v in runtime.items() if k not in data}}


class RkllmBackend:
    """One ``LLMHandle`` of the library the ABI selection picked."""

    def __init__(self, model_path: Path, library: str | os.PathLike[str] | None, abi: str | None, params: InitParams,
                 on_event: EventHandler, *, verbose: bool = False, tokenizer: TextTokenizer | None = None,
                 embedder: TokenEmbedder | None = None, image_tags: tuple[str, str, str] | None = None) -> None:
        chosen = resolve_library(library, abi)
        self.runtime = RuntimeInfo(chosen.path, chosen.abi, chosen.runtime_version, chosen.selected_by,
                                   chosen.simulated)
        manifest = _readable_manifest(model_path)
        if manifest is not None:
            # Refused, not warned: a manifest of another conversion would feed this model the wrong chat template,
            # special tokens and context limit without a word (issue 11 item 8). A model with no manifest (a
            # vendor .rkllm) still runs; size and name only here, hashing gigabytes is doctor's job.
            check_model_file(manifest, model_path)
        self.metadata: Mapping[str, Any] = load_model_metadata(model_path, manifest)
        if is_simulated_model(model_path) and not chosen.simulated:
            raise ModelFileError(
                f"{model_path} is an rkedge simulated model (written without rkllm-toolkit, no weights); "
                f"the real runtime {chosen.path} cannot load it.",
                fix="run it on the simulated NPU (--mock), or convert the checkpoint with the real rkllm-toolkit "
                "(rkedge convert --toolkit PYTHON)",
            )
        native_library = NativeLibrary.load(chosen.path, chosen.abi)
        self.features: AbiFeatures = native_library.features
        abi_module = native_library.abi
        present = {name for struct in (abi_module.RKLLMParam, abi_module.RKLLMExtendParam)
                   for name, *_ in struct._fields_}
        params = params.with_defaults_for(present)
        # Up to 1.2.3 the image tags are RKLLMParam fields; from 1.3.0 they travel with each multimodal input.
        init_tags = image_tags if "img_content" in present else None
        with capture_native_stderr() as captured:
            self._native = NativeModel(native_library, str(model_path), params, on_event,
                                       tokenizer=_bytes_tokenizer(tokenizer) if tokenizer is not None else None,
                                       embedder=embedder, image_tags=init_tags)
        self.init_log: str = captured.text
        error = failures.first_error(self.init_log, "runtime")
        if verbose or error or self._native.init_rc != 0:
            echo_to_stderr(self.init_log)
        self.warnings: list[str] = [f"{m.id}: {m.message} (fix: {m.fix or ''})"
                                    for m in failures.scan(self.init_log, "runtime") if m.severity == "warning"]
        for warning in self.warnings:
            log.warning(warning)
        if error is not None or self._native.init_rc != 0 or not self._native.alive:
            self._native.destroy()
            raise self._init_error(error)

    def _init_error(self, match: failures.FailureMatch | None) -> RuntimeInitError:
        if match is not None:
            return RuntimeInitError(f"rkllm_init failed: {match.message} ({match.id}). Runtime said: {match.line}",
                                    fix=match.fix or "", failure=match.id, log=self.init_log)
        said = "; ".join(line for line in self.init_log.splitlines() if line.startswith(("E ", "W "))) or "nothing"
        return RuntimeInitError(
            f"rkllm_init failed (returned {self._native.init_rc}). Runtime said: {said}",
            fix="run `rkedge doctor --model FILE --trial-init` on the board for a diagnosis",
            log=self.init_log)

    @property
    def init_values(self) -> Mapping[str, Any]:
        return self._native.init_values

    @property
    def encode(self) -> Callable[[str], list[int]] | None:
        return None  # the tokenizer is inside librkllmrt

    # -- runs -------------------------------------------------------------------------------------------------

    def run(self, run_id: int, request: RunRequest) -> int:
        return self._native.run(run_id, request, media=request.media)

    def forget_run(self, run_id: int) -> None:
        self._native.forget_run(run_id)

    def abort(self) -> None:
        # rkllm_abort's code carries nothing to act on: without a run (or a handle) there is nothing to stop.
        self._native.abort()

    def is_running(self) -> bool:
        return self._native.is_running()

    # -- cache, templates, adapters ---------------------------------------------------------------------------

    def clear_kv_cache(self, keep_system_prompt: bool = False, start: list[int] | None = None,
                       end: list[int] | None = None) -> None:
        if self._native.clear_kv_cache(keep_system_prompt, start, end) != 0:
            if start is not None:
                raise GenerationError("rkllm_clear_kv_cache refused the range (the runtime clears ranges only "
                                      "while a run is paused with keep_history off)",
                                      fix="pause a run without keep_history first, or clear the whole cache")
            raise GenerationError("rkllm_clear_kv_cache failed (is a generation running?)",
                                  fix="wait for the running generation to end, or abort it")

    def kv_cache_sizes(self, batches: int = 1) -> list[int] | None:
        return self._native.kv_cache_sizes(batches)

    def load_lora(self, path: str, name: str, scale: float) -> None:
        with capture_native_stderr() as captured:
            rc = self._native.load_lora(path, name, scale)
        if rc != 0:
            echo_to_stderr(captured.text)
            raise InputError(f"rkllm_load_lora refused {path} (returned {rc}): {captured.text.strip() or 'no message'}",
                             fix="the adapter must be converted by the same toolkit for this base model")

    def load_prompt_cache(self, path: str) -> None:
        with capture_native_stderr() as captured:
            rc = self._native.load_prompt_cache(path)
        if rc != 0:
            raise InputError(f"rkllm_load_prompt_cache refused {path}: {captured.text.strip() or rc}",
                             fix="pass a prompt cache saved by this model (save_prompt_cache=True)")

    def release_prompt_cache(self) -> None:
        # 0 or not, the cache is gone or was never there: nothing the caller could do differently.
        self._native.release_prompt_cache()

    def set_chat_template(self, system_prompt: str, prefix: str, postfix: str) -> None:
        if self._native.set_chat_template(system_prompt, prefix, postfix) != 0:
            raise GenerationError("rkllm_set_chat_template failed (is a generation running?)",
                                  fix="set the template before generating, with no run in progress")

    def set_function_tools(self, system_prompt: str, tools_json: str, tool_response_str: str) -> None:
        if self._native.set_function_tools(system_prompt, tools_json, tool_response_str) != 0:
            # InputError, as it always was: what the runtime refuses here is the caller's tool list (UNKNOWN
            # whether librkllmrt also fails it during a run).
            raise InputError("rkllm_set_function_tools failed", fix="pass a JSON list of tool definitions")

    def close(self) -> None:
        self._native.destroy()


def _bytes_tokenizer(tokenizer: TextTokenizer) -> Callable[[bytes], Sequence[int]]:
    """The runtime hands UTF-8 bytes; a Python tokenizer takes text."""
    def tokenize(text: bytes) -> Sequence[int]:
        return tokenizer(text.decode("utf-8", "replace"))

    return tokenize


__all__ = ["RkllmBackend", "load_model_metadata"]
