"""The failure catalogue: every known way a conversion or a board run fails, what it means, and what to do.

One record type for every entry, one :func:`scan` for logs. ``where`` says whose text it is:

- ``toolkit``: a text rkllm-toolkit (or the pip/Python around it) prints; read from the conversion log.
- ``runtime``: a text ``librkllmrt`` prints on stderr; read from the init log by ``LLM`` and by
  ``rkedge doctor --trial-init`` (``rkllm_init`` on 1.1.x returns 0 after some of them, SEMANTICS.md).
- ``plan``: a rule the planner checks before any heavy work (no text to match, ``pattern`` is None); its
  ``applies`` says for which architectures, platforms, toolkit versions and settings.
- ``board``: a fact about the board that ``rkedge doctor`` checks (none is catalogued as a text yet).

Sources: shared/knowledge/converter-anchors-and-failure-modes.md (section 3 and the failure catalogue F-1 to
F-14, abbreviated ``CATALOGUE``), with the issue each text or rule comes from. ``text`` is the line as the tool
prints it, with ``{name}`` for the variable parts; the simulated toolkit and NPU print exactly that text, and the
tests check that every ``text`` matches its own ``pattern`` and that the C simulator's strings match the
catalogue. Where no vendor text is known, the simulated toolkit prints ``ERROR: [rkedge simulated toolkit]
<id>: <message>`` (:func:`simulated_toolkit_text`), which never passes for a vendor message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from rkedge.versions import version_between, version_key

Where = Literal["toolkit", "runtime", "plan", "board"]
Severity = Literal["error", "warning", "info"]
#: What a plan rule decides: refuse an architecture outright, refuse a combination known to fail on the board,
#: add the toolkit's own words to "needs a newer toolkit", or reject a config value an old toolkit cannot read.
PlanKind = Literal["refused-architecture", "board-failure", "toolkit-too-old", "config"]
#: The simulators that print an entry's ``text`` (the tests hold them to it).
Simulator = Literal["simulated-npu", "simulated-toolkit"]

CATALOGUE = "converter-anchors-and-failure-modes.md"
S33 = f"{CATALOGUE} section 3.3 / Appendix A"


@dataclass(frozen=True)
class Applies:
    """When a plan rule applies; an empty field places no condition."""

    architectures: tuple[str, ...] = ()  # config.json architectures[0]
    model_types: tuple[str, ...] = ()  # used when the config names no architecture
    platforms: tuple[str, ...] = ()
    toolkit_first: str | None = None  # inclusive
    toolkit_last: str | None = None  # inclusive
    toolkit_below: str | None = None  # exclusive
    #: The one configuration that works: these dtypes with hybrid_rate 0 (the rule does not apply to it).
    unless_plain: tuple[str, ...] = ()
    #: Config values that trigger the rule, as (dotted key, value), e.g. ("rope_scaling.rope_type", "llama3").
    config: tuple[tuple[str, str], ...] = ()

    def names(self, architecture: str | None, model_type: str | None) -> bool:
        """The architecture is listed, or, for a config that names none, its model_type is."""
        if architecture:
            return architecture in self.architectures
        return model_type is not None and model_type in self.model_types

    def matches(self, *, architecture: str | None = None, model_type: str | None = None,
                platform: str | None = None, toolkit_version: str | None = None, dtype: str | None = None,
                hybrid_rate: float | None = None, config: Mapping[str, Any] | None = None) -> bool:
        if (self.architectures or self.model_types) and not self.names(architecture, model_type):
            return False
        if self.platforms and platform not in self.platforms:
            return False
        if self.toolkit_first or self.toolkit_last or self.toolkit_below:
            if toolkit_version is None or not version_between(toolkit_version, self.toolkit_first, self.toolkit_last):
                return False
            if self.toolkit_below and version_key(toolkit_version) >= version_key(self.toolkit_below):
                return False
        if self.unless_plain and dtype in self.unless_plain and hybrid_rate == 0:
            return False
        return all(_config_value(config or {}, key) == value for key, value in self.config)


def _config_value(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


@dataclass(frozen=True)
class KnownFailure:
    """One catalogue entry. ``id`` is the failure mode reported (several entries share one, e.g. F-2's two
    wordings); ``key`` names the entry itself."""

    key: str
    id: str
    where: Where
    pattern: str | None  # a regex searched in each log line; None for plan rules
    severity: Severity
    message: str  # may use the pattern's named groups
    fix: str | None  # may use the pattern's named groups
    source: str
    text: str | None = None  # the line as the tool prints it ({name}: the variable parts)
    generic: bool = False  # dropped by scan() when a specific entry matched the same log
    applies: Applies | None = None  # plan rules only
    kind: PlanKind | None = None  # plan rules only
    alternatives: tuple[str, ...] = ()  # other backends that can convert what this rule refuses
    board_fault: Mapping[str, Any] = field(default_factory=dict, hash=False)  # how the simulated NPU reproduces it
    reproduced_by: tuple[Simulator, ...] = ()
    simulated: bool = False  # a text of rkedge's simulated toolkit, where no vendor text is known

    @cached_property
    def regex(self) -> re.Pattern[str] | None:
        return re.compile(self.pattern) if self.pattern is not None else None

    def render(self, **values: object) -> str:
        """The tool's text with its variable parts filled in (what the simulators print)."""
        if self.text is None:
            raise ValueError(f"catalogue entry {self.key} has no vendor text")
        return self.text.format(**values)


