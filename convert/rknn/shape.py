"""One reading of a RecurrentGemma (Griffin) config: the graph builder and ``rkedge plan`` both use it.

Built from the raw ``config.json`` dict (``GriffinShape.from_dict``), or from a transformers config
(``GriffinShape.from_transformers``, which reads the config's own dict), so the planner and the decode-step graphs
can never disagree on a dimension. Defaults are transformers 5.24's where a key is missing (``head_dim`` is
``hidden_size // num_attention_heads``, ``num_key_value_heads`` the head count), because the graphs must match
transformers' forward pass (5.23 recomputed ``head_dim`` even when given; 5.24 keeps the file's value). No torch here: the planner imports this on hosts without it.
Facts: recurrentgemma-rknn-feasibility.md section 1; model-configs.md section 2 (``_block_types`` in old configs).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

#: transformers' RecurrentGemmaConfig defaults for keys a config may leave out.
DEFAULT_BLOCK_TYPES = ("recurrent", "recurrent", "attention")


def bfloat16_round(value: float) -> float:
    """``value`` rounded as ``torch.tensor(value, dtype=torch.bfloat16)`` does: to float32, then to the nearest
    bfloat16 (ties to even). transformers rounds the embedding normalizer sqrt(hidden) this way (50.5 for 2b)."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    result: float = struct.unpack("<f", struct.pack("<I", bits))[0]
    return result


@dataclass(frozen=True)
class GriffinShape:
    hidden: int
    lru_width: int
    heads: int
    head_dim: int
    kv_heads: int
    window: int
    conv_width: int
    vocab: int
    rotary_dim: int
    rope_theta: float
    logits_soft_cap: float
    eps: float
    kinds: tuple[str, ...]  # "recurrent" | "attention" per layer
    normalizer: float  # sqrt(hidden) rounded to bfloat16, as transformers does
    mlp_width: int  # the width the MLP really uses: intermediate_size // 2
    #: exact counts from the checkpoint's tensors when known (``with_tensor_counts``), else from the formulas
    counted_layer_params: int | None = None
    counted_embedding_params: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> GriffinShape:
        hidden = int(config["hidden_size"])
        heads = int(config.get("num_attention_heads", 10))
        head_dim = int(config.get("head_dim") or hidden // heads)
        layers = int(config["num_hidden_layers"])
        pattern = config.get("block_types") or config.get("_block_types") or DEFAULT_BLOCK_TYPES
        kinds = tuple("attention" if pattern[i % len(pattern)] == "attention" else "recurrent" for i in range(layers))
        rope = config.get("rope_parameters") or {}
        partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        kv_heads = config.get("num_key_value_heads")
        return cls(hidden=hidden, lru_width=int(config.get("lru_width") or hidden), heads=heads, head_dim=head_dim,
                   kv_heads=int(kv_heads) if kv_heads is not None else heads,
                   window=int(config.get("attention_window_size", 2048)),
                   conv_width=int(config.get("conv1d_width", 4)), vocab=int(config.get("vocab_size", 256000)),
                   rotary_dim=int(head_dim * partial), rope_theta=float(theta),
                   logits_soft_cap=float(config.get("logits_soft_cap", 30.0)),
                   eps=float(config.get("rms_norm_eps", 1e-6)), kinds=kinds,
                   normalizer=bfloat16_round(hidden ** 0.5),
                   mlp_width=int(config.get("intermediate_size", 6 * hidden)) // 2)

    @classmethod
    def from_transformers(cls, config: Any) -> GriffinShape:
        """From a transformers ``RecurrentGemmaConfig`` (its serialised dict, read the same way as a file)."""
        return cls.from_dict(config.to_dict())

    def with_tensor_counts(self, tensors: dict[str, Any]) -> GriffinShape:
        """The same shape with parameter counts taken from the checkpoint's tensors (each with a ``numel``)."""
        from dataclasses import replace

        embedding = sum(t.numel for n, t in tensors.items() if "embed" in n)
        layers = sum(t.numel for n, t in tensors.items() if "embed" not in n)
        return replace(self, counted_layer_params=layers, counted_embedding_params=embedding)

    @property
    def layers(self) -> int:
        return len(self.kinds)

    @property
    def attention_layers(self) -> int:
        return self.kinds.count("attention")

    @property
    def recurrent_layers(self) -> int:
        return self.layers - self.attention_layers

    @property
    def layer_params(self) -> int:
        """Every parameter but the embedding (model-configs.md section 4, Griffin formulas)."""
        if self.counted_layer_params is not None:
            return self.counted_layer_params
        H, W, mlp, k, heads = self.hidden, self.lru_width, self.mlp_width, self.conv_width, self.heads
        per_layer = 2 * (H * mlp + mlp) + mlp * H + H + 2 * H
        recurrent = 2 * (H * W + W) + W * H + H + W * k + W + W + 2 * (heads * (W // heads) ** 2 + W)
        attention = H * heads * self.head_dim + 2 * H * self.kv_heads * self.head_dim + heads * self.head_dim * H + H
        return self.layers * per_layer + self.recurrent_layers * recurrent + self.attention_layers * attention + H

    @property
    def embedding_params(self) -> int:
        if self.counted_embedding_params is not None:
            return self.counted_embedding_params
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        return self.layer_params + self.embedding_params

    def state_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """The decode-step state inputs of ``layer`` (the graphs output them as ``new_<name>``)."""
        if self.kinds[layer] == "recurrent":
            return {f"conv{layer}": (1, self.conv_width - 1, self.lru_width), f"h{layer}": (1, self.lru_width)}
        kv = (1, self.window - 1, self.kv_heads * self.head_dim)
        return {f"k{layer}": kv, f"v{layer}": kv}

    def summary(self) -> dict[str, Any]:
        """What ``rkedge plan`` prints as the model's shape."""
        return {"hidden": self.hidden, "lru_width": self.lru_width, "layers": self.layers,
                "recurrent_layers": self.recurrent_layers, "attention_layers": self.attention_layers,
                "heads": self.heads, "head_dim": self.head_dim, "kv_heads": self.kv_heads, "window": self.window,
                "conv_width": self.conv_width, "vocab": self.vocab, "mlp_width": self.mlp_width,
                "layer_params": self.layer_params, "embedding_params": self.embedding_params,
                "total_params": self.total_params}
