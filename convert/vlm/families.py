"""The vision-language families rkedge knows, as data with sources: which architecture, from which rkllm-toolkit
its language model (the toolkit's "LLM part") converts, whether rkedge exports its vision tower, the image tags and
the preprocessing defaults (the HF image processor's, overridden by the checkpoint's ``preprocessor_config.json``).

Sources: converter-anchors-and-failure-modes.md section 3.3 (the toolkit's model lists per version) and the
Rockchip demo ``airockchip/rknn-llm examples/Qwen2-VL_Demo`` (``deploy/src/main.cpp``: tags, 392x392 input, 196
image tokens, the image padded to square with 127.5 grey; ``export/export_vision_rknn.py``: fp16 only).
"""

from __future__ import annotations

from dataclasses import dataclass

from rkedge.errors import InputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD = (0.5, 0.5, 0.5)
ANCHORS = "converter-anchors-and-failure-modes.md 3.3"
QWEN2_VL_DEMO = "airockchip/rknn-llm examples/Qwen2-VL_Demo (deploy/src/main.cpp, export/export_vision_rknn.py)"


@dataclass(frozen=True)
class VlmFamily:
    key: str
    architectures: tuple[str, ...]
    #: The first rkllm-toolkit whose model list has this family's language model.
    min_toolkit: str
    #: The architecture the language model is saved as, alone, for rkedge's pipeline (and the toolkit).
    llm_architecture: str
    #: None: rkedge exports this family's vision tower. Otherwise why not (the conversion is refused with it).
    vision_refusal: str | None
    tags: tuple[str, str, str]  # start, end, content
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: str = "bicubic"
    square: str = "pad"
    patching: str = "none"
    default_size: int = 392
    #: Tensors kept fp16 in the w8a8 build (regexes over the quantization cfg's names), where measured to help.
    hybrid_patterns: tuple[str, ...] = ()
    notes: str = ""
    sources: tuple[str, ...] = (ANCHORS,)


_NOT_YET = ("rkedge exports the vision towers of Qwen2-VL and Gemma 3 only; this family's tower ({what}) has no "
            "exporter yet")

FAMILIES: tuple[VlmFamily, ...] = (
    VlmFamily("qwen2_vl", ("Qwen2VLForConditionalGeneration",), "1.1.4", "Qwen2ForCausalLM", None,
              ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"), patching="qwen2_vl",
              # The demo pads with 127.5 grey into an 8-bit image (OpenCV rounds it to 128) and resizes with
              # INTER_LINEAR; rkedge resizes with bicubic like the HF processor, so the encoder sees what it was
              # trained on.
              notes="M-RoPE: the language model saved alone equals the VLM on text (the three position sections "
                    "coincide); image positions are the runtime's business. Whether the real toolkit keeps M-RoPE "
                    "for a Qwen2ForCausalLM folder is unknown: Rockchip's demo gives the toolkit the whole VLM folder.",
              sources=(ANCHORS, QWEN2_VL_DEMO)),
    VlmFamily("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), "1.2.0", "Qwen2ForCausalLM",
              _NOT_YET.format(what="window attention and an RMSNorm merger"),
              ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"), patching="qwen2_vl"),
    VlmFamily("qwen3_vl", ("Qwen3VLForConditionalGeneration",), "1.2.3", "Qwen3ForCausalLM",
              _NOT_YET.format(what="DeepStack features"), ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"),
              patching="qwen2_vl"),
    VlmFamily("gemma3", ("Gemma3ForConditionalGeneration",), "1.2.0", "Gemma3ForCausalLM", None,
              ("<start_of_image>", "<end_of_image>", "<image_soft_token>"), mean=IMAGENET_STANDARD,
              std=IMAGENET_STANDARD, resample="bilinear", square="stretch", default_size=896,
              # Measured on the tiny Gemma 3 (8 images, simulator): worst cosine 0.9890 plain w8a8, 0.9906 with
              # the projector (RMSNorm + projection after pooling) in fp16; +1% .rknn size.
              hybrid_patterns=("multi_modal_projector",),
              # rknn-llm#240: the toolkit fails on Gemma3ForConditionalGeneration ('no attribute vocab_size');
              # the workaround is converting model.language_model alone, which is what rkedge does.
              notes="Tags are the HF processor's (boi, eoi, image soft token); whether RKLLM's runtime gives Gemma 3's "
                    "image tokens their bidirectional attention is unknown (no Rockchip Gemma 3 vision demo).",
              sources=(ANCHORS, "rknn-llm#240")),
    VlmFamily("internvl", ("InternVLChatModel", "InternVLForConditionalGeneration"), "1.2.0", "Qwen2ForCausalLM",
              _NOT_YET.format(what="InternViT with pixel shuffle"), ("<img>", "</img>", "<IMG_CONTEXT>")),
    VlmFamily("minicpmv", ("MiniCPMV",), "1.1.4", "Qwen2ForCausalLM",
              _NOT_YET.format(what="SigLIP with a perceiver resampler"), ("<image>", "</image>", "<unk>")),
    VlmFamily("smolvlm", ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration"), "1.2.2",
              "LlamaForCausalLM", _NOT_YET.format(what="SigLIP with pixel shuffle and image splitting"),
              ("<fake_token_around_image>", "<fake_token_around_image>", "<image>")),
)


def family_of(architecture: str) -> VlmFamily | None:
    return next((f for f in FAMILIES if architecture in f.architectures), None)


def vlm_family(config: dict[str, object]) -> VlmFamily | None:
    """The family of a checkpoint's ``config.json``, or None when it is not a vision-language model we know."""
    if not isinstance(config, dict):  # a malformed config.json: the pipeline's checks say what is wrong with it
        return None
    architectures = config.get("architectures") or []
    for name in architectures if isinstance(architectures, list) else []:
        family = family_of(str(name))
        if family is not None:
            return family
    return None


def require_exportable(family: VlmFamily) -> None:
    """Raises InputError with the reason when rkedge cannot convert this family's vision half."""
    if family.vision_refusal is not None:
        raise InputError(f"{family.architectures[0]}: {family.vision_refusal}.",
                         fix="convert a Qwen2-VL or Gemma 3 checkpoint, or convert the language model alone "
                             f"(saved as {family.llm_architecture}) with rkedge convert")
