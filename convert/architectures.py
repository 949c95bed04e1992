"""Architecture registry (data): what each rkllm-toolkit version can convert.

Keyed by ``config.json`` ``architectures[0]`` and ``model_type`` (also inside a nested ``text_config``).
Each entry says which toolkit version added the family, its chat-template family (rkedge's renderer) and
the LoRA target modules of its linear layers. Source: converter-anchors-and-failure-modes.md section 3.3 and
Appendix A ("architectures_added"), the SDK manuals' model lists; class names as transformers spells them.
Architectures no version converts, and the architecture rules quoting the toolkit's own words, are plan rules
of the failure catalogue (:mod:`rkedge.failures`); this module applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rkedge.convert.findings import Finding
from rkedge.failures import Applies, KnownFailure, plan_rules, refused_architecture
from rkedge.versions import version_key

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    family: str  # the toolkit's family name (manual model list)
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    since: str  # first toolkit version that lists it
    chat_family: str | None  # rkedge template family, when one fits the family's official template
    lora_targets: tuple[str, ...]
    source: str
    notes: str = ""
    python_only: tuple[str, ...] = ()  # Python versions the conversion needs, when restricted
    until: str | None = None  # last toolkit version known to convert it (None: still listed)
    #: A vision-language family: its key in :mod:`rkedge.convert.vlm.families`, where the vision side lives
    #: (``rkedge convert`` sends such a folder to ``convert_vlm``, which refuses towers it cannot export).
    vlm: str | None = None


@dataclass(frozen=True)
class RefusedArch:
    """A view of a ``refused-architecture`` rule of :mod:`rkedge.failures` (where the data lives)."""

    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    reason: str
    fix: str
    source: str
    alternatives: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, rule: KnownFailure) -> RefusedArch:
        applies = rule.applies or Applies()
        return cls(applies.architectures, applies.model_types, rule.message, rule.fix or "", rule.source,
                   rule.alternatives)


S33 = "converter-anchors-and-failure-modes.md section 3.3 / Appendix A"
VLM_NOTE = "the toolkit converts the language model; the vision encoder goes through rknn-toolkit2 (rkedge.convert.vlm)"

REGISTRY: tuple[ArchSpec, ...] = (
    ArchSpec("LLaMA", ("LlamaForCausalLM",), ("llama",), "1.0.0", "llama3", LLAMA_TARGETS, S33,
             "Llama 3 rope_scaling needs toolkit 1.1.0+ (the catalogue's plan.F-8.llama3-rope rule)"),
    ArchSpec("Qwen", ("QWenLMHeadModel",), ("qwen",), "1.0.0", "chatml", ("c_attn", "c_proj", "w1", "w2"), S33),
    ArchSpec("Qwen2", ("Qwen2ForCausalLM",), ("qwen2",), "1.0.0", "qwen2", LLAMA_TARGETS, S33),
    ArchSpec("Phi-2", ("PhiForCausalLM",), ("phi",), "1.0.0", None, ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"), S33),
    ArchSpec("Phi-3", ("Phi3ForCausalLM",), ("phi3",), "1.0.1", "phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), S33),
    ArchSpec("ChatGLM3", ("ChatGLMModel", "ChatGLMForConditionalGeneration"), ("chatglm",), "1.0.1", None,
             ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), S33),
    ArchSpec("Gemma", ("GemmaForCausalLM",), ("gemma",), "1.0.1", "gemma", LLAMA_TARGETS, S33),
    ArchSpec("InternLM2", ("InternLM2ForCausalLM",), ("internlm2",), "1.0.1", "chatml", ("wqkv", "wo", "w1", "w2", "w3"), S33),
    ArchSpec("MiniCPM", ("MiniCPMForCausalLM",), ("minicpm",), "1.0.1", None, LLAMA_TARGETS, S33,
             "MiniCPM4 (same class) is listed from 1.2.1"),
    ArchSpec("Gemma2", ("Gemma2ForCausalLM",), ("gemma2",), "1.1.0", "gemma", LLAMA_TARGETS, S33,
             "RK3588 benchmarks: Gemma2-2B w8a8 / w8a8_g128"),
    ArchSpec("MiniCPM3", ("MiniCPM3ForCausalLM",), ("minicpm3",), "1.1.0", None,
             ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), S33),
    ArchSpec("TeleChat2", ("TelechatForCausalLM", "TeleChat2ForCausalLM"), ("telechat",), "1.1.4", None,
             ("query", "key_value", "dense", "gate_proj", "up_proj", "down_proj"), S33),
    ArchSpec("Qwen2-VL (LLM part)", ("Qwen2VLForConditionalGeneration",), ("qwen2_vl",), "1.1.4", "qwen2", LLAMA_TARGETS,
             S33 + "; airockchip/rknn-llm examples/Qwen2-VL_Demo", VLM_NOTE + "; rkedge exports the tower", vlm="qwen2_vl"),
    ArchSpec("MiniCPM-V (LLM part)", ("MiniCPMV",), ("minicpmv",), "1.1.4", None, LLAMA_TARGETS, S33,
             VLM_NOTE + "; rkedge has no exporter for its tower (SigLIP + resampler) yet", vlm="minicpmv"),
    ArchSpec("Gemma3", ("Gemma3ForCausalLM",), ("gemma3_text",), "1.2.0", "gemma", LLAMA_TARGETS, S33,
             "gemma-3-1b verified (rknn-llm#220)"),
    ArchSpec("Qwen2.5-VL (LLM part)", ("Qwen2_5_VLForConditionalGeneration",), ("qwen2_5_vl",), "1.2.0", "qwen2.5",
             LLAMA_TARGETS, S33, VLM_NOTE + "; rkedge has no exporter for its tower (window attention) yet",
             vlm="qwen2_5_vl"),
    # InternVLForConditionalGeneration is transformers' native class of the same models; UNKNOWN whether the toolkit
    # loads it (Rockchip's demos use the remote-code InternVLChatModel).
    ArchSpec("InternVL2", ("InternVLChatModel", "InternVLForConditionalGeneration"), ("internvl_chat", "internvl"),
             "1.2.0", None, LLAMA_TARGETS, S33, VLM_NOTE + "; rkedge has no exporter for InternViT yet", vlm="internvl"),
    ArchSpec("Janus", ("MultiModalityCausalLM",), ("multi_modality",), "1.2.0", None, LLAMA_TARGETS, S33),
    ArchSpec("Qwen3", ("Qwen3ForCausalLM",), ("qwen3",), "1.2.1", "chatml", LLAMA_TARGETS, S33),
    ArchSpec("RWKV7", ("RWKV7ForCausalLM",), ("rwkv7",), "1.2.1", None, (), S33,
             "converts on Python 3.12 only, with requirements_rwkv7.txt", python_only=("3.12",)),
    ArchSpec("Gemma3n", ("Gemma3nForCausalLM", "Gemma3nForConditionalGeneration"), ("gemma3n", "gemma3n_text"),
             "1.2.2", "gemma", LLAMA_TARGETS, S33),
    # Multimodal Gemma 3 (Gemma3ForConditionalGeneration) has no row: the toolkit fails on it (rknn-llm#240, the
    # catalogue's plan.refused.gemma3-multimodal); rkedge convert's VLM path saves its language model alone as
    # Gemma3ForCausalLM (the row above) and exports the SigLIP tower (rkedge.convert.vlm.families "gemma3").
    ArchSpec("SmolVLM (LLM part)", ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration"),
             ("smolvlm", "idefics3"), "1.2.2", None, LLAMA_TARGETS,
             "field-2026-12.md (1.3.0 README model list); converter-anchors F-4 (SmolVLM2 from toolkit 1.2.2, rknn-llm#534)",
             VLM_NOTE + "; rkedge has no exporter for its tower (pixel shuffle, image splitting) yet", vlm="smolvlm"),
    ArchSpec("Qwen3-VL (LLM part)", ("Qwen3VLForConditionalGeneration",), ("qwen3_vl",), "1.2.3", "chatml", LLAMA_TARGETS, S33,
             VLM_NOTE + "; rkedge has no exporter for its tower (DeepStack) yet", vlm="qwen3_vl"),
    ArchSpec("Gemma4", ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"), ("gemma4", "gemma4_text"), "1.3.0",
             "gemma", LLAMA_TARGETS, S33, "fails on 1.2.3 with a tensor-size error (rknn-llm#495/#496)"),
    ArchSpec("SmolLM3", ("SmolLM3ForCausalLM",), ("smollm3",), "1.3.0", None, LLAMA_TARGETS, S33),
)



def config_identity(config: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(architectures[0], model_type)`` of a config, looking into ``text_config`` when the top level lacks them."""
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else None
    model_type = config.get("model_type")
    return arch, model_type


