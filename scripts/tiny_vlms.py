"""Tiny vision-language checkpoints for tests, benchmarks and the demo: a 2-layer Qwen2-VL with a 2-block vision
tower (and a tiny Gemma 3 with a 2-layer SigLIP tower), random weights from real config classes, the tiny BPE of
``tiny_models`` with the family's image tokens added, and the family's image-processor config. Nothing is
downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tiny_models import COMMON, make_tokenizer

from rkedge.convert.vlm.images import synthetic_images as varied_images

__all__ = ["make_gemma3_vlm", "make_qwen2_vl", "png_bytes", "varied_images"]

QWEN2_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
GEMMA3_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def _tokenizer_with(family: str, tokens: list[str]) -> tuple[Any, dict[str, int]]:
    tokenizer = make_tokenizer(family)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    return tokenizer, {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}


def make_qwen2_vl(folder: Path, *, seed: int = 0, image_size: int = 112) -> Path:
    """A tiny ``Qwen2VLForConditionalGeneration`` (text: 2 layers, hidden 128; vision: 2 blocks, width 64)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tokenizer, ids = _tokenizer_with("qwen2", QWEN2_VL_TOKENS)
    text = {**COMMON, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}  # head_dim 32: 4+6+6 = 16
    vision = dict(depth=2, embed_dim=64, hidden_size=COMMON["hidden_size"], num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    config.text_config.bos_token_id = None
    config.text_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.config._name_or_path = "tiny-random/qwen2_vl"
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    pixels = image_size * image_size
    Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels).save_pretrained(folder)
    return folder


def make_gemma3_vlm(folder: Path, *, seed: int = 0, image_size: int = 64) -> Path:
    """A tiny ``Gemma3ForConditionalGeneration`` (text: 2 layers, hidden 128; SigLIP: 2 layers, width 64,
    16 px patches; 4 image tokens after the projector's pooling)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil

    tokenizer, ids = _tokenizer_with("gemma3", GEMMA3_TOKENS)
    text = {**COMMON, "head_dim": 32, "sliding_window": 256}
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=16, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # the projector starts at zero (transformers' init): random, so images differ
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    model.config._name_or_path = "tiny-random/gemma3_vlm"
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def png_bytes(image: Any) -> bytes:
    """An RGB uint8 array as PNG file bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
