"""Plain-Python values that cross the library seam (no ctypes here).

The ABI layer (:mod:`rkedge.runtime.abi._native`) copies everything out of C memory into these before
the callback returns: ``result`` and ``result->text`` are only valid during the call (SEMANTICS.md).
"""

from __future__ import annotations

from array import array
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from rkedge.errors import InputError

if TYPE_CHECKING:
    from rkedge.runtime.abi._native import MultimodalInput


class CallState(IntEnum):
    """The runtime's ``LLMCallState``; ``HIDDEN_LAYER`` (4) exists in ABI 1.1 only."""

    NORMAL = 0
    WAITING = 1
    FINISH = 2
    ERROR = 3
    HIDDEN_LAYER = 4


class InferMode(IntEnum):
    GENERATE = 0
    GET_LAST_HIDDEN_LAYER = 1
    GET_LOGITS = 2


@dataclass(frozen=True)
class PerfStats:
    """``RKLLMPerfStat`` (ABI >= 1.2.1), reported with FINISH."""

    prefill_time_ms: float
    prefill_tokens: int
    generate_time_ms: float
    generate_tokens: int
    memory_usage_mb: float


class RunEvent(NamedTuple):
    """One result callback, copied out of C memory."""

    state: int
    text: bytes | None
    token_id: int
    perf: PerfStats | None = None
    values: array[float] | None = None  # logits or hidden states, row-major num_tokens x width
    num_tokens: int = 0
    width: int = 0


@dataclass(frozen=True)
class Sampling:
    """Per-run ``RKLLMSamplingParam`` (ABI 1.3.0). Unset fields take the init-time value."""

    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None

    def is_empty(self) -> bool:
        """No sampling field is set."""
        return all(getattr(self, f.name) is None for f in fields(Sampling))


@dataclass(frozen=True)
class InitParams(Sampling):
    """Fields of ``RKLLMParam`` (and its ``extend_param``). ``None`` keeps ``rkllm_createDefaultParam``'s value.

    The sampling fields are :class:`Sampling`'s (``RKLLMParam`` holds the same nine as ``RKLLMSamplingParam``);
    fields a given ABI lacks are refused when set (a value must never be silently dropped).
    """

    max_context_len: int | None = 4096
    max_new_tokens: int | None = 1024
    skip_special_token: bool | None = True
    ignore_eos_token: bool | None = None
    n_keep: int | None = None
    base_domain_id: int | None = None
    embed_flash: int | None = None
    enabled_cpus_num: int | None = None
    enabled_cpus_mask: int | None = None
    n_batch: int | None = None

    EXTEND_FIELDS: ClassVar[tuple[str, ...]] = ("base_domain_id", "embed_flash", "enabled_cpus_num",
                                                "enabled_cpus_mask", "n_batch")
    #: Set explicitly on ABIs whose struct has the field, when the caller leaves it unset. ``embed_flash = 1``
    #: (the runtime reads the embedding table from storage instead of holding it in RAM): Rockchip's 1.3.0
    #: server sets it (/work/shared/rkllm-abi/SEMANTICS.md, "Call flow"; its llm_demo.cpp does too), the
    #: runtime's own default is not public (SEMANTICS.md: defaults unknown), and ``rkedge plan`` counts no
    #: resident embedding from 1.2.0 on (convert/perf_model.py). Explicit, so the board does what the plan says.
    DEFAULTS_WHERE_PRESENT: ClassVar[dict[str, int]] = {"embed_flash": 1}

    def with_defaults_for(self, present: Collection[str]) -> InitParams:
        """These params with :attr:`DEFAULTS_WHERE_PRESENT` filled in for the unset fields in ``present`` (the
        fields the ABI's ``RKLLMParam``/``RKLLMExtendParam`` have); ABIs without them are left as they are."""
        missing: dict[str, Any] = {name: value for name, value in self.DEFAULTS_WHERE_PRESENT.items()
                                   if name in present and getattr(self, name) is None}
        return replace(self, **missing) if missing else self

    def items(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]


@dataclass
class RunRequest:
    """One ``rkllm_run``: the input and ``RKLLMInferParam``."""

    prompt: bytes | None = None
    token_ids: list[int] | None = None
    embeddings: array[float] | None = None  # float32, n_tokens x hidden
    embed_tokens: int = 0
    role: str | None = "user"
    enable_thinking: bool = False
    mode: InferMode = InferMode.GENERATE
    lora_name: str | None = None
    prompt_cache_path: str | None = None
    save_prompt_cache: bool = False
    keep_history: bool = False
    sampling: Sampling | None = None
    max_new_tokens: int | None = None
    #: Image (video, audio) embeddings: the run is ``RKLLM_INPUT_MULTIMODAL``, its text the prompt, which holds
    #: one placeholder per item (:mod:`rkedge.runtime.vision.multimodal`).
    media: MultimodalInput | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def c_text(text: str, what: str) -> bytes:
    """``text`` as the NUL-terminated UTF-8 string C receives, refusing what such a string cannot carry: a NUL
    (C would end the string there, silently dropping the rest) or a lone surrogate (not encodable as UTF-8)."""
    if "\x00" in text:
        raise InputError(f"{what} contains a NUL character; the runtime takes C strings and would cut it there.",
                         fix="remove NUL (\\x00) characters")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} is not valid Unicode text ({exc.reason} at position {exc.start}).",
                         fix="send UTF-8 text (no lone surrogates)") from None