def find_spec(arch: str | None, model_type: str | None) -> ArchSpec | None:
    for spec in REGISTRY:
        if arch and arch in spec.architectures:
            return spec
    for spec in REGISTRY:
        if not arch and model_type and model_type in spec.model_types:
            return spec
    return None


def find_refused(arch: str | None, model_type: str | None) -> RefusedArch | None:
    rule = refused_architecture(arch, model_type)
    return RefusedArch.of(rule) if rule is not None else None


def supported_list(toolkit_version: str | None = None) -> str:
    specs = [s for s in REGISTRY if toolkit_version is None or version_key(s.since) <= version_key(toolkit_version)]
    return ", ".join(f"{s.family} ({s.architectures[0]}, {s.since}+)" for s in specs)


def check_architecture(config: dict[str, Any], toolkit_version: str) -> tuple[ArchSpec | None, list[Finding]]:
    """The registry entry for a config and the findings for this toolkit version."""
    arch, model_type = config_identity(config)
    refused = find_refused(arch, model_type)
    if refused is not None:
        return None, [Finding("F-8", "error", f"{arch or model_type} cannot be converted to .rkllm: {refused.reason}.",
                              f"{refused.fix}. Supported: {supported_list(toolkit_version)}", refused.source)]
    spec = find_spec(arch, model_type)
    if spec is None:
        return None, [Finding(
            "F-8", "error",
            f"architecture {arch or '?'} (model_type {model_type or '?'}) is not in any rkllm-toolkit model list.",
            f"use a supported architecture: {supported_list(toolkit_version)}",
            "F-8; " + S33)]
    findings: list[Finding] = []
    if version_key(toolkit_version) < version_key(spec.since):
        said = "".join(f" ({rule.message})" for rule in plan_rules("toolkit-too-old", architecture=arch))
        findings.append(Finding(
            "F-8", "error",
            f"{spec.family} ({arch}) needs rkllm-toolkit {spec.since} or newer; this request uses {toolkit_version}"
            f"{said}.",
            f"use --toolkit-version {spec.since} or newer (and a board runtime of the same generation)",
            "F-8; " + S33))
    for rule in plan_rules("config", architecture=arch, model_type=model_type, toolkit_version=toolkit_version,
                           config=config):
        findings.append(Finding(rule.id, rule.severity, rule.message, rule.fix, rule.source))
    return spec, findings