@dataclass(frozen=True)
class FailureMatch:
    """A catalogue entry found in one log line, with its message and fix filled from the line."""

    failure: KnownFailure
    id: str  # the failure's id; for a simulated-toolkit text, the id the text names
    line: str
    message: str
    fix: str | None

    @property
    def severity(self) -> Severity:
        return self.failure.severity

    @property
    def summary(self) -> str:
        return self.message


def _fill(template: str, groups: Mapping[str, str | None]) -> str:
    try:
        return template.format(**groups)
    except (KeyError, IndexError, ValueError):  # a literal brace, or a group the line did not capture
        return template


# --- the entries -----------------------------------------------------------------------------------------

W8A8_FIX = ("rk3588 supports only the w8a8 family (w8a8, w8a8_g128, w8a8_g256, w8a8_g512); w4a16 types are for "
            "rk3576/rk3562/rv1126b. Use --dtype w8a8 (never retry without target_platform)")
#: The F-7 text is the runtime's; the toolkit-side log scanner has always recognised it too (one pattern, two
#: readings).
_F7_LIMIT = r"max_context\[(?P<asked>\d+)\] must be less than the model's max_context_limit\[(?P<limit>\d+)\]"
SIMULATED_TOOLKIT_PREFIX = "ERROR: [rkedge simulated toolkit]"
_SIMULATED_SOURCE = "rkedge simulated toolkit (no vendor text is known for this failure)"
_TOOLKIT_BY: tuple[Simulator, ...] = ("simulated-toolkit",)
_NPU_BY: tuple[Simulator, ...] = ("simulated-npu",)


def _simulated(id: str, fix: str | None) -> KnownFailure:
    """A failure the simulated toolkit reports in its own words (``ERROR: [rkedge simulated toolkit] id: ...``)."""
    name = re.escape(id) if id != "*" else r"[A-Za-z0-9][\w.-]*"
    return KnownFailure(
        key=f"simulated.{id}",
        id=id,
        where="toolkit",
        pattern=rf"{re.escape(SIMULATED_TOOLKIT_PREFIX)} (?P<id>{name}): (?P<text>.+)$",
        severity="error",
        message="{text}",
        fix=fix,
        source=_SIMULATED_SOURCE,
        text=SIMULATED_TOOLKIT_PREFIX + " {id}: {text}",
        simulated=True,
    )


