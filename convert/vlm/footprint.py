"""The vision encoder's memory before converting (``rkedge plan`` on a VLM checkpoint), from the safetensors
headers and config alone: the vision tower's weights at the encoder's dtype and the embedding buffer one image
hands to the runtime (image tokens x the language model's hidden size, float32, as ``RKLLM_INPUT_MULTIMODAL``
takes it). After conversion the same figure comes from ``vlm.json`` (:func:`rkedge.runtime.vision.encoder_footprint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rkedge.convert.vlm.families import VlmFamily
from rkedge.runtime.vision.checks import EncoderFootprint

#: Top-level module names of the vision half in transformers' VLM checkpoints (also under a leading ``model.``).
VISION_MODULES = ("visual", "vision_tower", "multi_modal_projector", "vision_model", "mm_projector", "mlp1",
                  "resampler", "vpm")
#: Bytes per weight in the compiled encoder. UNKNOWN: the .rknn's graph and quantization data on top (on the tiny
#: test models the file is ~1.3x the fp16 weights; on real towers the weights dominate).
WEIGHT_BYTES = {"fp16": 2, "w8a8": 1}


def is_vision_tensor(name: str) -> bool:
    parts = name.split(".")
    head = parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]
    return head in VISION_MODULES


@dataclass(frozen=True)
class PlannedEncoder:
    family: str
    dtype: str
    params: int
    image_size: int | None
    image_tokens: int | None  # None: unknown for a family rkedge does not export
    footprint: EncoderFootprint

    def to_dict(self, images: int) -> dict[str, Any]:
        return {"family": self.family, "dtype": self.dtype, "params": self.params, "image_size": self.image_size,
                "image_tokens": self.image_tokens, "weights_bytes": self.footprint.weights_bytes,
                "embedding_bytes_per_image": self.footprint.embedding_bytes_per_image, "images": images,
                "total_bytes": self.footprint.total(images)}


def text_hidden_size(config: Mapping[str, Any]) -> int:
    text = config.get("text_config") or {}
    return int(text.get("hidden_size") or config.get("hidden_size") or 0)


def image_tokens(family: VlmFamily, model_dir: Path, config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(image side, image tokens) at the size ``rkedge convert`` would export, or (None, None) when not known."""
    if family.vision_refusal is not None:
        return None, None
    from rkedge.convert.vlm.convert import preprocessing_for

    spec = preprocessing_for(family, model_dir, None)
    if family.patching == "qwen2_vl":
        side = spec.width // (spec.patch_size * spec.merge_size)
        return spec.width, side * side
    # Gemma 3: the projector pools to a fixed count (transformers' Gemma3Config default 256).
    return spec.width, int(config.get("mm_tokens_per_image") or 256)


def planned_encoder(family: VlmFamily, model_dir: Path, config: Mapping[str, Any], tensors: Mapping[str, Any],
                    dtype: str = "fp16") -> PlannedEncoder:
    """``tensors``: name -> an object with ``numel`` (the checkpoint's safetensors headers)."""
    params = sum(int(t.numel) for name, t in tensors.items() if is_vision_tensor(name))
    side, tokens = image_tokens(family, model_dir, config)
    per_image = (tokens or 0) * text_hidden_size(config) * 4
    return PlannedEncoder(family.key, dtype, params, side, tokens,
                          EncoderFootprint(params * WEIGHT_BYTES[dtype], per_image))
