"""Shapes and sizes that follow from a model's configuration alone (used by :mod:`.perf_model`).

Bytes per weight per dtype: int8 = 1, int4 = 0.5; grouped dtypes add one fp16 scale per group
(converter-anchors section 3.1 and F-1: "grouped types add per-group scales and raise the footprint").
That fp16 scale is what decode is taken to read per token; what a group costs in memory is fitted instead
(:func:`rkedge.convert.perf_model.memory_features`: the published figures show more than 2 bytes per group).
"""

from __future__ import annotations

from typing import Any

from rkedge.convert.rules import group_size
from rkedge.fit import IOMMU_DOMAIN_BYTES as IOMMU_DOMAIN_BYTES  # rknpu: dma_limit = 1 << 32 per domain (F-1)

WEIGHT_BYTES = {"w8a8": 1.0, "w4a16": 0.5, "w4a8": 0.5}
SCALE_BYTES = 2.0  # one fp16 scale per group
KV_BYTES = 2.0  # fp16 keys and values
GIB = 1 << 30


def bytes_per_param(dtype: str) -> float:
    base = WEIGHT_BYTES[dtype.split("_")[0]]
    group = group_size(dtype)
    return base + (SCALE_BYTES / group if group else 0.0)


def model_shape(config: dict[str, Any]) -> dict[str, int]:
    """The shape numbers an estimate needs, from a (text) config; handles ChatGLM's field names."""
    text = config.get("text_config")
    c: dict[str, Any] = text if isinstance(text, dict) else config
    hidden = int(c.get("hidden_size") or c.get("n_embd") or 0)
    layers = int(c.get("num_hidden_layers") or c.get("num_layers") or c.get("n_layer") or 0)
    heads = int(c.get("num_attention_heads") or c.get("n_head") or 1)
    kv_heads = int(c.get("num_key_value_heads") or c.get("multi_query_group_num") or heads)
    head_dim = int(c.get("head_dim") or c.get("kv_channels") or (hidden // heads if heads else 0))
    vocab = int(c.get("vocab_size") or c.get("padded_vocab_size") or 0)
    intermediate = int(c.get("intermediate_size") or c.get("ffn_hidden_size") or 4 * hidden)
    return {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "vocab": vocab, "intermediate": intermediate}


def split_params_from_tensors(tensors: dict[str, Any], tied: bool) -> dict[str, int]:
    embedding = lm_head = linear = 0
    for name, tensor in tensors.items():
        if "embed" in name or name.endswith("wte.weight"):
            embedding += tensor.numel
        elif "lm_head" in name or name.endswith("output.weight"):
            lm_head += tensor.numel
        else:
            linear += tensor.numel
    if tied:
        lm_head = 0
    return {"linear": linear, "embedding": embedding, "lm_head": lm_head}


def split_params_from_config(config: dict[str, Any], tied: bool) -> dict[str, int]:
    """Parameter split of a dense decoder from its config alone (``rkedge plan`` on a bare config.json)."""
    s = model_shape(config)
    attention = s["hidden"] * s["heads"] * s["head_dim"] * 2 + s["hidden"] * s["kv_heads"] * s["head_dim"] * 2
    mlp = 3 * s["hidden"] * s["intermediate"]
    embedding = s["vocab"] * s["hidden"]
    return {"linear": s["layers"] * (attention + mlp), "embedding": embedding, "lm_head": 0 if tied else embedding}
