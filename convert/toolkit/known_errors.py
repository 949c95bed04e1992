"""What the rkllm-toolkit prints when it fails (data), and the findings those texts translate to.

Every ``vendor`` entry is a text observed in public logs, quoted in converter-anchors-and-failure-modes.md
section 3 and the failure catalogue (F-2, F-7, F-8, F-9, F-11, F-14), with the issue it comes from. The
simulated toolkit reproduces those texts verbatim; where no vendor text is known it prints
``ERROR: [rkedge simulated toolkit] <id>: <message>`` instead, which maps to a finding with that id and
never passes for a vendor message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from rkedge.convert.findings import Finding, Severity

#: The prefix of every text the simulated toolkit invents (no vendor text is known for that failure).
SIMULATED_PREFIX = "ERROR: [rkedge simulated toolkit]"
_SIMULATED = re.compile(r"ERROR: \[rkedge simulated toolkit\] (?P<id>[A-Za-z0-9][\w.-]*): (?P<text>.+)$")
CATALOGUE = "converter-anchors-and-failure-modes.md"


@dataclass(frozen=True)
class KnownToolkitError:
    id: str
    pattern: re.Pattern[str]
    message: str  # formatted with the pattern's named groups
    fix: str | None
    source: str
    severity: Severity = "error"
    generic: bool = False  # dropped when a specific entry matched the same log


def _entry(id: str, pattern: str, message: str, fix: str | None, source: str, **kw: object) -> KnownToolkitError:
    return KnownToolkitError(id, re.compile(pattern), message, fix, source, **kw)  # type: ignore[arg-type]


W8A8_FIX = ("rk3588 supports only the w8a8 family (w8a8, w8a8_g128, w8a8_g256, w8a8_g512); w4a16 types are for "
            "rk3576/rk3562/rv1126b. Use --dtype w8a8 (never retry without target_platform)")

KNOWN_ERRORS: tuple[KnownToolkitError, ...] = (
    # F-2: w4a16 on RK3588. 1.3.0 wording (rknn-llm#535), earlier 1.2.x wording (rknn-llm#186).
    _entry("F-2", r"target_platform: (?P<platform>\S+) not support quantized_dtype: (?P<dtype>[^\s!]+)!",
           "rkllm-toolkit refused quantized_dtype {dtype} for {platform}.", W8A8_FIX,
           f"F-2 ({CATALOGUE} section 3.1); rknn-llm#535"),
    _entry("F-2", r"The quantized_dtype = '(?P<dtype>[^']+)' is not supported in '(?P<platform>[^']+)'!",
           "rkllm-toolkit refused quantized_dtype {dtype} for {platform}.", W8A8_FIX,
           f"F-2 ({CATALOGUE} section 3.1); rknn-llm#186"),
    # F-7: the context limit baked into the model. The toolkit prints this INFO line when max_context is not
    # passed (>= 1.2.0, rknn-llm#220); the board then refuses a larger max_context_len.
    _entry("F-7", r"INFO: Setting max_context_limit to (?P<limit>\d+)",
           "the model's context limit was set to {limit} by the toolkit's default (max_context was not passed); "
           "the board runtime refuses a larger max_context_len.",
           "pass --max-context (a multiple of 32, at most 16384) to build for a longer context",
           "F-7; rknn-llm#220", severity="info"),
    _entry("F-7", r"max_context\[(?P<asked>\d+)\] must be less than the model's max_context_limit\[(?P<limit>\d+)\]",
           "max_context {asked} is above the model's max_context_limit {limit}.",
           "use a max_context_len of at most the model's limit, or reconvert with a larger --max-context",
           "F-7; rkllama#60, #64"),
    # F-8: architectures a toolkit version cannot read.
    _entry("F-8", r"ERROR: Not support (?P<arch>\S+?)!",
           "this rkllm-toolkit version does not support the architecture {arch}.",
           "use a toolkit version that lists it (rkedge checks: `rkedge convert --dry-run`), see the model lists "
           "per version", "F-8; rknn-llm#220"),
    _entry("F-8", r"'Gemma3Config' object has no attribute 'vocab_size'",
           "multimodal Gemma 3 (Gemma3ForConditionalGeneration) cannot be loaded by the toolkit.",
           "save the text model alone (model.language_model with config.text_config) and convert it as "
           "Gemma3ForCausalLM", "F-8; rknn-llm#240"),
    _entry("F-8", r"The size of tensor a \((?P<a>\d+)\) must match the size of tensor b \((?P<b>\d+)\)",
           "the toolkit could not map the model's tensors (size {a} vs {b}); seen for Gemma 4 on toolkit 1.2.3.",
           "use rkllm-toolkit 1.3.0 or newer for Gemma 4", "F-8; rknn-llm#495, #496"),
    _entry("F-8", r"Error\(s\) in loading state_dict for (?P<module>\w+)",
           "the toolkit's model definition does not match the checkpoint's weights ({module}).",
           "check that this toolkit version supports the exact architecture and revision", "F-8; rknn-llm#198"),
    _entry("F-8", r"`rope_scaling` must be a dictionary with with two fields",
           "this toolkit's transformers does not understand the model's rope_scaling (Llama 3.x 'llama3' type).",
           "use rkllm-toolkit 1.1.0 or newer", "F-8; ezrknn-llm#16"),
    _entry("F-8", r"data did not match any variant of untagged enum ModelWrapper",
           "this toolkit's tokenizers library cannot read the model's tokenizer.json (a newer format).",
           "use a newer rkllm-toolkit", "F-8; ezrknn-llm#16"),
    # F-9: pre-quantized checkpoints.
    _entry("F-9", r"Catch exception when loading model: bitsandbytes",
           "the checkpoint is bitsandbytes-quantized (config.json quantization_config); the toolkit cannot read it.",
           "merge/dequantize to float16 or bfloat16 and remove quantization_config (rkedge merges LoRAs this "
           "way), or start from the original float checkpoint", "F-9; rknn-llm#212"),
    _entry("F-9", r"Unused kwargs: \[.*'_load_in_4bit'",
           "the checkpoint carries a bitsandbytes quantization_config.",
           "convert the original float checkpoint instead", "F-9; rknn-llm#212", severity="warning"),
    # GGUF input (1.2.1 texts, rknn-llm#312).
    _entry("gguf.fp16-quantization", r"do_quantization must be False, when GGMLQuantizationType is MOSTLY_F16!",
           "an fp16 GGUF must be built with do_quantization=False.",
           "build it without quantization, or convert the Hugging Face checkpoint instead", "rknn-llm#312"),
    _entry("gguf.type", r"Not support GGMLQuantizationType: (?P<type>\w+)!",
           "the toolkit reads only q4_0 and fp16 GGUF files, not {type}.",
           "convert the Hugging Face checkpoint instead (or a q4_0/fp16 GGUF; q4_0 is w4a16_g32, never rk3588)",
           f"{CATALOGUE} section 3.2; rknn-llm#312"),
    # F-14: the toolkit's environment.
    _entry("F-14", r"NameError: name 'exit' is not defined",
           "importing rkllm.api failed with NameError: name 'exit' is not defined (reported with toolkit "
           "1.2.0/1.2.1 when rkllm.api is imported outside the example scripts).",
           "probe the environment (`rkedge toolkit install` records a probed venv); check the host is x86_64 "
           "and the Python version matches the wheel", "F-14; rknn-llm#312"),
    _entry("F-14", r"(?P<wheel>\S+\.whl) is not a supported wheel on this platform",
           "pip refused {wheel}: rkllm-toolkit wheels exist for linux x86_64 and one CPython version each.",
           "install on an x86_64 Linux host with the Python version in the wheel's name (cpXY = Python X.Y)",
           "F-14; rknn-llm#81"),
    _entry("F-14", r"No matching distribution found for (?P<req>torch==\S+)",
           "pip found no {req} for this platform (musl/Alpine or an unsupported Python have no such wheel).",
           "use a glibc x86_64 Linux (e.g. Ubuntu 22.04) with a Python the toolkit supports", "F-14; rknn-llm#366"),
    _entry("F-14", r"setup\.py egg_info did not run successfully|Getting requirements to build wheel did not run",
           "a requirement had to be built from source and failed (auto-gptq builds its CUDA extension unless "
           "BUILD_CUDA_EXT=0).", "install with BUILD_CUDA_EXT=0 (rkedge toolkit install sets it)",
           f"F-14; {CATALOGUE} section 3.4", generic=True),
    # F-11: host memory.
    _entry("F-11", r"CUDA out of memory|DefaultCPUAllocator: can't allocate memory|^MemoryError",
           "the host ran out of memory during conversion.",
           "free memory or add swap, or load with dtype float16 (1.2.0+, costs precision)", "F-11; rknn-llm#30"),
    # Generic load failure (rknn-llm#212): kept only when nothing more specific matched.
    _entry("toolkit.load-failed", r"ERROR: Catch exception when loading model: (?P<what>.+)$",
           "the toolkit could not load the model: {what}", "check that the architecture and checkpoint format are "
           "supported by this toolkit version", "rknn-llm#212", generic=True),
    _entry("toolkit.load-failed", r"^Load model failed!",
           "the toolkit could not load the model.", "see the toolkit log above", "rknn-llm#212", generic=True),
)

#: Fixes for the ids the simulated toolkit uses in its own texts.
SIMULATED_FIXES: dict[str, str] = {
    "F-2": W8A8_FIX,
    "F-7": "pass --max-context as a multiple of 32, at most 16384 (toolkit 1.2.0+; older toolkits bake in 4096)",
    "F-8": "use a toolkit version that lists the architecture",
    "F-9": "convert the original float checkpoint (no quantization_config)",
    "toolkit.platform": "use a target platform this toolkit version supports",
    "toolkit.argument": "fix the argument (rkedge's planner checks them against the rules table first)",
    "toolkit.algorithm": "use quantized_algorithm normal, or a w4a16 dtype with grq/gdq on a CUDA device",
    "toolkit.lora": "pass the adapter folder (with adapter_config.json) made for this base model",
    "toolkit.model": "pass the exported Hugging Face folder (with config.json)",
    "toolkit.sequence": "call load_huggingface/load_gguf, then build, then export_rkllm",
    "calibration": "the dataset must be a JSON list of {\"input\": ..., \"target\": ...} objects",
    "toolkit.injected": "a failure injected with RKEDGE_SIM_TOOLKIT_FAIL (tests only)",
}


def simulated_text(id: str, message: str) -> str:
    """The line the simulated toolkit prints for a failure with no known vendor text."""
    return f"{SIMULATED_PREFIX} {id}: {message}"


def _format(entry: KnownToolkitError, match: re.Match[str]) -> str:
    try:
        return entry.message.format(**match.groupdict())
    except (KeyError, IndexError):
        return entry.message


def findings_from_log(lines: Iterable[str]) -> list[Finding]:
    """The findings for the known toolkit texts in ``lines`` (one per distinct id and message, in log order)."""
    specific: list[Finding] = []
    generic: list[Finding] = []
    seen: set[tuple[str, str]] = set()
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        simulated = _SIMULATED.search(line)
        if simulated:
            id_, text = simulated.group("id"), simulated.group("text")
            found = Finding(id_, "error", text, SIMULATED_FIXES.get(id_),
                            "rkedge simulated toolkit (no vendor text is known for this failure)")
            if (found.id, found.message) not in seen:
                seen.add((found.id, found.message))
                specific.append(found)
            continue
        for entry in KNOWN_ERRORS:
            match = entry.pattern.search(line)
            if not match:
                continue
            found = Finding(entry.id, entry.severity, _format(entry, match), entry.fix,
                            f"{entry.source}; toolkit said: {line[:300]}")
            if (found.id, found.message) not in seen:
                seen.add((found.id, found.message))
                (generic if entry.generic else specific).append(found)
            break
    if any(f.severity == "error" for f in specific):
        return specific
    return specific + generic
