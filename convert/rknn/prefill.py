"""Chunked prefill for RecurrentGemma on RKNN: T prompt tokens through one graph, states carried across chunks.

The decode step (``decode_step.py``) takes one token; a 128-token prompt through it reads every weight 128 times
(issue 16: 11.5 s TTFT predicted for recurrentgemma-2b-it). The prefill graph takes T tokens at once and reads the
weights once per chunk, so prefill becomes compute bound instead (:func:`predict_prefill`).

The graph is **shape-agnostic in T**: nothing in it depends on T except through the shapes of its inputs, so
rknn-toolkit2 can build one model for several chunk lengths (``dynamic_input``), T = 1 included, which is the
decode step itself (benchmarks/bench_rknn_dynamic_shapes.py measures what sharing the weights costs). That rules
out a scan unrolled over T; the RG-LRU recurrence is instead evaluated in closed form inside the graph:

    h_t = sum_{s=-1..t} exp(D[t, s]) * b_s,   b_{-1} = h_in,  b_s = sqrt(1 - a_s^2) * i_s * x_s,
    D[t, s] = sum_{r=s+1..t} log a_r          (D[t, t] = 0; D[t, -1] sums from the chunk's first token)

``D`` is one MatMul of the per-token ``log a`` [T, L] with a 0/1 matrix the host supplies (``scan``
[1, T*(T+1), T]), and ``causal`` [1, T, T+1] zeroes the terms with s > t. Each entry of ``D`` sums at most T
small terms directly (never a difference of two large running sums), so fp16 keeps its relative precision where
exp(D) matters; channels that decay fast have exp(D) ~ 0 either way. The conv1d window and the attention use
Concat and Slices with constant (negative) offsets only; the attention runs over the window's W-1 cached slots
plus the chunk's T, with an additive mask the host computes (``mask`` [1, T, W-1+T]).

Inputs of a layer group's prefill graph (states named as the decode step's): ``x`` [1, T, H], ``cos``/``sin``
[1, T, rotary_dim], ``mask``, ``reset`` [1, T, 1] (1 at position 0), ``scan``, ``causal``, then every state;
outputs ``x_out`` [1, T, H] and ``new_<state>``. The LM head graph of the decode step is reused for the chunk's
last row. Verified against transformers (:func:`verify_prefill_against_transformers`).

Measured (benchmarks/bench_rknn_dynamic_shapes.py, rknn-toolkit2 2.5.0, fp16, simulator): one model with the
shapes T = 1, 16, 64 keeps one copy of the weights. A random RecurrentGemma of 21.3M parameters (42.5 MB fp16) is
43.98 MB with one shape and 51.48 MB with three (~3.7 MB of graph code per added shape), against 133.4 MB as three
models; every shape's outputs match torch (cosine >= 0.99999). Plain w8a8 builds with several shapes too, but the
hybrid flow (hybrid_quantization_step1/2) keeps only the calibration data's shape, and step 2 refuses a config: a
hybrid bundle needs separate fixed-T prefill graphs, one more copy of the layer weights each (not measured on a
board; the simulator's RSS mixes build and per-shape working memory and cannot tell the board's).

No torch or numpy at import: ``rkedge plan`` imports :func:`predict_prefill` on hosts without them, so the torch
module class is made on first use (:func:`prefill_module`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from rkedge.convert.rknn.shape import GriffinShape

if TYPE_CHECKING:
    from rkedge.runtime.rknn.loop import DecodeLoop, Floats, GraphRunner

MASK_VALUE = -30.0  # as the decode step's (exp(-30) ~ 1e-13, representable in fp16)
#: Inputs that are not states: what the host computes per chunk (:func:`chunk_features`).
FEATURE_INPUTS = ("x", "cos", "sin", "mask", "reset", "scan", "causal")
#: The symbolic axes of a prefill graph's inputs for ``torch.onnx.export(dynamic_axes=...)`` (states are fixed),
#: so rknn-toolkit2 can build it for several T (:func:`dynamic_input`).
DYNAMIC_AXES = {"x": {1: "T"}, "cos": {1: "T"}, "sin": {1: "T"}, "mask": {1: "T", 2: "S"}, "reset": {1: "T"},
                "scan": {1: "TT1", 2: "T"}, "causal": {1: "T", 2: "T1"}}
#: Chunk lengths :func:`choose_chunk` picks from: past the balance point a longer chunk saves no weight reads (it
#: is compute bound), while the closed-form scan grows as T^2 per recurrent layer.
MIN_CHUNK, MAX_CHUNK = 16, 64


# --- host side: numpy, the same on the board ---------------------------------------------------------------

def chunk_features(start: int, length: int, *, rotary_dim: int, rope_theta: float, window: int
                   ) -> dict[str, Floats]:
    """cos/sin, reset, the attention mask over [W-1 cached slots | ``length`` new] and the scan matrices for the
    chunk of positions [start, start + length). Slot j holds position ``start - (W-1) + j``; query t (position
    start + t) sees it when that position is >= 0, <= start + t and > start + t - W (transformers' sliding window:
    kv_idx > q_idx - W). For length 1 this equals the decode step's features."""
    import numpy as np

    inv_freq = 1.0 / (rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    positions = np.arange(start, start + length, dtype=np.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    slot_pos = start - (window - 1) + np.arange(window - 1 + length)
    query_pos = np.arange(start, start + length)[:, None]
    visible = (slot_pos[None, :] >= 0) & (slot_pos[None, :] <= query_pos) & (slot_pos[None, :] > query_pos - window)
    t = np.arange(length)
    s = np.arange(length + 1)  # s' = s + 1: column 0 is the incoming state h_in
    r = np.arange(length)
    # scan[(t, s'), r] = 1 when s' <= r <= t: the log a_r that decay b_{s'-1} by the time of token t
    scan = ((s[None, :, None] <= r[None, None, :]) & (r[None, None, :] <= t[:, None, None]))
    causal = s[None, :] <= t[:, None] + 1
    reset = (positions == 0).astype(np.float32)
    return {"cos": np.cos(emb).reshape(1, length, rotary_dim).astype(np.float32),
            "sin": np.sin(emb).reshape(1, length, rotary_dim).astype(np.float32),
            "mask": np.where(visible, 0.0, MASK_VALUE).reshape(1, length, -1).astype(np.float32),
            "reset": reset.reshape(1, length, 1),
            "scan": scan.reshape(1, length * (length + 1), length).astype(np.float32),
            "causal": causal.reshape(1, length, length + 1).astype(np.float32)}


def plan_prompt(tokens: int, chunks: Sequence[int]) -> list[int]:
    """The chunk lengths a prompt of ``tokens`` runs as, longest first (greedy); what no chunk length fits goes
    one token at a time (length 1), e.g. 100 tokens over (32,) -> [32, 32, 32, 1, 1, 1, 1]."""
    plan: list[int] = []
    left = tokens
    for length in sorted({c for c in chunks if c > 1}, reverse=True):
        count, left = divmod(left, length)
        plan += [length] * count
    return plan + [1] * left


@dataclass
class PrefillGraph:
    """One layer group's prefill graph, as a loop runs it: its layers, input and output names."""

    layers: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def run_prefill(loop: DecodeLoop, graphs: Sequence[PrefillGraph], runner: GraphRunner, tokens: Sequence[int],
                chunks: Sequence[int], *, all_logits: bool = False) -> Floats:
    """Feeds ``tokens`` from the loop's current position: chunks through the prefill graphs (run by ``runner``,
    numbered like ``graphs``), the rest through the loop's decode step, states shared with the loop; when
    ``chunks`` holds 1, the rest goes through the prefill graph at T = 1 instead (one multi-shape model serving as
    the decode step too). Returns the last token's logits [vocab] (the head graphs of the loop), or with
    ``all_logits`` every token's [len, vocab] (for verification: the head runs once per token)."""
    import numpy as np

    if not tokens:
        from rkedge.errors import InputError

        raise InputError("an empty prompt has nothing to prefill.", fix="pass at least one token")
    rows: list[Floats] = []
    done = 0
    for length in plan_prompt(len(tokens), chunks):
        part = tokens[done:done + length]
        done += length
        if length == 1 and 1 not in chunks:
            logits = loop.step(part[0], logits=all_logits or done == len(tokens))
            if logits is not None:
                rows.append(logits.reshape(1, -1))
            continue
        x = loop.embedding[list(part)].astype(np.float32).reshape(1, length, -1)
        features = chunk_features(loop.position, length, rotary_dim=loop.rotary_dim, rope_theta=loop.rope_theta,
                                  window=loop.window)
        for index, graph in enumerate(graphs):
            values = {"x": x, **features, **loop.states}
            outputs = runner.run(index, [values[name] for name in graph.inputs])
            x = outputs[0].reshape(1, length, -1).astype(np.float32)
            for name, value in zip(graph.outputs[1:], outputs[1:], strict=True):
                state = name[len("new_"):]
                loop.states[state] = value.reshape(loop.states[state].shape).astype(np.float32)
        loop.position += length
        wanted = range(length) if all_logits else ([length - 1] if done == len(tokens) else [])
        for t in wanted:
            rows.append(_head(loop, x[:, t:t + 1, :]).reshape(1, -1))
    return rows[-1].reshape(-1) if not all_logits else np.concatenate(rows).astype(np.float32)


def _head(loop: DecodeLoop, x: Floats) -> Floats:
    """The decode step's head graphs on one hidden row (vocabulary slices concatenated)."""
    import numpy as np

    first = len(loop.chunks)
    parts = [loop.runner.run(first + j, [np.ascontiguousarray(x)])[0].reshape(-1) for j in range(len(loop.heads))]
    joined: Floats = np.concatenate(parts).astype(np.float32)
    return joined


# --- the TTFT prediction (stdlib only: rkedge plan) ---------------------------------------------------------

#: Elements per second of the RG-LRU's exp on the board's CPU (rknn-toolkit2 places Exp on the CPU for rk3588;
#: feasibility section 4). NOT MEASURED: no board has run it; an assumption of one element per ns on the A76 cores.
#: The closed-form scan takes T*(T+1)*lru_width of them per recurrent layer; the ``poly`` expm1 rewrite would move
#: them to the NPU.
CPU_EXP_PER_S = 1e9


@dataclass(frozen=True)
class PrefillPrediction:
    prompt_tokens: int
    chunk: int
    plan: tuple[int, ...]  # chunk lengths, then decode steps (1)
    chunk_ms: float  # one chunk: max(weight read, matmul compute) + attention + scan + per-layer overhead
    weight_read_ms: float
    compute_ms: float
    scan_ms: float
    decode_step_ms: float
    head_ms: float  # the LM head once, for the last token
    ttft_ms: float
    formula: str


FORMULA = ("TTFT = n_chunks * (max(W_layers / BW, 2 * P_layers * T / TOPS) + F_attn(T) / TOPS + E_scan(T) / CPU_EXP"
           " + layers * layer_ms) + n_rest * decode_step_ms + (W_head / BW + 2 * P_head / TOPS), where W are weight "
           "bytes at the dtype, P parameters, BW and TOPS the perf model's fitted effective bandwidth and int8 "
           "matmul rate, layer_ms its per-layer decode overhead, F_attn = 4 * heads * head_dim * (W-1+T) * T per "
           "attention layer, E_scan = T*(T+1)*lru_width exps per recurrent layer; n_rest tokens go through the "
           "decode step")


def choose_chunk(shape: GriffinShape, dtype: str = "w8a8") -> int:
    """T: the smallest power of two at which a chunk's matmuls take as long as reading the weights once (fewer
    tokens leave the chunk bandwidth bound, more save nothing and grow the scan as T^2), within 16..64."""
    from rkedge.convert.perf_model import load_perf_model
    from rkedge.convert.rknn_plan import RKNN_WEIGHT_BYTES

    model = load_perf_model()
    balance = RKNN_WEIGHT_BYTES[dtype] * model.matmul_tops * 1e12 / (2 * model.bandwidth_gbs * 1e9)
    chunk = 1 << math.ceil(math.log2(max(balance, 1.0)))
    return min(MAX_CHUNK, max(MIN_CHUNK, chunk))


def predict_prefill(shape: GriffinShape, prompt_tokens: int = 128, dtype: str = "w8a8", chunk: int | None = None,
                    decode_step_ms: float | None = None) -> PrefillPrediction:
    """TTFT of ``prompt_tokens`` through the prefill graph in chunks of ``chunk`` (default :func:`choose_chunk`),
    the remainder through the decode step (``decode_step_ms``, default the plan's bandwidth bound). :data:`FORMULA`
    states it; the physical constants are the perf model's (fitted to RKLLM's published figures: the generic RKNN
    path may fall short of RKLLM's hand-tuned kernels, which only a board can tell)."""
    from rkedge.convert.perf_model import load_perf_model
    from rkedge.convert.rknn_plan import RKNN_WEIGHT_BYTES, predict_griffin

    model = load_perf_model()
    length = chunk or choose_chunk(shape, dtype)
    bandwidth, flops_per_s = model.bandwidth_gbs * 1e9, model.matmul_tops * 1e12
    per = RKNN_WEIGHT_BYTES[dtype]
    weight_read_ms = shape.layer_params * per / bandwidth * 1000
    compute_ms = 2 * shape.layer_params * length / flops_per_s * 1000
    attention_flops = 4 * shape.heads * shape.head_dim * (shape.window - 1 + length) * length * shape.attention_layers
    scan_ms = length * (length + 1) * shape.lru_width * shape.recurrent_layers / CPU_EXP_PER_S * 1000
    overhead_ms = shape.layers * model.decode[1]
    chunk_ms = max(weight_read_ms, compute_ms) + attention_flops / flops_per_s * 1000 + scan_ms + overhead_ms
    head_params = shape.vocab * shape.hidden
    head_ms = (head_params * per / bandwidth + 2 * head_params / flops_per_s) * 1000
    step_ms = decode_step_ms if decode_step_ms is not None else 1000 / predict_griffin(shape, dtype).decode_tokens_per_s
    plan = plan_prompt(prompt_tokens, [length])
    chunks, rest = plan.count(length) if length > 1 else 0, plan.count(1)
    # a remainder's last decode step already reads the head; otherwise the head runs once after the last chunk
    ttft = chunks * chunk_ms + rest * step_ms + (head_ms if rest == 0 else 0.0)
    return PrefillPrediction(prompt_tokens, length, tuple(plan), chunk_ms, weight_read_ms, compute_ms, scan_ms,
                             step_ms, head_ms, ttft, FORMULA)


# --- the torch graph (host side) ----------------------------------------------------------------------------

def prefill_module(model: Any, dims: GriffinShape, layers: Sequence[int]) -> Any:
    """The prefill graph of ``layers`` as a torch module over the model's own weights (``torch.nn.Module``)."""
    return _prefill_class()(model, dims, list(layers))


def dynamic_axes(module: Any) -> dict[str, dict[int, str]]:
    """:data:`DYNAMIC_AXES` for the inputs ``module`` has."""
    return {name: axes for name, axes in DYNAMIC_AXES.items() if name in module.input_names()}


def dynamic_input(module: Any, lengths: Sequence[int]) -> list[list[list[int]]]:
    """rknn-toolkit2's ``config(dynamic_input=...)``: one shape set per chunk length, inputs in graph order."""
    return [[list(shape) for shape in module.input_shapes(length).values()] for length in lengths]


def prefill_graph(module: Any) -> PrefillGraph:
    return PrefillGraph(tuple(module.layer_ids), tuple(module.input_names()), tuple(module.output_names()))


@lru_cache(maxsize=1)
def _prefill_class() -> Any:
    """Made on first use so this module imports without torch (see the module docstring)."""
    import torch
    from torch import nn

    from rkedge.convert.rknn.decode_step import _gelu_tanh, _Mlp, _rms_norm

    def rope(t: Any, cos: Any, sin: Any, rot: int) -> Any:
        t_rot, t_pass = t[..., :rot], t[..., rot:]
        half = rot // 2
        rotated = torch.cat([-t_rot[..., half:], t_rot[..., :half]], dim=-1)
        return torch.cat([t_rot * cos + rotated * sin, t_pass], dim=-1)

    class RgLruScan(nn.Module):
        """The RG-LRU over a chunk in closed form (module docstring). Scoped ``rg_lru`` in the ONNX graph, as the
        decode step's, so the hybrid quantization's patterns find it."""

        def __init__(self, source: Any, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.recurrent_param = source.recurrent_param
            self.input_gate_weight, self.input_gate_bias = source.input_gate_weight, source.input_gate_bias
            self.recurrent_gate_weight = source.recurrent_gate_weight
            self.recurrent_gate_bias = source.recurrent_gate_bias

        def forward(self, x: Any, h: Any, reset: Any, scan: Any, causal: Any) -> tuple[Any, Any]:
            width = x.shape[-1]
            block = width // self.heads
            blocks = x.reshape(-1, self.heads, block).transpose(0, 1)  # [heads, T, block]
            input_gate = torch.sigmoid(torch.matmul(blocks, self.input_gate_weight) + self.input_gate_bias[:, None])
            recurrent_gate = torch.sigmoid(torch.matmul(blocks, self.recurrent_gate_weight)
                                           + self.recurrent_gate_bias[:, None])
            input_gate = input_gate.transpose(0, 1).reshape(1, -1, width)
            recurrent_gate = recurrent_gate.transpose(0, 1).reshape(1, -1, width)
            log_a = -8.0 * recurrent_gate * nn.functional.softplus(self.recurrent_param)  # [1, T, L]
            multiplier = torch.sqrt(1.0 - torch.exp(2.0 * log_a))
            multiplier = reset + (1.0 - reset) * multiplier  # 1 at position 0, as transformers
            log_a = log_a + MASK_VALUE * reset  # a = 0 at position 0: the incoming state is dropped
            terms = torch.cat([h.reshape(1, 1, width), x * input_gate * multiplier], dim=1)  # [1, T+1, L]
            decay = torch.matmul(scan, log_a)  # [1, T*(T+1), L]
            weights = torch.exp(decay).reshape(1, causal.shape[1], causal.shape[2], width) * causal[..., None]
            hs = (weights * terms[:, None, :, :]).sum(dim=2)  # [1, T, L]
            return hs, hs[:, -1, :]

    class ShortConvChunk(nn.Module):
        """The conv1d over the chunk with its K-1 carried inputs; scoped ``conv1d`` like the decode step's."""

        def __init__(self, source: Any) -> None:
            super().__init__()
            self.weight, self.bias = source.weight, source.bias  # [L, 1, K], [L]
            self.taps = int(source.weight.shape[-1])  # a Python int, so the ONNX trace keeps the slices constant

        def forward(self, conv: Any, xb: Any) -> tuple[Any, Any]:
            window = torch.cat([conv, xb], dim=1)  # [1, K-1+T, L], time-major
            taps = self.taps
            out = self.bias
            for k in range(taps):  # tap k reads window[k : k+T]; negative ends keep T out of the graph
                end = k - (taps - 1)
                out = out + window[:, k:end if end else None, :] * self.weight[:, 0, k]
            return out, window[:, -(taps - 1):, :]

    class PrefillChunk(nn.Module):
        """Layers ``layers`` over T tokens: x + the states in, x + the new states out (names as the decode step)."""

        def __init__(self, model: Any, dims: GriffinShape, layers: list[int]) -> None:
            super().__init__()
            self.dims = dims
            self.layer_ids = layers
            decoder = model.model.layers
            self.blocks = nn.ModuleList()
            for i in layers:
                source = decoder[i]
                block = nn.Module()
                block.temporal_pre_norm, block.channel_pre_norm = source.temporal_pre_norm, source.channel_pre_norm
                block.mlp = _Mlp(source.mlp_block)
                temporal = source.temporal_block
                if dims.kinds[i] == "recurrent":
                    block.linear_x, block.linear_y = temporal.linear_x, temporal.linear_y
                    block.linear_out = temporal.linear_out
                    block.conv1d = ShortConvChunk(temporal.conv_1d)
                    block.rg_lru = RgLruScan(temporal.rg_lru, dims.heads)
                else:
                    block.q_proj, block.k_proj = temporal.q_proj, temporal.k_proj
                    block.v_proj, block.o_proj = temporal.v_proj, temporal.o_proj
                self.blocks.append(block)

        def input_names(self) -> list[str]:
            kinds = {self.dims.kinds[i] for i in self.layer_ids}
            names = ["x"] + (["cos", "sin", "mask"] if "attention" in kinds else [])
            names += ["reset", "scan", "causal"] if "recurrent" in kinds else []
            for i in self.layer_ids:
                names += list(self.dims.state_shapes(i))
            return names

        def output_names(self) -> list[str]:
            return ["x_out"] + [f"new_{n}" for i in self.layer_ids for n in self.dims.state_shapes(i)]

        def input_shapes(self, length: int) -> dict[str, tuple[int, ...]]:
            d = self.dims
            shapes: dict[str, tuple[int, ...]] = {
                "x": (1, length, d.hidden), "cos": (1, length, d.rotary_dim), "sin": (1, length, d.rotary_dim),
                "mask": (1, length, d.window - 1 + length), "reset": (1, length, 1),
                "scan": (1, length * (length + 1), length), "causal": (1, length, length + 1)}
            for i in self.layer_ids:
                shapes.update(d.state_shapes(i))
            return {name: shapes[name] for name in self.input_names()}

        def _recurrent(self, block: Any, x: Any, conv: Any, h: Any, named: dict[str, Any]) -> tuple[Any, ...]:
            normed = _rms_norm(x, block.temporal_pre_norm.weight, self.dims.eps)
            y = _gelu_tanh(block.linear_y(normed))
            xc, new_conv = block.conv1d(conv, block.linear_x(normed))
            hs, new_h = block.rg_lru(xc, h, named["reset"], named["scan"], named["causal"])
            residual = block.linear_out(hs * y) + x
            return block.mlp(_rms_norm(residual, block.channel_pre_norm.weight, self.dims.eps)) + residual, \
                new_conv, new_h

        def _attention(self, block: Any, x: Any, k_cache: Any, v_cache: Any, named: dict[str, Any]
                       ) -> tuple[Any, ...]:
            d = self.dims
            normed = _rms_norm(x, block.temporal_pre_norm.weight, d.eps)
            cos, sin = named["cos"][:, :, None, :], named["sin"][:, :, None, :]  # [1, T, 1, rot]
            q = rope(block.q_proj(normed).reshape(1, -1, d.heads, d.head_dim), cos, sin, d.rotary_dim)
            k = rope(block.k_proj(normed).reshape(1, -1, d.kv_heads, d.head_dim), cos, sin, d.rotary_dim)
            v = block.v_proj(normed)
            keys = torch.cat([k_cache, k.reshape(1, -1, d.kv_heads * d.head_dim)], dim=1)  # [1, W-1+T, D]
            values = torch.cat([v_cache, v], dim=1)
            keys_h = keys.reshape(1, -1, d.kv_heads, d.head_dim).permute(0, 2, 3, 1)  # [1, kvH, hd, S]
            values_h = values.reshape(1, -1, d.kv_heads, d.head_dim).permute(0, 2, 1, 3)  # [1, kvH, S, hd]
            # heads h = kv * group + g share kv head kv (transformers' repeat_kv): rows (g, t) per kv head
            q = q.permute(0, 2, 1, 3).reshape(1, d.kv_heads, -1, d.head_dim)  # [1, kvH, group*T, hd]
            scores = torch.matmul(q, keys_h) * (d.head_dim ** -0.5)
            slots = keys.shape[1]
            scores = scores.reshape(1, d.heads, -1, slots) + named["mask"][:, None, :, :]
            probs = torch.softmax(scores, dim=-1).reshape(1, d.kv_heads, -1, slots)
            attention = torch.matmul(probs, values_h).reshape(1, d.heads, -1, d.head_dim)
            out = block.o_proj(attention.permute(0, 2, 1, 3).reshape(1, -1, d.heads * d.head_dim))
            residual = out + x
            tail = d.window - 1
            return block.mlp(_rms_norm(residual, block.channel_pre_norm.weight, d.eps)) + residual, \
                keys[:, -tail:, :], values[:, -tail:, :]

        def forward(self, *inputs: Any) -> tuple[Any, ...]:
            named = dict(zip(self.input_names(), inputs, strict=True))
            x = named["x"]
            outputs: list[Any] = []
            for i, block in zip(self.layer_ids, self.blocks, strict=True):
                if self.dims.kinds[i] == "recurrent":
                    x, conv, h = self._recurrent(block, x, named[f"conv{i}"], named[f"h{i}"], named)
                    outputs += [conv, h]
                else:
                    x, k, v = self._attention(block, x, named[f"k{i}"], named[f"v{i}"], named)
                    outputs += [k, v]
            return (x, *outputs)

    return PrefillChunk


class TorchPrefill:
    """A GraphRunner over prefill modules (torch, float32)."""

    def __init__(self, modules: Sequence[Any]) -> None:
        self.modules = list(modules)

    def run(self, index: int, inputs: list[Floats]) -> list[Floats]:
        import numpy as np
        import torch

        with torch.no_grad():
            out = self.modules[index](*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
        return [t.numpy() for t in out]


def torch_prefill(model: Any, loop: DecodeLoop) -> tuple[list[PrefillGraph], TorchPrefill]:
    """Prefill graphs over the same layer groups as ``loop``'s decode graphs, and their torch runner."""
    from rkedge.convert.rknn.shape import GriffinShape

    dims = GriffinShape.from_transformers(model.config)
    modules = [prefill_module(model, dims, spec.layers).eval() for spec in loop.chunks]
    return [prefill_graph(m) for m in modules], TorchPrefill(modules)


def verify_prefill_against_transformers(model: Any, tokens: Sequence[int], chunks: Sequence[int],
                                        make_runner: Callable[[DecodeLoop], tuple[list[PrefillGraph], Any]]
                                        | None = None) -> dict[str, float]:
    """Every position's logits of the chunked path against transformers' forward pass, and its final states
    against the decode step fed token by token (both in torch unless ``make_runner`` gives other graphs)."""
    import numpy as np
    import torch

    from rkedge.convert.rknn.torch_graphs import torch_loop

    with torch.no_grad():
        reference = model(input_ids=torch.tensor([list(tokens)]), use_cache=False).logits[0].float().numpy()
    stepped = torch_loop(model)
    for token in tokens:
        stepped.step(token, logits=False)
    loop = torch_loop(model)
    graphs, runner = (make_runner or (lambda lp: torch_prefill(model, lp)))(loop)
    ours = run_prefill(loop, graphs, runner, tokens, chunks, all_logits=True)
    cosine = (reference * ours).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(ours, axis=-1))
    centred_ref, centred_ours = reference - reference.mean(-1, keepdims=True), ours - ours.mean(-1, keepdims=True)
    centred = (centred_ref * centred_ours).sum(-1) / (np.linalg.norm(centred_ref, axis=-1)
                                                      * np.linalg.norm(centred_ours, axis=-1))
    state_diff = max(float(np.abs(loop.states[k] - stepped.states[k]).max()) for k in stepped.states)
    return {"tokens": len(tokens), "max_abs_diff": float(np.abs(reference - ours).max()),
            "min_cosine": float(cosine.min()), "min_centred_cosine": float(centred.min()),
            "argmax_agreement": float((reference.argmax(-1) == ours.argmax(-1)).mean()),
            "max_state_diff": state_diff, "position": loop.position}
