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
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from rkedge.errors import BusyError, ContextLengthExceeded, InputError, RkedgeError
from rkedge.runtime._stream import GenerationResult, GenerationStats, GenerationStream, RunEnd, RunState, TokenHook
from rkedge.runtime.abi._common import AbiFeatures
from rkedge.runtime.backend import Backend, RuntimeInfo, TextTokenizer, TokenEmbedder, open_backend
from rkedge.runtime.chat_template import SPECIAL_TOKEN_NAMES, JinjaChatTemplate
from rkedge.runtime.images import Images, VisionChoice, locate_vision, media_refusal
from rkedge.runtime.output_parsers import OutputFormat, ToolFamily, tool_family_for
from rkedge.runtime.rkllm_backend import load_model_metadata
from rkedge.runtime.templates import TEMPLATES, ChatTemplate, get_template
from rkedge.runtime.types import InferMode, InitParams, RunEvent, RunRequest, Sampling, c_text

#: Whatever renders a conversation on the host: the model's own Jinja template, or a hand-written family.
PromptTemplate = ChatTemplate | JinjaChatTemplate

if TYPE_CHECKING:
    from rkedge.runtime.chat import ChatSession, ContextPolicy
    from rkedge.runtime.vision.bundle import VlmManifest
    from rkedge.runtime.vision.multimodal import ImageEmbeddings

log = logging.getLogger("rkedge.runtime")


