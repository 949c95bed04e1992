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

What runs at inference (the chunk plan, the host features, running the graphs with the carried states) is the
board's half, :mod:`rkedge.runtime.rknn.prefill`; this module keeps the torch graph, its export, calibration and
verification (:func:`prepare_prefill`, :func:`prefill_section`, called by ``rkedge convert --backend rknn``) and the
TTFT prediction (:func:`predict_prefill`, used by ``rkedge plan``).

No torch or numpy at import: ``rkedge plan`` imports :func:`predict_prefill` on hosts without them, so the torch
module class is made on first use (:func:`prefill_module`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkedge.convert.rknn.shape import GriffinShape
from rkedge.runtime.rknn.prefill import (  # the board half, re-exported for the host side's callers
    FEATURE_INPUTS,
    MASK_VALUE,
    PrefillGraph,
    chunk_features,
    plan_prompt,
    run_prefill,
)

if TYPE_CHECKING:
    from rkedge.runtime.rknn.loop import DecodeLoop, Floats

#: The symbolic axes of a prefill graph's inputs for ``torch.onnx.export(dynamic_axes=...)`` (states are fixed),
#: so rknn-toolkit2 can build it for several T (:func:`dynamic_input`).
DYNAMIC_AXES = {"x": {1: "T"}, "cos": {1: "T"}, "sin": {1: "T"}, "mask": {1: "T", 2: "S"}, "reset": {1: "T"},
                "scan": {1: "TT1", 2: "T"}, "causal": {1: "T", 2: "T1"}}
#: Chunk lengths :func:`choose_chunk` picks from: past the balance point a longer chunk saves no weight reads (it
#: is compute bound), while the closed-form scan grows as T^2 per recurrent layer.
MIN_CHUNK, MAX_CHUNK = 16, 64


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

    class RecurrentBlock(nn.Module):
        """One recurrent layer over the chunk. A called module (as the decode step's blocks), so the ONNX names
        are scoped ``/blocks.<n>/rg_lru/...`` like the decode graph's and its fp16 patterns find them."""

        def __init__(self, source: Any, dims: GriffinShape) -> None:
            super().__init__()
            self.eps = dims.eps
            self.temporal_pre_norm, self.channel_pre_norm = source.temporal_pre_norm, source.channel_pre_norm
            self.mlp = _Mlp(source.mlp_block)
            temporal = source.temporal_block
            self.linear_x, self.linear_y, self.linear_out = temporal.linear_x, temporal.linear_y, temporal.linear_out
            self.conv1d = ShortConvChunk(temporal.conv_1d)
            self.rg_lru = RgLruScan(temporal.rg_lru, dims.heads)

        def forward(self, x: Any, conv: Any, h: Any, reset: Any, scan: Any, causal: Any) -> tuple[Any, ...]:
            normed = _rms_norm(x, self.temporal_pre_norm.weight, self.eps)
            y = _gelu_tanh(self.linear_y(normed))
            xc, new_conv = self.conv1d(conv, self.linear_x(normed))
            hs, new_h = self.rg_lru(xc, h, reset, scan, causal)
            residual = self.linear_out(hs * y) + x
            return self.mlp(_rms_norm(residual, self.channel_pre_norm.weight, self.eps)) + residual, new_conv, new_h

    class AttentionBlock(nn.Module):
        """One local-attention layer over the window's cached slots plus the chunk (a called module, as above)."""

        def __init__(self, source: Any, dims: GriffinShape) -> None:
            super().__init__()
            self.dims = dims
            self.temporal_pre_norm, self.channel_pre_norm = source.temporal_pre_norm, source.channel_pre_norm
            self.mlp = _Mlp(source.mlp_block)
            temporal = source.temporal_block
            self.q_proj, self.k_proj = temporal.q_proj, temporal.k_proj
            self.v_proj, self.o_proj = temporal.v_proj, temporal.o_proj

        def forward(self, x: Any, k_cache: Any, v_cache: Any, cos: Any, sin: Any, mask: Any) -> tuple[Any, ...]:
            d = self.dims
            normed = _rms_norm(x, self.temporal_pre_norm.weight, d.eps)
            cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [1, T, 1, rot]
            q = rope(self.q_proj(normed).reshape(1, -1, d.heads, d.head_dim), cos, sin, d.rotary_dim)
            k = rope(self.k_proj(normed).reshape(1, -1, d.kv_heads, d.head_dim), cos, sin, d.rotary_dim)
            v = self.v_proj(normed)
            keys = torch.cat([k_cache, k.reshape(1, -1, d.kv_heads * d.head_dim)], dim=1)  # [1, W-1+T, D]
            values = torch.cat([v_cache, v], dim=1)
            keys_h = keys.reshape(1, -1, d.kv_heads, d.head_dim).permute(0, 2, 3, 1)  # [1, kvH, hd, S]
            values_h = values.reshape(1, -1, d.kv_heads, d.head_dim).permute(0, 2, 1, 3)  # [1, kvH, S, hd]
            # heads h = kv * group + g share kv head kv (transformers' repeat_kv): rows (g, t) per kv head
            q = q.permute(0, 2, 1, 3).reshape(1, d.kv_heads, -1, d.head_dim)  # [1, kvH, group*T, hd]
            scores = torch.matmul(q, keys_h) * (d.head_dim ** -0.5)
            slots = keys.shape[1]
            scores = scores.reshape(1, d.heads, -1, slots) + mask[:, None, :, :]
            probs = torch.softmax(scores, dim=-1).reshape(1, d.kv_heads, -1, slots)
            attention = torch.matmul(probs, values_h).reshape(1, d.heads, -1, d.head_dim)
            out = self.o_proj(attention.permute(0, 2, 1, 3).reshape(1, -1, d.heads * d.head_dim))
            residual = out + x
            tail = d.window - 1
            return self.mlp(_rms_norm(residual, self.channel_pre_norm.weight, d.eps)) + residual, \
                keys[:, -tail:, :], values[:, -tail:, :]

    class PrefillChunk(nn.Module):
        """Layers ``layers`` over T tokens: x + the states in, x + the new states out (names as the decode step)."""

        def __init__(self, model: Any, dims: GriffinShape, layers: list[int]) -> None:
            super().__init__()
            self.dims = dims
            self.layer_ids = layers
            decoder = model.model.layers
            self.blocks = nn.ModuleList(RecurrentBlock(decoder[i], dims) if dims.kinds[i] == "recurrent"
                                        else AttentionBlock(decoder[i], dims) for i in layers)

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

        def forward(self, *inputs: Any) -> tuple[Any, ...]:
            named = dict(zip(self.input_names(), inputs, strict=True))
            x = named["x"]
            outputs: list[Any] = []
            for i, block in zip(self.layer_ids, self.blocks, strict=True):
                if self.dims.kinds[i] == "recurrent":
                    x, conv, h = block(x, named[f"conv{i}"], named[f"h{i}"], named["reset"], named["scan"],
                                       named["causal"])
                    outputs += [conv, h]
                else:
                    x, k, v = block(x, named[f"k{i}"], named[f"v{i}"], named["cos"], named["sin"], named["mask"])
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
    assert ours is not None  # all_logits always returns the rows
    cosine = (reference * ours).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(ours, axis=-1))
    centred_ref, centred_ours = reference - reference.mean(-1, keepdims=True), ours - ours.mean(-1, keepdims=True)
    centred = (centred_ref * centred_ours).sum(-1) / (np.linalg.norm(centred_ref, axis=-1)
                                                      * np.linalg.norm(centred_ours, axis=-1))
    state_diff = max(float(np.abs(loop.states[k] - stepped.states[k]).max()) for k in stepped.states)
    return {"tokens": len(tokens), "max_abs_diff": float(np.abs(reference - ours).max()),
            "min_cosine": float(cosine.min()), "min_centred_cosine": float(centred.min()),
            "argmax_agreement": float((reference.argmax(-1) == ours.argmax(-1)).mean()),
            "max_state_diff": state_diff, "position": loop.position}


