# mypy: allow-subclassing-any
# (the project types torch as Any, so these nn.Module subclasses subclass Any, as intended)
"""RecurrentGemma as fixed-shape decode-step graphs with explicit state (torch; host side).

One decode step takes the embedded token, position features and every state, and returns the next hidden
vector (or the logits) and the new states. Nothing in the graph depends on the position or the context length,
which is what the NPU's static graphs need. Built from the Hugging Face model's own weights and checked against
its forward pass (``verify_against_transformers``). Design and the equivalence to transformers 5.23's
``modeling_recurrent_gemma.py``: recurrentgemma-rknn-feasibility.md sections 1-2.

State per layer (names are graph input names; the outputs are ``new_<name>``):
- recurrent layer i: ``conv{i}`` [1, conv1d_width-1, lru_width] (time-major), ``h{i}`` [1, lru_width];
- attention layer i: ``k{i}``, ``v{i}`` [1, window-1, kv_heads*head_dim], a shift buffer, oldest first (a ring
  buffer would need a scatter; the shift buffer needs only Concat and Slice).
Position-derived inputs, computed on the host (``rkedge.runtime.rknn.features``): ``cos``/``sin``
[1, 1, rotary_dim], ``reset`` [1, 1, 1] (1 at position 0) and ``mask`` [1, 1, window] (additive).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from rkedge.convert.rknn.shape import GriffinShape

MASK_VALUE = -30.0  # additive mask for empty window slots (exp(-30) ~ 1e-13; stays representable in fp16)
RESET_LOG_A = -30.0  # log_a at the reset (position 0): a = exp(-30) ~ 1e-13, i.e. 0 next to 1 in fp16 and fp32


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x.pow(3))))


class _Mlp(nn.Module):
    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = source.gate_proj, source.up_proj, source.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class RgLru(nn.Module):
    """The RG-LRU update for one step. Its ops carry the scope name ``rg_lru`` in the ONNX graph, which is how the
    hybrid quantization finds them to keep them in fp16."""

    def __init__(self, source: nn.Module, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.recurrent_param = source.recurrent_param
        # both block-diagonal gates as one batched MatMul [heads, block, 2 * block] (one op and one Sigmoid less)
        self.gate_weight = nn.Parameter(torch.cat([source.input_gate_weight, source.recurrent_gate_weight], dim=-1)
                                        .detach(), requires_grad=False)
        self.gate_bias = nn.Parameter(torch.cat([source.input_gate_bias, source.recurrent_gate_bias], dim=-1)
                                      .detach()[:, None, :], requires_grad=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        block = width // self.heads
        blocks = x.reshape(self.heads, 1, block)
        gates = torch.sigmoid(torch.matmul(blocks, self.gate_weight) + self.gate_bias)
        input_gate, recurrent_gate = gates[..., :block], gates[..., block:]
        decay = -8.0 * nn.functional.softplus(self.recurrent_param).reshape(self.heads, 1, block)
        # transformers: a = exp(log_a), multiplier = sqrt(1 - a^2), and at position 0 a = 0, multiplier = 1.
        # Pushing log_a to RESET_LOG_A at the reset does both (exp(-30) rounds to 0 next to 1, 1 - exp(-60) is 1)
        # in 2 ops instead of the 4 that blended by the reset flag.
        log_a = recurrent_gate * decay + RESET_LOG_A * reset.reshape(1, 1, 1)
        # Exp falls back to the CPU on rk3588 (2 ops per layer in the toolkit's layer table); Elu runs on the NPU.
        # For y <= 0, elu(y) = alpha * (exp(y) - 1): a = 1 + elu(log_a), and 1 - a^2 = elu(2 log_a) with alpha -1,
        # which also keeps the multiplier's precision where a -> 1 (no 1 - exp cancellation).
        a = 1.0 + nn.functional.elu(log_a)
        multiplier = torch.sqrt(nn.functional.elu(2.0 * log_a, alpha=-1.0))
        # all in the gates' [heads, 1, block] layout: reshaping each gate back to [1, width] cost a layer each
        new_h = a * h.reshape(self.heads, 1, block) + blocks * input_gate * multiplier
        return new_h.reshape(1, width)


class ShortConv(nn.Module):
    """The temporal conv1d over the last ``conv1d_width`` inputs, as a multiply-and-sum over a time-major window.
    Scoped ``conv1d`` in the ONNX graph so the hybrid quantization can keep it in fp16 with its state."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.weight = source.weight  # [L, 1, K]
        self.bias = source.bias

    def forward(self, conv: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.cat([conv, xb], dim=1)  # [1, K, L], time-major
        xc = (window * self.weight[:, 0, :].transpose(0, 1)[None]).sum(dim=1) + self.bias  # [1, L]
        return xc, window[:, 1:, :]


class RecurrentLayer(nn.Module):
    def __init__(self, source: nn.Module, dims: GriffinShape) -> None:
        super().__init__()
        block = source.temporal_block
        self.temporal_pre_norm, self.channel_pre_norm = source.temporal_pre_norm, source.channel_pre_norm
        self.linear_x, self.linear_y, self.linear_out = block.linear_x, block.linear_y, block.linear_out
        self.conv1d = ShortConv(block.conv_1d)
        self.rg_lru = RgLru(block.rg_lru, dims.heads)
        self.mlp = _Mlp(source.mlp_block)
        self.eps = dims.eps

    def forward(self, x: torch.Tensor, conv: torch.Tensor, h: torch.Tensor, reset: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normed = _rms_norm(x, self.temporal_pre_norm.weight, self.eps)  # [1, 1, H]
        y = _gelu_tanh(self.linear_y(normed))
        xb = self.linear_x(normed)  # [1, 1, L]
        xc, new_conv = self.conv1d(conv, xb)
        new_h = self.rg_lru(xc, h, reset)
        out = self.linear_out((new_h[:, None, :]) * y)
        residual = out + x
        result = self.mlp(_rms_norm(residual, self.channel_pre_norm.weight, self.eps)) + residual
        return result, new_conv, new_h


class AttentionLayer(nn.Module):
    def __init__(self, source: nn.Module, dims: GriffinShape) -> None:
        super().__init__()
        block = source.temporal_block
        self.temporal_pre_norm, self.channel_pre_norm = source.temporal_pre_norm, source.channel_pre_norm
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = block.q_proj, block.k_proj, block.v_proj, block.o_proj
        self.mlp = _Mlp(source.mlp_block)
        self.dims = dims
        half, rot = dims.rotary_dim // 2, dims.rotary_dim
        order = [*range(half, rot), *range(half), *range(rot, dims.head_dim)]  # rotate-half, then the rest
        self.register_buffer("rotate_half", torch.tensor(order), persistent=False)

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first rotary_dim channels, over the whole head: ``cos``/``sin`` are :func:`rope_tables`'
        (1 and 0 on the channels RoPE leaves alone, rotate-half's signs in ``sin``), so the rotation is a gather
        and two multiplies (4 RKNN layers where slicing, negating and concatenating took 7)."""
        return t * cos + torch.index_select(t, -1, self.rotate_half) * sin

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.dims
        normed = _rms_norm(x, self.temporal_pre_norm.weight, d.eps)
        q = self.q_proj(normed).reshape(1, d.heads, 1, d.head_dim)
        k = self.k_proj(normed).reshape(1, 1, d.kv_heads * d.head_dim)
        v = self.v_proj(normed).reshape(1, 1, d.kv_heads * d.head_dim)
        q = self._rope(q, cos, sin)
        k = self._rope(k.reshape(1, d.kv_heads, 1, d.head_dim), cos, sin).reshape(1, 1, d.kv_heads * d.head_dim)
        keys = torch.cat([k_cache, k], dim=1)  # [1, W, D]
        values = torch.cat([v_cache, v], dim=1)
        keys_h = keys.reshape(1, d.window, d.kv_heads, d.head_dim).permute(0, 2, 3, 1)  # [1, kvH, hd, W]
        values_h = values.reshape(1, d.window, d.kv_heads, d.head_dim).permute(0, 2, 1, 3)  # [1, kvH, W, hd]
        group = d.heads // d.kv_heads
        q = q.reshape(1, d.kv_heads, group, d.head_dim)
        scores = torch.matmul(q, keys_h) * (d.head_dim ** -0.5) + mask.reshape(1, 1, 1, d.window)
        attention = torch.matmul(torch.softmax(scores, dim=-1), values_h)  # [1, kvH, group, hd]
        out = self.o_proj(attention.reshape(1, 1, d.heads * d.head_dim))
        residual = out + x
        result = self.mlp(_rms_norm(residual, self.channel_pre_norm.weight, d.eps)) + residual
        return result, keys[:, 1:, :], values[:, 1:, :]


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, dims: GriffinShape) -> tuple[torch.Tensor, torch.Tensor]:
    """The host's cos/sin [1, 1, rotary_dim] widened to the head [1, 1, 1, head_dim]: cos 1 and sin 0 where RoPE
    leaves the channels alone, and sin carrying rotate-half's sign (its first half rotates in negated)."""
    half, rest = dims.rotary_dim // 2, dims.head_dim - dims.rotary_dim
    sign = torch.cat([-torch.ones(half), torch.ones(half)])
    return (torch.cat([cos.reshape(1, 1, 1, -1), torch.ones(1, 1, 1, rest)], dim=-1),
            torch.cat([(sin * sign).reshape(1, 1, 1, -1), torch.zeros(1, 1, 1, rest)], dim=-1))


class ChunkStep(nn.Module):
    """Layers [first, last) of the model as one graph: x + their states in, x + new states out."""

    def __init__(self, model: Any, dims: GriffinShape, layers: list[int]) -> None:
        super().__init__()
        self.dims = dims
        self.layer_ids = list(layers)
        decoder = model.model.layers
        self.blocks = nn.ModuleList(
            RecurrentLayer(decoder[i], dims) if dims.kinds[i] == "recurrent" else AttentionLayer(decoder[i], dims)
            for i in layers)

    @property
    def has_attention(self) -> bool:
        return any(self.dims.kinds[i] == "attention" for i in self.layer_ids)

    @property
    def has_recurrent(self) -> bool:
        return any(self.dims.kinds[i] == "recurrent" for i in self.layer_ids)

    def input_names(self) -> list[str]:
        names = ["x"]
        if self.has_attention:
            names += ["cos", "sin", "mask"]
        if self.has_recurrent:
            names.append("reset")
        for i in self.layer_ids:
            names += list(self.dims.state_shapes(i))
        return names

    def output_names(self) -> list[str]:
        return ["x_out"] + [f"new_{n}" for i in self.layer_ids for n in self.dims.state_shapes(i)]

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        d = self.dims
        shapes: dict[str, tuple[int, ...]] = {"x": (1, 1, d.hidden), "cos": (1, 1, d.rotary_dim),
                                              "sin": (1, 1, d.rotary_dim), "mask": (1, 1, d.window),
                                              "reset": (1, 1, 1)}
        for i in self.layer_ids:
            shapes.update(d.state_shapes(i))
        return {name: shapes[name] for name in self.input_names()}

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.input_names(), inputs, strict=True))
        x = named["x"]
        if self.has_attention:  # once per graph, for every attention layer in it
            named["cos"], named["sin"] = rope_tables(named["cos"], named["sin"], self.dims)
        outputs: list[torch.Tensor] = []
        for i, block in zip(self.layer_ids, self.blocks, strict=True):
            if isinstance(block, RecurrentLayer):
                x, conv, h = block(x, named[f"conv{i}"], named[f"h{i}"], named["reset"])
                outputs += [conv, h]
            else:
                x, k, v = block(x, named[f"k{i}"], named[f"v{i}"], named["cos"], named["sin"], named["mask"])
                outputs += [k, v]
        return (x, *outputs)


class HeadStep(nn.Module):
    """Final norm, the tied LM head's rows [start, stop) and the logit soft-cap: hidden vector in, those logits out.

    A 256k-row head is ~655M parameters; building it as one graph took 12.8 GB of host RAM (feasibility section 6),
    so it can be split by vocabulary rows into several graphs whose logits the host concatenates."""

    def __init__(self, model: Any, dims: GriffinShape, rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.final_norm = model.model.final_norm
        self.start, self.stop = rows or (0, dims.vocab)
        weight = model.lm_head.weight
        # a view of the tied weight, not a copy: the split heads of a 256k vocabulary would hold a second 2.6 GB
        # float32 table (the exported ONNX is byte-identical either way)
        self.weight = weight if (self.start, self.stop) == (0, dims.vocab) else nn.Parameter(
            weight.detach()[self.start:self.stop], requires_grad=False)
        self.dims = dims

    def input_names(self) -> list[str]:
        return ["x"]

    def output_names(self) -> list[str]:
        return ["logits"]

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"x": (1, 1, self.dims.hidden)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = _rms_norm(x, self.final_norm.weight, self.dims.eps)
        # [1, rows, 1, 1]: the NPU's own layout, so the toolkit adds no reshape after the head. To [1, rows] (or
        # [1, 1, rows]) it adds one, which it put on the CPU for 250 and 259 rows, not for 240 or 256 (its layer table;
        # 259 is the tiny test model's vocabulary). NCHW and NHWC flatten alike here; the host flattens the logits.
        logits = nn.functional.linear(normed, self.weight).reshape(1, -1, 1, 1)
        cap = self.dims.logits_soft_cap
        return torch.tanh(logits / cap) * cap


def plan_head_rows(dims: GriffinShape, *, max_params: int) -> list[tuple[int, int]]:
    """Vocabulary row ranges for the head graphs, each at most ``max_params`` parameters (equal parts)."""
    parts = max(1, -(-(dims.vocab * dims.hidden) // max(max_params, 1)))
    parts = min(parts, dims.vocab)
    bounds = [round(i * dims.vocab / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def plan_chunks(dims: GriffinShape, layer_params: list[int], *, max_params: int) -> list[list[int]]:
    """Consecutive layer groups of at most ``max_params`` parameters each (at least one layer per group)."""
    chunks: list[list[int]] = [[]]
    size = 0
    for layer, params in enumerate(layer_params):
        if chunks[-1] and size + params > max_params:
            chunks.append([])
            size = 0
        chunks[-1].append(layer)
        size += params
    return chunks


def layer_param_counts(model: Any) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]


def embedding_table(model: Any, dims: GriffinShape) -> torch.Tensor:
    """The embedding rows as the first graph receives them: already scaled by the bf16-rounded normalizer."""
    return model.model.embed_tokens.weight.detach().float() * dims.normalizer