class LLM:
    """A model loaded on the NPU (or the simulated NPU).

    Args:
        model_path: the ``.rkllm`` file (or an rkedge simulated model for ``library="mock"``), or an RKNN bundle
            folder.
        library: path of ``librkllmrt.so``, ``"mock"`` for the simulated NPU, or None to search.
        abi: the runtime's ABI or release (``1.1``, ``1.2.0``, ``1.2.2``, ``1.2.3``, ``1.3.0``); detected when
            the library tells, required when it does not.
        chat_template: the model's Jinja chat template (its text, or a ``.jinja`` file), or a hand-written
            family (``gemma``, ``llama3``, ``qwen2``...); default: the manifest's Hugging Face template, else its
            family. When rkedge renders (it then passes tools and thinking through the template) it turns the
            runtime's embedded template off, so nothing is templated twice; with no template the runtime
            renders, and tools and thinking go through ``rkllm_set_function_tools`` and ``enable_thinking``.
        verbose: echo the runtime's init log.
        tokenizer: a Python tokenizer (text -> ids) the runtime calls back (ABI >= 1.3.0), for a model exported
            without its tokenizer; ``embedder`` (ids -> embedding rows, row-major floats) likewise for a model
            exported without its embedding.
        vision: the vision encoder of a vision-language model: an open
            :class:`~rkedge.runtime.vision.VisionEncoder` (still the caller's to close) or its VLM folder. Not
            needed when ``model_path`` is the VLM folder or the ``.rkllm`` its ``vlm.json`` names; then the encoder
            (``vision_dtype``: which of its builds, default the manifest's) opens at the first image.
        **params: ``RKLLMParam`` fields (``max_context_len``, ``max_new_tokens``, ``top_k``, ``temperature``,
            ``base_domain_id``...).
    """

    def __init__(self, model_path: str | os.PathLike[str], library: str | os.PathLike[str] | None = None,
                 abi: str | None = None, *, chat_template: str | None = None, verbose: bool = False,
                 tokenizer: TextTokenizer | None = None, embedder: TokenEmbedder | None = None,
                 vision: VisionChoice | None = None, vision_dtype: str | None = None, **params: Any) -> None:
        self._closed = True
        self._closing = False
        self._close_pending = False  # close() was called on the runtime's thread: the run's thread finishes it
        self._state_lock = threading.RLock()  # orders run starts against close()
        self._runtime_tools: str | None = None  # the tools rkllm_set_function_tools last received
        # A VLM folder (or a .rkllm its vlm.json names, or vision= given): the language model plus its encoder.
        self.model_path, self._vision = locate_vision(Path(model_path), vision, vision_dtype)
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
        # The callbacks are passed only when given, so a backend opener that predates them keeps working.
        image_tags = self._vision.manifest.tags.as_tuple() if self._vision is not None else None
        callbacks: dict[str, Any] = {k: v for k, v in (("tokenizer", tokenizer), ("embedder", embedder),
                                                       ("image_tags", image_tags)) if v is not None}
        self._backend: Backend = open_backend(self.model_path, library, abi, init, self._on_event, verbose=verbose,
                                              **callbacks)
        backend = self._backend
        self.runtime: RuntimeInfo = backend.runtime
        self.abi: str = backend.runtime.abi
        self.features: AbiFeatures = backend.features
        self.init_log: str = backend.init_log
        self.warnings: list[str] = list(backend.warnings)
        self.metadata: dict[str, Any] = dict(backend.metadata)
        self._closed = False
        try:
            self.template: PromptTemplate | None = self._choose_template(chat_template)
        except BaseException:
            self.close()
            raise
        if self.template is not None and self.features.has_chat_template:
            # We render the whole prompt ourselves: switch the runtime's embedded template off so nothing is
            # templated twice. Done once, before any KV exists (it also clears the cache, rknn-llm#377).
            try:
                backend.set_chat_template("", "", "")
            except RkedgeError as exc:  # the model still runs; its own template may then wrap our prompts
                self.warnings.append(f"could not switch the runtime's chat template off: {exc.message}")
                log.warning(self.warnings[-1])

    def _choose_template(self, chosen: str | None) -> PromptTemplate | None:
        """The caller's template, else the manifest's Hugging Face template, else its family, else None (the
        runtime renders with the template embedded in the model)."""
        meta = self.metadata
        name = str(meta.get("name") or self.model_path.name)
        if chosen is not None and chosen not in TEMPLATES:
            source = chosen
            if "{{" not in chosen and "{%" not in chosen:
                path = Path(chosen)
                if not path.is_file():
                    get_template(chosen)  # raises: neither a family nor a template file
                source = path.read_text(encoding="utf-8")
            return JinjaChatTemplate(source, self._special_tokens(), name)
        if chosen is not None:
            return get_template(chosen)
        family = meta.get("chat_family")
        found = meta.get("chat_template")
        if not isinstance(found, str):  # a simulated model's chat_template is the runtime's three parts
            found = meta.get("jinja_chat_template")
        if isinstance(found, str) and found:
            source = found
            tokens = self._special_tokens()
            if "eos_token" in source and "eos_token" not in tokens and family in TEMPLATES:
                # Rendering without the EOS text would drop it from every finished turn: keep the family.
                self.warnings.append("the manifest has the model's chat template but not its special tokens; "
                                     f"using the hand-written {family} family (reconvert to record them)")
                log.warning(self.warnings[-1])
                return get_template(family)
            return JinjaChatTemplate(source, tokens, name)
        return get_template(family) if family else None

    def _special_tokens(self) -> dict[str, str]:
        """The manifest's special-token texts (bos_token, eos_token...), as the template's keywords."""
        found = self.metadata.get("special_tokens")
        tokens = {k: v for k, v in found.items() if k in SPECIAL_TOKEN_NAMES and isinstance(v, str)} \
            if isinstance(found, dict) else {}
        family = self.metadata.get("chat_family")
        if "bos_token" not in tokens and family in TEMPLATES and TEMPLATES[family].bos_token:
            tokens["bos_token"] = TEMPLATES[family].bos_token
        return tokens

    @property
    def renders_prompts(self) -> bool:
        """rkedge renders chat prompts (a template is known); False: the runtime's embedded template does."""
        return self.template is not None

    def output_format(self, *, tools: bool, prompt: str = "") -> OutputFormat:
        """How to read a chat reply: the tool-call syntax of this model's template (when tools were offered)
        and whether ``prompt`` left a ``<think>`` block open."""
        from rkedge.runtime.output_parsers import prompt_opens_reasoning

        family: ToolFamily | None = None
        if tools:
            template = self.template
            source = template.source if isinstance(template, JinjaChatTemplate) else None
            family = tool_family_for(source, template.family if isinstance(template, ChatTemplate) else
                                     str(self.metadata.get("chat_family") or "")) or "hermes"
        return OutputFormat(family, starts_in_reasoning=prompt_opens_reasoning(prompt))

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
    def vision(self) -> VlmManifest | None:
        """The VLM manifest of this model's vision encoder (image size, image tokens, tags), or None: no eyes."""
        return self._vision.manifest if self._vision is not None else None

    @property
    def image_placeholder(self) -> str:
        """What marks an image's place in a prompt (``<image>``)."""
        from rkedge.runtime.vision.bundle import IMAGE_PLACEHOLDER

        return self._vision.manifest.tags.placeholder if self._vision is not None else IMAGE_PLACEHOLDER

    def encode_images(self, images: Images) -> ImageEmbeddings:
        """One input's images through this model's vision encoder (preprocessed as the HF image processor).

        Raises:
            InputError: the model has no vision encoder, or the images cannot be read.
        """
        if self._vision is None:
            raise InputError(f"{self.metadata.get('name') or self.model_path.name} has no vision encoder, so it "
                             "cannot take images.",
                             fix="load the VLM folder rkedge convert wrote (vlm.json), or pass vision=FOLDER")
        if self.runtime.abi == "rknn":
            raise InputError("an RKNN bundle takes no images.", fix="use a VLM converted for librkllmrt")
        return self._vision.encode(images)

    def media_refusal(self, kind: str) -> InputError:
        """The error for ``kind`` ("video", "audio") input this model cannot take, with the reason."""
        manifest = self._vision.manifest if self._vision is not None else None
        return media_refusal(kind, manifest, self.abi, str(self.metadata.get("name") or self.model_path.name))

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
            "renders_prompts": self.renders_prompts,
            "max_context_len": self.max_context_len,
            "vision": self._vision_info(),
            "warnings": list(self.warnings),
        }

    def _vision_info(self) -> dict[str, Any] | None:
        vision = self.vision
        if vision is None:
            return None
        pre = vision.preprocessing
        return {"family": vision.family, "image_size": [pre.width, pre.height], "image_tokens": vision.image_tokens,
                "encoders": list(vision.encoders), "default_dtype": vision.default_dtype}

    # -- generation ---------------------------------------------------------------------------------------

    @overload
    def generate(self, prompt: str | None = None, *, stream: Literal[True] = ..., max_new_tokens: int | None = None,
                 stop: Sequence[str] = (), on_token: TokenHook | None = None, token_ids: Sequence[int] | None = None,
                 embeds: Any = None, mode: str = "generate", lora: str | None = None, prompt_cache: str | None = None,
                 save_prompt_cache: bool = False, role: str = "user", enable_thinking: bool = False,
                 keep_history: bool = False, top_k: int | None = None, top_p: float | None = None,
                 temperature: float | None = None, repeat_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 images: Images | None = None, videos: Sequence[Any] | None = None, audio: Any = None,
                 ) -> GenerationStream: ...

    @overload
    def generate(self, prompt: str | None = None, *, stream: Literal[False], max_new_tokens: int | None = None,
                 stop: Sequence[str] = (), on_token: TokenHook | None = None, token_ids: Sequence[int] | None = None,
                 embeds: Any = None, mode: str = "generate", lora: str | None = None, prompt_cache: str | None = None,
                 save_prompt_cache: bool = False, role: str = "user", enable_thinking: bool = False,
                 keep_history: bool = False, top_k: int | None = None, top_p: float | None = None,
                 temperature: float | None = None, repeat_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 images: Images | None = None, videos: Sequence[Any] | None = None, audio: Any = None,
                 ) -> GenerationResult: ...

    @overload
    def generate(self, prompt: str | None = None, *, stream: bool, max_new_tokens: int | None = None,
                 stop: Sequence[str] = (), on_token: TokenHook | None = None, token_ids: Sequence[int] | None = None,
                 embeds: Any = None, mode: str = "generate", lora: str | None = None, prompt_cache: str | None = None,
                 save_prompt_cache: bool = False, role: str = "user", enable_thinking: bool = False,
                 keep_history: bool = False, top_k: int | None = None, top_p: float | None = None,
                 temperature: float | None = None, repeat_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 images: Images | None = None, videos: Sequence[Any] | None = None, audio: Any = None,
                 ) -> GenerationStream | GenerationResult: ...

    def generate(self, prompt: str | None = None, *, stream: bool = True, max_new_tokens: int | None = None,
                 stop: Sequence[str] = (), on_token: TokenHook | None = None, token_ids: Sequence[int] | None = None,
                 embeds: Any = None, mode: str = "generate", lora: str | None = None, prompt_cache: str | None = None,
                 save_prompt_cache: bool = False, role: str = "user", enable_thinking: bool = False,
                 keep_history: bool = False, top_k: int | None = None, top_p: float | None = None,
                 temperature: float | None = None, repeat_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 images: Images | None = None, videos: Sequence[Any] | None = None, audio: Any = None,
                 ) -> GenerationStream | GenerationResult:
        """Runs the model on ``prompt`` (sent as is: no chat template; use :meth:`chat_session` for chat), on
        ``token_ids``, or on ``embeds`` (input embeddings: rows of floats, or a 2-D array, one row per position).

        Per-run sampling and ``max_new_tokens`` are applied on ABI 1.3.0; older ABIs fix them at init and
        refuse per-run values that differ (they would be silently ignored otherwise). ``mode="hidden"`` or
        ``"logits"`` returns every position the runtime gives in ``result.values`` (``num_tokens x width``).

        ``images`` (a vision-language model): image files' bytes, paths, PIL images or HxWx3 uint8 arrays (or
        :class:`~rkedge.runtime.vision.ImageEmbeddings` already encoded), run through the model's vision encoder
        and sent with ``prompt`` as one multimodal input; ``prompt`` holds one ``<image>`` per image where it
        should be, or none (they go in front). ``videos`` and ``audio`` are refused with the reason (no converted
        encoder takes them).
        """
        media = None
        if videos is not None or audio is not None:
            raise self.media_refusal("video" if videos is not None else "audio")
        if images is not None:
            if token_ids is not None or embeds is not None:
                raise InputError("images go with a text prompt, not with token_ids or embeds.",
                                 fix="pass the prompt as text")
            encoded = self.encode_images(images)
            prompt, media = encoded.prompt(prompt or ""), encoded.media(self.abi)
        embeddings, embed_tokens = _embedding_rows(embeds) if embeds is not None else (None, 0)
        request = RunRequest(
            media=media,
            prompt=c_text(prompt, "the prompt") if prompt is not None else None,
            token_ids=list(token_ids) if token_ids is not None else None,
            embeddings=embeddings, embed_tokens=embed_tokens,
            role=role, enable_thinking=enable_thinking, mode=_mode(mode), lora_name=lora,
            prompt_cache_path=prompt_cache, save_prompt_cache=save_prompt_cache, keep_history=keep_history,
            sampling=Sampling(top_k=top_k, top_p=top_p, temperature=temperature, repeat_penalty=repeat_penalty,
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty),
            max_new_tokens=max_new_tokens)
        result = self.run(request, stop=stop, on_token=on_token)
        return result if stream else result.collect()

    def run(self, request: RunRequest, *, owner: object | None = None, stop: Sequence[str] = (),
            on_token: TokenHook | None = None, on_done: Callable[[GenerationResult], None] | None = None,
            output: OutputFormat | None = None) -> GenerationStream:
        """Starts one run of ``request`` and returns its stream (what :meth:`generate` and chat sessions use).

        Args:
            owner: whose conversation a ``keep_history`` run leaves in the KV cache (a chat session passes
                itself). A run for another owner first clears the cache, so no conversation continues another's.
            stop: stop strings (the text ends before the first one found).
            on_token: called on the runtime's thread with each token's text; True stops the run.
            on_done: called with the result once the run has ended, before the stream's last chunk is returned.
            output: how to parse the reply into content, reasoning and tool calls (:meth:`output_format`).

        Raises:
            BusyError: a run is already in progress on this model.
            InputError: the request asks for something this backend or ABI cannot do.
        """
        if request.prompt is None and request.token_ids is None and request.embeddings is None:
            raise InputError("nothing to generate from: pass a prompt, token_ids or embeds")
        _check_c_strings(request)
        with self._state_lock:
            if self._closed or self._closing:
                raise RkedgeError("this LLM is closed.", fix="create a new LLM")
            self._check_request(request)
            if not self._lock.acquire(blocking=False):
                raise BusyError("a generation is already running on this model; the NPU serves one at a time.",
                                fix="wait for it to finish (or abort it), or queue requests (rkedge serve does)")
            try:
                if self._kv_owner is not None and self._kv_owner is not owner and \
                        self.features.clear_kv_cache_arity:
                    self._backend.clear_kv_cache(False)
                    self._kv_owner = None
                self._next_run += 1
                limit = request.max_new_tokens if (request.max_new_tokens and self.features.has_sampling_params) \
                    else self.max_new_tokens
                run = RunState(self._next_run, limit, on_token)
                self._runs[run.run_id] = run
                stream = GenerationStream(self, run, stop, on_done, output)
                thread = threading.Thread(target=self._run_backend, args=(run, request), daemon=True,
                                          name=f"rkedge-run-{run.run_id}")
                self._active = (run, thread)
                run.kv_owner = owner if request.keep_history else None
                thread.start()
                return stream
            except BaseException:
                self._active = None
                self._lock.release()
                raise

    def _start(self, request: RunRequest, *, stop: Sequence[str] = (), on_token: TokenHook | None = None,
               owner: object | None = None, on_done: Callable[[GenerationResult], None] | None = None
               ) -> GenerationStream:
        """Kept for callers written before :meth:`run` existed (the server); use :meth:`run`."""
        return self.run(request, owner=owner, stop=stop, on_token=on_token, on_done=on_done)

    def _check_request(self, request: RunRequest) -> None:
        features = self.features
        if request.media is not None:
            self._check_media(request)
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

    def _check_media(self, request: RunRequest) -> None:
        from rkedge.runtime.vision.multimodal import tags_at_init

        if self.runtime.abi == "rknn":
            raise InputError("an RKNN bundle takes no images.", fix="use a VLM converted for librkllmrt")
        if request.prompt is None:
            raise InputError("a multimodal input needs its text prompt (one <image> per image).",
                             fix="pass a prompt with the images")
        media = request.media
        assert media is not None
        if media.image is not None and tags_at_init(self.abi) and self._vision is None:
            # Up to 1.2.3 the runtime learns the image tags at init only: a model loaded without them cannot
            # place the rows in the prompt.
            raise InputError(f"ABI {self.abi} takes the image tags at init, and this model was loaded without a "
                             "vision encoder.", fix="load the VLM folder (or pass vision=) when creating the LLM")

    def _run_backend(self, run: RunState, request: RunRequest) -> None:
        try:
            # A close() that came first aborted this run before the runtime saw it: do not start it.
            rc = 0 if run.aborted else self._backend.run(run.run_id, request)
            run.events.put(RunEnd(rc))
        except BaseException as exc:  # reported to the consumer
            run.events.put(RunEnd(-1, exc))
        finally:
            run.ended.set()
            if self._close_pending:  # close() was called from a token hook: free the model now the run is over
                self._finish_close()

    def _on_event(self, run_id: int, event: RunEvent) -> int:
        """Runs on the runtime's thread for every callback; returns the callback's int."""
        run = self._runs.get(run_id)
        if run is None:
            return 0
        _callback_thread.run = run
        try:
            return run.on_event(event)
        finally:
            _callback_thread.run = None

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

    def pause(self) -> None:
        """Pauses the running generation at its next token (ABI >= 1.2.1): it ends with ``finish_reason ==
        "pause"`` and the KV cache keeps it; the next run (:meth:`resume`) continues on that cache."""
        if not self.can_pause:
            raise InputError(f"pause needs ABI 1.2.1 or newer (this library is {self.abi}).")
        active = self._active
        if active is not None:
            active[0].pause_requested = True

    def resume(self, prompt: str = "", *, stop: Sequence[str] = (), on_token: TokenHook | None = None,
               max_new_tokens: int | None = None) -> GenerationStream:
        """Continues after a paused run: a run on the cache the pause kept (``prompt`` is added to it; the
        runtime's resume takes a new input, UNKNOWN whether an empty one means "go on" on librkllmrt)."""
        return self.generate(prompt, stop=stop, on_token=on_token, max_new_tokens=max_new_tokens)

    def is_running(self) -> bool:
        return self._backend.is_running() if not self._closed else False

    # -- sessions, caches, adapters -------------------------------------------------------------------------

    def chat_session(self, system: str | None = None, *, context_policy: ContextPolicy = "error") -> ChatSession:
        """A conversation on this model; ``context_policy``: what to do when it outgrows the context."""
        from rkedge.runtime.chat import ChatSession

        return ChatSession(self, system=system, context_policy=context_policy)

    def clear_kv_cache(self, keep_system_prompt: bool = False, start: Sequence[int] | None = None,
                       end: Sequence[int] | None = None) -> None:
        """Clears the KV cache; ``start``/``end`` (one position per batch, ABI >= 1.2.1): only that range,
        which the runtime allows while a run is paused with ``keep_history`` off (SEMANTICS.md)."""
        ranged = start is not None or end is not None
        if ranged and self.features.clear_kv_cache_arity < 4:
            raise InputError(f"ranged KV cache clears need ABI 1.2.1 or newer (this library is {self.abi}).")
        if ranged and (start is None or end is None or len(start) != len(end)):
            raise InputError("pass start and end positions together, one per batch")
        if self.features.clear_kv_cache_arity == 0:
            return  # ABI 1.1 keeps no history between runs
        if ranged:
            assert start is not None and end is not None
            self._backend.clear_kv_cache(keep_system_prompt, list(start), list(end))
            return  # what is left is still the same conversation's
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
        """The runtime's own tool calling (ABI >= 1.2.1), for when the runtime renders the prompt."""
        tools_json = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        for text, what in ((system_prompt, "the system prompt"), (tools_json, "the tools"),
                           (tool_response_str, "tool_response_str")):
            c_text(text, what)
        self._backend.set_function_tools(system_prompt, tools_json, tool_response_str)
        self._runtime_tools = tools_json

    @property
    def runtime_tools(self) -> str | None:
        """The tools JSON ``rkllm_set_function_tools`` last received (None: never set)."""
        return self._runtime_tools

    # -- lifetime -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Aborts a running generation, waits for it, and frees the model. Safe to call twice, from any thread,
        while another thread starts a generation, and from inside a token hook (the model is then freed as
        soon as the run has ended, by the run's own thread: waiting there would wait for itself)."""
        with self._state_lock:
            if self._closed or self._closing:
                return
            self._closing = True
            active = self._active
        if active is None:
            self._finish_close()
            return
        run, thread = active
        run.aborted = True
        if getattr(_callback_thread, "run", None) is not None or thread is threading.current_thread():
            self._close_pending = True
            self._backend.abort()
            if run.ended.is_set():
                self._finish_close()
            return
        deadline = time.monotonic() + 30
        while thread.is_alive() and time.monotonic() < deadline:
            # Repeated: an abort that lands before the runtime started the run does nothing.
            self._backend.abort()
            thread.join(timeout=0.05)
        self._finish_close()

    def _finish_close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._close_pending = False
            self._backend.close()
            if self._vision is not None:
                self._vision.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


#: Set on the runtime's thread while a callback of ours runs (so close() knows not to wait for the run).
_callback_thread = threading.local()


def _check_c_strings(request: RunRequest) -> None:
    """Every text reaches C as a NUL-terminated string: a NUL would cut it there, silently."""
    if request.prompt is not None and b"\x00" in request.prompt:
        raise InputError("the prompt contains a NUL character; the runtime takes C strings and would cut it there.",
                         fix="remove NUL (\\x00) characters from the prompt")
    for value, what in ((request.role, "role"), (request.lora_name, "lora"),
                        (request.prompt_cache_path, "prompt_cache")):
        if value is not None:
            c_text(value, what)


def _embedding_rows(embeds: Any) -> tuple[array[float], int]:
    """Input embeddings as float32 values and their number of positions (rows)."""
    shape = getattr(embeds, "shape", None)
    if shape is not None:  # a numpy-like array, without importing numpy
        if len(shape) != 2 or not shape[0] or not shape[1]:
            raise InputError(f"embeds must be 2-D (positions x hidden size), not shape {tuple(shape)}")
        rows = [list(map(float, row)) for row in embeds.tolist()]
    else:
        rows = [list(map(float, row)) for row in embeds]
    if not rows or not rows[0]:
        raise InputError("embeds is empty: pass one row of floats per input position")
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        raise InputError("every embedding row must have the same length (the model's hidden size)")
    values = array("f")
    for row in rows:
        values.extend(row)
    return values, len(rows)


def _mode(name: str) -> InferMode:
    modes = {"generate": InferMode.GENERATE, "hidden": InferMode.GET_LAST_HIDDEN_LAYER,
             "last_hidden_layer": InferMode.GET_LAST_HIDDEN_LAYER, "logits": InferMode.GET_LOGITS}
    try:
        return modes[name]
    except KeyError:
        raise InputError(f"unknown mode {name!r}; use generate, hidden or logits") from None


__all__ = ["LLM", "GenerationStream", "GenerationResult", "GenerationStats", "ContextLengthExceeded", "TokenHook",
           "load_model_metadata"]