TOOLKIT: tuple[KnownFailure, ...] = (
    # rkedge's simulated toolkit, where no vendor text is known: checked first, never mistaken for the vendor.
    _simulated("F-2", W8A8_FIX),
    _simulated("F-7", "pass --max-context as a multiple of 32, at most 16384 (toolkit 1.2.0+; older toolkits bake "
                      "in 4096)"),
    _simulated("F-8", "use a toolkit version that lists the architecture"),
    _simulated("F-9", "convert the original float checkpoint (no quantization_config)"),
    _simulated("toolkit.platform", "use a target platform this toolkit version supports"),
    _simulated("toolkit.argument", "fix the argument (rkedge's planner checks them against the rules table first)"),
    _simulated("toolkit.algorithm", "use quantized_algorithm normal, or a w4a16 dtype with grq/gdq on a CUDA device"),
    _simulated("toolkit.lora", "pass the adapter folder (with adapter_config.json) made for this base model"),
    _simulated("toolkit.model", "pass the exported Hugging Face folder (with config.json)"),
    _simulated("toolkit.sequence", "call load_huggingface/load_gguf, then build, then export_rkllm"),
    _simulated("calibration", "the dataset must be a JSON list of {\"input\": ..., \"target\": ...} objects"),
    _simulated("toolkit.injected", "a failure injected with RKEDGE_SIM_TOOLKIT_FAIL (tests only)"),
    _simulated("*", None),  # any other id the simulated toolkit names
    # F-2: w4a16 on RK3588. 1.3.0 wording (rknn-llm#535), earlier 1.2.x wording (rknn-llm#186).
    KnownFailure(
        key="toolkit.F-2.1.3",
        id="F-2",
        where="toolkit",
        pattern=r"target_platform: (?P<platform>\S+) not support quantized_dtype: (?P<dtype>[^\s!]+)!",
        severity="error",
        message="rkllm-toolkit refused quantized_dtype {dtype} for {platform}.",
        fix=W8A8_FIX,
        source=f"F-2 ({CATALOGUE} section 3.1); rknn-llm#535",
        text="ERROR: target_platform: {platform} not support quantized_dtype: {dtype}!",
        reproduced_by=_TOOLKIT_BY,
    ),
    KnownFailure(
        key="toolkit.F-2.1.2",
        id="F-2",
        where="toolkit",
        pattern=r"The quantized_dtype = '(?P<dtype>[^']+)' is not supported in '(?P<platform>[^']+)'!",
        severity="error",
        message="rkllm-toolkit refused quantized_dtype {dtype} for {platform}.",
        fix=W8A8_FIX,
        source=f"F-2 ({CATALOGUE} section 3.1); rknn-llm#186",
        text="The quantized_dtype = '{dtype}' is not supported in '{platform}'!",
        reproduced_by=_TOOLKIT_BY,
    ),
    # F-7: the context limit baked into the model. The toolkit prints this INFO line when max_context is not
    # passed (>= 1.2.0, rknn-llm#220); the board then refuses a larger max_context_len.
    KnownFailure(
        key="toolkit.F-7.default-limit",
        id="F-7",
        where="toolkit",
        pattern=r"INFO: Setting max_context_limit to (?P<limit>\d+)",
        severity="info",
        message="the model's context limit was set to {limit} by the toolkit's default (max_context was not "
                "passed); the board runtime refuses a larger max_context_len.",
        fix="pass --max-context (a multiple of 32, at most 16384) to build for a longer context",
        source="F-7; rknn-llm#220",
        text="INFO: Setting max_context_limit to {limit}",
        reproduced_by=_TOOLKIT_BY,
    ),
    KnownFailure(
        key="toolkit.F-7.above-limit",
        id="F-7",
        where="toolkit",
        pattern=_F7_LIMIT,
        severity="error",
        message="max_context {asked} is above the model's max_context_limit {limit}.",
        fix="use a max_context_len of at most the model's limit, or reconvert with a larger --max-context",
        source="F-7; rkllama#60, #64",
    ),
    # F-8: architectures a toolkit version cannot read.
    KnownFailure(
        key="toolkit.F-8.not-support",
        id="F-8",
        where="toolkit",
        pattern=r"ERROR: Not support (?P<arch>\S+?)!",
        severity="error",
        message="this rkllm-toolkit version does not support the architecture {arch}.",
        fix="use a toolkit version that lists it (rkedge checks: `rkedge convert --dry-run`), see the model "
            "lists per version",
        source="F-8; rknn-llm#220",
        text="ERROR: Not support {arch}!",
        reproduced_by=_TOOLKIT_BY,
    ),
    KnownFailure(
        key="toolkit.F-8.gemma3-multimodal",
        id="F-8",
        where="toolkit",
        pattern=r"'Gemma3Config' object has no attribute 'vocab_size'",
        severity="error",
        message="multimodal Gemma 3 (Gemma3ForConditionalGeneration) cannot be loaded by the toolkit.",
        fix="save the text model alone (model.language_model with config.text_config) and convert it as "
            "Gemma3ForCausalLM",
        source="F-8; rknn-llm#240",
        text="ERROR: Catch exception when loading model: 'Gemma3Config' object has no attribute 'vocab_size'",
        reproduced_by=_TOOLKIT_BY,
    ),
    KnownFailure(
        key="toolkit.F-8.tensor-size",
        id="F-8",
        where="toolkit",
        pattern=r"The size of tensor a \((?P<a>\d+)\) must match the size of tensor b \((?P<b>\d+)\)",
        severity="error",
        message="the toolkit could not map the model's tensors (size {a} vs {b}); seen for Gemma 4 on toolkit 1.2.3.",
        fix="use rkllm-toolkit 1.3.0 or newer for Gemma 4",
        source="F-8; rknn-llm#495, #496",
        text="ERROR: Catch exception when loading model: The size of tensor a ({a}) must match the size of "
             "tensor b ({b}) at non-singleton dimension 0",
        reproduced_by=_TOOLKIT_BY,
    ),
    KnownFailure(
        key="toolkit.F-8.state-dict",
        id="F-8",
        where="toolkit",
        pattern=r"Error\(s\) in loading state_dict for (?P<module>\w+)",
        severity="error",
        message="the toolkit's model definition does not match the checkpoint's weights ({module}).",
        fix="check that this toolkit version supports the exact architecture and revision",
        source="F-8; rknn-llm#198",
    ),
    KnownFailure(
        key="toolkit.F-8.rope-scaling",
        id="F-8",
        where="toolkit",
        pattern=r"`rope_scaling` must be a dictionary with with two fields",
        severity="error",
        message="this toolkit's transformers does not understand the model's rope_scaling (Llama 3.x "
                "'llama3' type).",
        fix="use rkllm-toolkit 1.1.0 or newer",
        source="F-8; ezrknn-llm#16",
        text="Error: `rope_scaling` must be a dictionary with with two fields, `type` and `factor`, got {rope}",
        reproduced_by=_TOOLKIT_BY,
    ),
    KnownFailure(
        key="toolkit.F-8.tokenizer-format",
        id="F-8",
        where="toolkit",
        pattern=r"data did not match any variant of untagged enum ModelWrapper",
        severity="error",
        message="this toolkit's tokenizers library cannot read the model's tokenizer.json (a newer format).",
        fix="use a newer rkllm-toolkit",
        source="F-8; ezrknn-llm#16",
    ),
    # F-9: pre-quantized checkpoints.
    KnownFailure(
        key="toolkit.F-9.bitsandbytes",
        id="F-9",
        where="toolkit",
        pattern=r"Catch exception when loading model: bitsandbytes",
        severity="error",
        message="the checkpoint is bitsandbytes-quantized (config.json quantization_config); the toolkit "
                "cannot read it.",
        fix="merge/dequantize to float16 or bfloat16 and remove quantization_config (rkedge "
            "merges LoRAs this way), or start from the original float checkpoint",
        source="F-9; rknn-llm#212",
        text="ERROR: Catch exception when loading model: bitsandbytes",
        reproduced_by=_TOOLKIT_BY,
    ),
    KnownFailure(
        key="toolkit.F-9.load-in-4bit",
        id="F-9",
        where="toolkit",
        pattern=r"Unused kwargs: \[.*'_load_in_4bit'",
        severity="warning",
        message="the checkpoint carries a bitsandbytes quantization_config.",
        fix="convert the original float checkpoint instead",
        source="F-9; rknn-llm#212",
    ),
    # GGUF input (1.2.1 texts, rknn-llm#312).
    KnownFailure(
        key="toolkit.gguf.fp16-quantization",
        id="gguf.fp16-quantization",
        where="toolkit",
        pattern=r"do_quantization must be False, when GGMLQuantizationType is MOSTLY_F16!",
        severity="error",
        message="an fp16 GGUF must be built with do_quantization=False.",
        fix="build it without quantization, or convert the Hugging Face checkpoint instead",
        source="rknn-llm#312",
        text="ERROR: do_quantization must be False, when GGMLQuantizationType is MOSTLY_F16!",
        reproduced_by=_TOOLKIT_BY,
    ),
    KnownFailure(
        key="toolkit.gguf.type",
        id="gguf.type",
        where="toolkit",
        pattern=r"Not support GGMLQuantizationType: (?P<type>\w+)!",
        severity="error",
        message="the toolkit reads only q4_0 and fp16 GGUF files, not {type}.",
        fix="convert the Hugging Face checkpoint instead (or a q4_0/fp16 GGUF; q4_0 is w4a16_g32, never rk3588)",
        source=f"{CATALOGUE} section 3.2; rknn-llm#312",
        text="Not support GGMLQuantizationType: {type}!",
        reproduced_by=_TOOLKIT_BY,
    ),
    # F-14: the toolkit's environment.
    KnownFailure(
        key="toolkit.F-14.exit",
        id="F-14",
        where="toolkit",
        pattern=r"NameError: name 'exit' is not defined",
        severity="error",
        message="importing rkllm.api failed with NameError: name 'exit' is not defined (reported with toolkit "
                "1.2.0/1.2.1 when rkllm.api is imported outside the example scripts).",
        fix="probe the environment (`rkedge toolkit install` records a probed venv); check the host is x86_64 "
            "and the Python version matches the wheel",
        source="F-14; rknn-llm#312",
        text="NameError: name 'exit' is not defined",
        reproduced_by=_TOOLKIT_BY,
    ),
    KnownFailure(
        key="toolkit.F-14.wheel-platform",
        id="F-14",
        where="toolkit",
        pattern=r"(?P<wheel>\S+\.whl) is not a supported wheel on "
                r"this platform",
        severity="error",
        message="pip refused {wheel}: rkllm-toolkit wheels exist for linux x86_64 and one CPython version each.",
        fix="install on an x86_64 Linux host with the Python version in the wheel's name (cpXY = Python X.Y)",
        source="F-14; rknn-llm#81",
    ),
    KnownFailure(
        key="toolkit.F-14.torch-wheel",
        id="F-14",
        where="toolkit",
        pattern=r"No matching distribution found for (?P<req>torch==\S+)",
        severity="error",
        message="pip found no {req} for this platform (musl/Alpine or an unsupported Python have no such "
                "wheel).",
        fix="use a glibc x86_64 Linux (e.g. Ubuntu 22.04) with a Python the toolkit supports",
        source="F-14; rknn-llm#366",
    ),
    KnownFailure(
        key="toolkit.F-14.source-build",
        id="F-14",
        where="toolkit",
        pattern=r"setup\.py egg_info did not run successfully|Getting requirements to build wheel did not run",
        severity="error",
        message="a requirement had to be built from source and failed (auto-gptq builds its CUDA extension "
                "unless BUILD_CUDA_EXT=0).",
        fix="install with BUILD_CUDA_EXT=0 (rkedge toolkit install sets it)",
        source=f"F-14; {CATALOGUE} section 3.4",
        generic=True,
    ),
    # F-11: host memory.
    KnownFailure(
        key="toolkit.F-11",
        id="F-11",
        where="toolkit",
        pattern=r"CUDA out of memory|DefaultCPUAllocator: can't allocate memory|^MemoryError",
        severity="error",
        message="the host ran out of memory during conversion.",
        fix="free memory or add swap, or load with dtype float16 (1.2.0+, costs precision)",
        source="F-11; rknn-llm#30",
    ),
    # Generic load failure (rknn-llm#212): kept only when nothing more specific matched.
    KnownFailure(
        key="toolkit.load-failed.exception",
        id="toolkit.load-failed",
        where="toolkit",
        pattern=r"ERROR: Catch exception when loading model: (?P<what>.+)$",
        severity="error",
        message="the toolkit could not load the model: {what}",
        fix="check that the architecture and checkpoint format "
            "are supported by this toolkit version",
        source="rknn-llm#212",
        generic=True,
        text="ERROR: Catch exception when loading model: {what}",
    ),
    KnownFailure(
        key="toolkit.load-failed",
        id="toolkit.load-failed",
        where="toolkit",
        pattern=r"^Load model failed!",
        severity="error",
        message="the toolkit could not load the model.",
        fix="see the toolkit log above",
        source="rknn-llm#212",
        generic=True,
        text="Load model failed!",
        reproduced_by=_TOOLKIT_BY,
    ),
)