# --- the conversion: export, calibration, verification, bundle section (host side) -------------------------

#: The dtypes whose prefill graphs share the decode step's weights: one multi-shape model per layer group
#: (``dynamic_input`` with T and 1) serves the prompt's chunks and every decode step, so the board loads it instead
#: of the decode graphs. Measured for fp16 (module docstring). w8a8 keeps a separate fixed-T set: the hybrid flow
#: keeps one shape, and how plain w8a8 calibrates a multi-shape model (one dataset per shape?) is not measured.
SHARED_DTYPES = ("fp16",)
#: The verification prompt crosses the attention window when it is at most this long (a 2048-token window of the
#: 2b would take minutes of float32 torch on both sides); longer windows are verified across chunk boundaries only.
VERIFY_MAX_TOKENS = 400
#: Calibration samples per prefill graph (as the decode graphs': ~100 are enough for the activation ranges).
CALIBRATION_SAMPLES = 96


@dataclass
class PrefillBuild:
    """What the conversion prepared for the prefill graphs while the float model was loaded: their ONNX files,
    specs, calibration datasets and verification; built after the decode graphs (:func:`prefill_section`)."""

    chunk: int
    lengths: tuple[int, ...]
    shared: bool
    #: name, layers, inputs, outputs, shapes (at T = chunk), and when shared ``dynamic_input``: rknn-toolkit2's
    #: config(dynamic_input=...), one shape set per length, inputs in graph order
    specs: list[dict[str, Any]]
    datasets: dict[int, Path]
    verification: dict[str, Any]