RUNTIME: tuple[KnownFailure, ...] = (
    KnownFailure(
        key="runtime.F-1",
        id="F-1",
        where="runtime",
        pattern=r"failed to malloc npu memory, size: (?P<size>\d+)",
        severity="error",
        message="the NPU could not map a {size}-byte weight buffer into its IOMMU address space "
                "(each NPU IOMMU domain maps at most 4 GiB; errno 14 is a failed DMA mapping, not plain RAM exhaustion)",
        fix="retry with base_domain_id=1 (rkedge: --base-domain-id 1); update the rknpu driver to 0.9.8; "
            "for large models convert with plain w8a8 (grouped dtypes need more NPU memory); "
            "check `dmesg | grep 'dma map'`",
        source="F-1: gemma-2-9b-it RK3588 model card; rknn-llm#139, #195, #232, #335; rknpu driver sources",
        text="E RKNN: [{stamp}] failed to malloc npu memory, size: {size}, flags: 0x2",
        reproduced_by=_NPU_BY,
    ),
    KnownFailure(
        key="runtime.F-3.old-model",
        id="F-3",
        where="runtime",
        pattern=r"invalid rknn llm model magic",
        severity="error",
        message="the model was converted by rkllm-toolkit 1.0.x, which runtimes 1.1 and newer cannot read",
        fix="reconvert the model with the toolkit version that matches the runtime on the board "
            "(rkedge convert --toolkit-version <runtime version>)",
        source="F-3 (b): rknn-llm#129, ezrknpu#11, ezrknn-llm#19; README v1.1.0",
        text="E RKNN: invalid rknn llm model magic",
        reproduced_by=_NPU_BY,
    ),
    KnownFailure(
        key="runtime.F-3.newer-model",
        id="F-3",
        where="runtime",
        pattern=r"invalid magic characters",
        severity="error",
        message="the model comes from a newer rkllm-toolkit than this runtime can read",
        fix="install the runtime release that matches the model's toolkit version (see its manifest), "
            "or reconvert with the toolkit version of this runtime",
        source="F-3 (c): rknn-llm#235",
        text=": invalid magic characters '{chars}'",
        reproduced_by=_NPU_BY,
    ),
    KnownFailure(
        key="runtime.F-6",
        id="F-6",
        where="runtime",
        pattern=r"target_platform does not match",
        severity="error",
        message="the model was built for another SoC than this board",
        fix="reconvert with --platform set to this board's SoC (rkedge doctor shows it)",
        source="F-3 (a) / F-6: ezrknn-llm#5, av1d/rk3588_npu_llm_server#2",
        text="The model target_platform does not match!",
        reproduced_by=_NPU_BY,
    ),
    KnownFailure(
        key="runtime.F-7",
        id="F-7",
        where="runtime",
        pattern=_F7_LIMIT,
        severity="error",
        message="max_context_len {asked} is above the context the model was converted with ({limit})",
        fix="use --max-context {limit} or less, or reconvert with a larger --max-context (at most 16384)",
        source="F-7: rkllama#60, #64",
        text="E rkllm: max_context[{asked}] must be less than the model's max_context_limit[{limit}]",
        reproduced_by=_NPU_BY,
    ),
    KnownFailure(
        key="runtime.F-13",
        id="F-13",
        where="runtime",
        pattern=r"invalid rkllm model!",
        severity="error",
        message="the file is not a model rkllm-toolkit produced (some third-party converters write files "
                "the runtime cannot read)",
        fix="convert the model with rkllm-toolkit (rkedge convert) and copy the .rkllm it writes",
        source="F-13: rkllama#55, #99",
        text="E rkllm: invalid rkllm model!",
        reproduced_by=_NPU_BY,
    ),
    KnownFailure(
        key="runtime.F-5.matmul",
        id="F-5",
        where="runtime",
        pattern=r"matmul\(w8a8\) run failed",
        severity="error",
        message="an NPU operation failed during generation, as seen with rknpu drivers older than 0.9.7",
        fix="update the rknpu driver to 0.9.8 (a newer vendor kernel image); rkedge doctor shows the version",
        source="F-5: rknn-llm#187, #290, #413, #449",
        text="E rkllm: matmul(w8a8) run failed",
        reproduced_by=_NPU_BY,
    ),
    KnownFailure(
        key="runtime.F-5.old-driver",
        id="F-5",
        where="runtime",
        pattern=r"driver version is too low, please upgrade to (?P<wanted>[\d.]+)",
        severity="warning",
        message="the rknpu kernel driver is older than the runtime wants ({wanted})",
        fix="update the board's kernel to one with rknpu 0.9.8 (vendor 5.10.209 or 6.1.84 images)",
        source="F-5: rknn-llm#232, #335; SDK manual section 2.4",
        text="W rkllm: Warning: Your rknpu driver version is too low, please upgrade to {wanted}.",
        reproduced_by=_NPU_BY,
    ),
)

PLAN: tuple[KnownFailure, ...] = (
    KnownFailure(
        key="plan.refused.recurrent-gemma",
        id="F-8",
        where="plan",
        pattern=None,
        severity="error",
        message="RecurrentGemma's RG-LRU recurrent blocks are implemented by no rkllm-toolkit version (1.0.0 to 1.3.0), and "
                "the toolkit's custom-model template needs RMSNorm + attention/FFN blocks",
        fix="convert it with the RKNN backend instead (rkedge convert --backend rknn), which compiles its fixed-size "
            "decode step with rknn-toolkit2; or pick a Gemma / Gemma 2 / Gemma 3 model",
        source=f"{CATALOGUE} section 3.3; recurrentgemma-rknn-feasibility.md",
        applies=Applies(architectures=("RecurrentGemmaForCausalLM",), model_types=("recurrent_gemma",)),
        kind="refused-architecture",
        alternatives=("rknn backend",),
    ),
    KnownFailure(
        key="plan.refused.gemma3-multimodal",
        id="F-8",
        where="plan",
        pattern=None,
        severity="error",
        message="multimodal Gemma 3 (4b and up) fails in the toolkit: 'Gemma3Config' object has no attribute 'vocab_size' "
                "(rknn-llm#240)",
        fix="save the text model alone (model.language_model with its config.text_config) and convert that "
            "folder as Gemma3ForCausalLM",
        source="F-8; rknn-llm#240",
        applies=Applies(architectures=("Gemma3ForConditionalGeneration",), model_types=("gemma3",)),
        kind="refused-architecture",
    ),
    KnownFailure(
        key="plan.F-1.gemma2-rk3588-1.1",
        id="F-1.gemma2-rk3588-1.1",
        where="plan",
        pattern=None,
        severity="error",
        message="Gemma 2 converted for RK3588 with rkllm-toolkit 1.1.x in any mode but plain w8a8 loads on the board "
                "with 'E RKNN: failed to malloc npu memory, size: 232128512, flags: 0x2' / 'rknn_init fail! ret=-1' "
                "(the NPU cannot map a weight buffer into its IOMMU address space; grouped dtypes add per-group scales "
                "and need more NPU memory)",
        fix="use --dtype w8a8 with --hybrid-rate 0 (plain w8a8), or a toolkit/runtime of 1.2.x or newer",
        source="F-1: gemma-2-9b-it RK3588 model card (RKLLM 1.1.1, all non-w8a8 types); rknpu driver sources",
        applies=Applies(architectures=("Gemma2ForCausalLM",), platforms=("rk3588",), toolkit_first="1.1.0",
                toolkit_last="1.1.4", unless_plain=("w8a8",)),
        kind="board-failure",
        board_fault={"init": "npu_malloc", "npu_malloc_size": 232128512},
    ),
    KnownFailure(
        key="plan.F-8.gemma3-on-1.1",
        id="F-8",
        where="plan",
        pattern=None,
        severity="error",
        message="toolkit 1.1.4 prints 'ERROR: Not support Gemma3ForCausalLM!', rknn-llm#220",
        fix=None,
        source="F-8; rknn-llm#220",
        applies=Applies(architectures=("Gemma3ForCausalLM",)),
        kind="toolkit-too-old",
    ),
    KnownFailure(
        key="plan.F-8.llama3-rope",
        id="F-8",
        where="plan",
        pattern=None,
        severity="error",
        message="Llama 3.x rope_scaling (rope_type 'llama3') is not understood by toolkit 1.0.x "
                "(\"`rope_scaling` must be a dictionary with with two fields\", ezrknn-llm#16).",
        fix="use --toolkit-version 1.1.0 or newer",
        source="F-8; ezrknn-llm#16",
        applies=Applies(toolkit_below="1.1.0", config=(("rope_scaling.rope_type", "llama3"),)),
        kind="config",
    ),
)