def prefill_lengths(chunk: int, dtype: str, hybrid: bool) -> tuple[tuple[int, ...], bool]:
    """The chunk lengths the prefill graphs are built for and whether they share the decode step's weights."""
    shared = dtype in SHARED_DTYPES and not hybrid
    return ((chunk, 1) if shared else (chunk,)), shared


def verification_tokens(tokens: Sequence[int], chunk: int, window: int) -> list[int]:
    """A prompt for the build-time check: through the attention window wrap and two chunk boundaries, with a
    remainder for the decode step (``tokens`` repeated as needed)."""
    wanted = window + 2 * chunk + 3 if window + 2 * chunk + 3 <= VERIFY_MAX_TOKENS else 3 * chunk + 3
    source = list(tokens) or [0]
    out = list(source)
    while len(out) < wanted:
        out += source[1:] or source
    return out[:wanted]


def prepare_prefill(model: Any, loop: DecodeLoop, staging: Path, *, chunk: int, dtype: str, hybrid: bool,
                    verify_tokens: Sequence[int], calibration_tokens: Sequence[Sequence[int]],
                    report: Callable[[str, str], None]) -> PrefillBuild:
    """Export the prefill graphs (one per decode layer group, ONNX under ``staging/onnx/prefill<i>``), verify the
    chunked path against transformers in torch, and capture w8a8 calibration chunks from ``calibration_tokens``.
    Raises ToolkitError when the chunked path differs from transformers."""
    import torch

    from rkedge.errors import ToolkitError

    dims = GriffinShape.from_transformers(model.config)
    lengths, shared = prefill_lengths(chunk, dtype, hybrid)
    modules = [prefill_module(model, dims, spec.layers).eval() for spec in loop.chunks]
    tokens = verification_tokens(verify_tokens, chunk, dims.window)
    report("verify", f"chunked prefill (T = {chunk}) vs transformers, {len(tokens)} tokens")
    verification = verify_prefill_against_transformers(
        model, tokens, lengths, lambda lp: ([prefill_graph(m) for m in modules], TorchPrefill(modules)))
    verification["chunk"] = chunk
    if verification["max_abs_diff"] > 1e-3:
        raise ToolkitError(f"the prefill graph differs from transformers by {verification['max_abs_diff']:.2e}.",
                           fix="convert with --prefill-chunk 0 (the prompt then runs token by token); report it")
    specs = []
    report("export", f"{len(modules)} prefill graph(s), T = {chunk}{' and 1 (one model)' if shared else ''}")
    for index, module in enumerate(modules):
        name = f"prefill{index}"
        onnx_file = staging / "onnx" / name / f"{name}.onnx"
        onnx_file.parent.mkdir(parents=True)
        example = tuple(torch.zeros(shape) for shape in module.input_shapes(chunk).values())
        torch.onnx.export(module, example, str(onnx_file), opset_version=17, dynamo=False,
                          input_names=module.input_names(), output_names=module.output_names(),
                          dynamic_axes=dynamic_axes(module) if shared else None)
        specs.append({"name": name, "layers": list(module.layer_ids), "inputs": module.input_names(),
                      "outputs": module.output_names(),
                      "shapes": {k: list(v) for k, v in module.input_shapes(chunk).items()}})
    datasets: dict[int, Path] = {}
    if dtype == "w8a8":
        report("calibrate", f"prefill chunks of {chunk} tokens over the prompt set")
        datasets = capture_calibration(loop, modules, calibration_tokens, chunk, staging / "calibration-prefill")
    if shared:
        for spec, module in zip(specs, modules, strict=True):
            spec["dynamic_input"] = dynamic_input(module, lengths)
    return PrefillBuild(chunk, lengths, shared, specs, datasets, verification)