BOARD: tuple[KnownFailure, ...] = ()

CATALOGUE_ENTRIES: tuple[KnownFailure, ...] = TOOLKIT + RUNTIME + PLAN + BOARD
_BY_KEY = {entry.key: entry for entry in CATALOGUE_ENTRIES}
if len(_BY_KEY) != len(CATALOGUE_ENTRIES):  # a duplicate key would make entry() ambiguous
    raise RuntimeError("rkedge.failures: duplicate catalogue keys")


# --- reading the catalogue -------------------------------------------------------------------------------

def entry(key: str) -> KnownFailure:
    """The entry named ``key`` (KeyError for an unknown key: a simulator asking for a text nobody catalogued)."""
    return _BY_KEY[key]


def entries(where: Where) -> tuple[KnownFailure, ...]:
    return tuple(e for e in CATALOGUE_ENTRIES if e.where == where)


def vendor_text(key: str, **values: object) -> str:
    """The text the tool prints for entry ``key``, filled with ``values`` (what the simulators print)."""
    return entry(key).render(**values)


def simulated_toolkit_text(id: str, message: str) -> str:
    """The line the simulated toolkit prints for a failure with no known vendor text."""
    return vendor_text("simulated.*", id=id, text=message)


def scan(text: str | Iterable[str], where: Where) -> list[FailureMatch]:
    """The catalogue entries of ``where`` found in a log, in log order, one per distinct id and message.

    Each line is matched against the entries in catalogue order and the first match counts. Generic entries
    are dropped when a specific error matched the same log (they only say "it failed").
    """
    lines = text.splitlines() if isinstance(text, str) else text
    candidates = [e for e in entries(where) if e.regex is not None]
    specific: list[FailureMatch] = []
    generic: list[FailureMatch] = []
    seen: set[tuple[str, str]] = set()
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        for candidate in candidates:
            assert candidate.regex is not None
            found = candidate.regex.search(line)
            if not found:
                continue
            groups = found.groupdict()
            id_ = (groups.get("id") or candidate.id) if candidate.simulated else candidate.id
            fix = _fill(candidate.fix, groups) if candidate.fix is not None else None
            match = FailureMatch(candidate, id_, line, _fill(candidate.message, groups), fix)
            if (match.id, match.message) not in seen:
                seen.add((match.id, match.message))
                (generic if candidate.generic else specific).append(match)
            break
    if any(m.severity == "error" for m in specific):
        return specific
    return specific + generic


def first_error(text: str | Iterable[str], where: Where) -> FailureMatch | None:
    return next((m for m in scan(text, where) if m.severity == "error"), None)


def plan_rules(kind: PlanKind, **facts: Any) -> list[KnownFailure]:
    """The plan rules of ``kind`` that apply to ``facts`` (the keywords of :meth:`Applies.matches`)."""
    return [e for e in PLAN if e.kind == kind and e.applies is not None and e.applies.matches(**facts)]


def refused_architecture(architecture: str | None, model_type: str | None) -> KnownFailure | None:
    """The rule refusing this architecture for every rkllm-toolkit version, if any."""
    return next((e for e in PLAN if e.kind == "refused-architecture" and e.applies is not None
                 and e.applies.names(architecture, model_type)), None)