def graph_dynamic_input(build: PrefillBuild, index: int) -> list[list[list[int]]] | None:
    """The ``dynamic_input`` shape sets of prefill graph ``index`` (None: a fixed-shape graph)."""
    sets: list[list[list[int]]] | None = build.specs[index].get("dynamic_input")
    return sets


def capture_calibration(loop: DecodeLoop, modules: Sequence[Any], prompts: Sequence[Sequence[int]], chunk: int,
                        folder: Path) -> dict[int, Path]:
    """Real prefill inputs of every graph (torch), from each prompt's full chunks, about CALIBRATION_SAMPLES per
    graph, one .npy per input and one dataset line per sample (rknn-toolkit2's dataset format)."""

    from rkedge.runtime.rknn.prefill import run_chunk

    graphs = [prefill_graph(m) for m in modules]
    runner = TorchPrefill(modules)
    chunks = [(p, start) for p, tokens in enumerate(prompts) for start in range(0, len(tokens) - chunk + 1, chunk)]
    keep = set(range(0, len(chunks), max(1, len(chunks) // CALIBRATION_SAMPLES)))
    from rkedge.convert.rknn.pipeline import CalibrationSamples  # here: the pipeline imports this module

    samples = CalibrationSamples(folder, [list(g.inputs) for g in graphs], prefix="p")
    number = [0]
    capturing = [False]

    class Capture:
        def run(self, index: int, inputs: list[Floats]) -> list[Floats]:
            if capturing[0]:
                samples.save(index, number[0], inputs)
            return runner.run(index, inputs)

    capture = Capture()
    position = 0
    for tokens in prompts:
        loop.reset()
        for start in range(0, len(tokens) - chunk + 1, chunk):
            capturing[0] = position in keep
            run_chunk(loop, graphs, capture, tokens[start:start + chunk])
            if capturing[0]:
                number[0] += 1
            position += 1
    loop.reset()
    if not number[0]:
        from rkedge.errors import InputError

        raise InputError(f"no calibration prompt is {chunk} tokens long: the w8a8 prefill graphs have no data.",
                         fix="give longer calibration prompts, a smaller --prefill-chunk, or --prefill-chunk 0")
    return samples.datasets()


def prefill_section(build: PrefillBuild, built: Sequence[Mapping[str, Any]],
                    decode_graphs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The bundle manifest's ``prefill`` key (read by :class:`rkedge.runtime.rknn.prefill.PrefillSet`): the
    graphs as built, the chunk lengths, how the weights are held and what that costs in NPU memory (measured: the
    .rknn sizes, which hold the weights)."""
    graphs = []
    for spec, result in zip(build.specs, built, strict=True):
        graphs.append({**{k: v for k, v in spec.items() if k != "dynamic_input"},
                       "lengths": list(build.lengths), "rknn": result["rknn"], "dtype": result["dtype"],
                       "rknn_bytes": result["rknn_bytes"], "simulator": result["simulator"],
                       "fp16_tensors": result.get("fp16_tensors", []), "build_seconds": result["seconds"]})
    prefill_bytes = sum(int(g["rknn_bytes"]) for g in graphs)
    decode_bytes = sum(int(g["rknn_bytes"]) for g in decode_graphs)
    if build.shared:
        weights, extra = "shared", prefill_bytes - decode_bytes
        why = (f"one rknn-toolkit2 model per layer group built for T = {build.chunk} and T = 1 (dynamic_input) "
               "keeps one copy of the weights; it serves the prompt's chunks and every decode step, so the board "
               "loads it instead of the decode graphs (extra_bytes: its .rknn files minus the decode graphs')")
    else:
        weights, extra = "separate", prefill_bytes
        why = ("the w8a8 (hybrid) build keeps one input shape, so the prefill graphs are a fixed-T set loaded next "
               "to the decode graphs: one more copy of the layer weights (extra_bytes: their .rknn files)")
    return {"chunk": build.chunk, "lengths": list(build.lengths), "serves_decode": build.shared,
            "weights": weights, "extra_bytes": extra, "why": why, "graphs": graphs,
            "verification": build.verification}


__all__ = ["DYNAMIC_AXES", "FEATURE_INPUTS", "FORMULA", "MASK_VALUE", "PrefillBuild", "PrefillGraph",
           "PrefillPrediction", "TorchPrefill", "choose_chunk", "chunk_features", "dynamic_axes", "dynamic_input",
           "plan_prompt", "predict_prefill", "prefill_graph", "prefill_module", "prefill_section", "prepare_prefill",
           "run_prefill", "torch_prefill", "verify_prefill_against_transformers"]
