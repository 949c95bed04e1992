"""``rkedge plan`` for RecurrentGemma on the RKNN backend: weights per dtype, state, a bandwidth bound, RAM fit.

RecurrentGemma cannot become a ``.rkllm`` (no RKLLM version implements RG-LRU); rkedge runs it as a chain of
fixed-shape decode-step graphs compiled by rknn-toolkit2. Its decode state is small and does not grow with the
context: per recurrent layer an RG-LRU state and a 3-step conv1d state, per attention layer a window of
``attention_window_size`` keys and values. Decode reads every weight once per token, as RKLLM does, so the same
fitted effective bandwidth bounds it; the generic RKNN path may fall short of RKLLM's hand-tuned kernels (no
board has measured it). Facts and the limits below: recurrentgemma-rknn-feasibility.md sections 1, 4 and 6.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rkedge.convert.estimate import GIB
from rkedge.convert.perf_model import load_perf_model
from rkedge.convert.rknn.prefill import SHARED_DTYPES, predict_prefill
from rkedge.convert.rknn.shape import GriffinShape

SOURCE = "recurrentgemma-rknn-feasibility.md"
#: Bytes per weight on the NPU for the RKNN dtypes rk3588 accepts (w8a8 carries per-channel scales, ~0.15%).
RKNN_WEIGHT_BYTES = {"w8a8": 1.0015, "fp16": 2.0, "w16a16i_dfp": 2.0}
PESSIMISTIC_BANDWIDTH_GBS = 27.0  # the RKLLM-like effective figure the feasibility study assumed
RKNN_LIMITS = (
    "one .rknn must stay under 4 GiB: rknn_api.h sizes are uint32 (rknn_init size, total_weight_size)",
    "building takes ~20-28 bytes of host RAM per parameter, so the model is built as several graphs of about "
    "1 GB that chain their states (a full 2.7B graph would need ~55-75 GB); the 256k-vocab LM head alone took "
    "12.8 GB to build",
    "librknnrt has no IOMMU domain selector (RKLLM has base_domain_id): keep each context well under 4 GiB; drivers "
    "up to 0.9.6 have failed to map single buffers over 2 GiB",
    "the 256k-row embedding is looked up on the host (a Gather on the NPU would double the weight memory)",
    "the per-RKNN-layer and per-CPU-op costs in the decode time are assumptions (no board has run an RKNN graph): "
    "their share of the token time is the uncertain part of the prediction",
)

#: RKNN layers (ops left after rknn-toolkit2's fusions, graph I/O not counted) of one decode step, by part. Source:
#: the toolkit's own layer table (rkedge.convert.rknn.layers), rknn-toolkit2 2.5.0, fp16 builds at
#: recurrentgemma-2b-it width (hidden 2560, 10 heads, window 2048, random weights: placement follows shapes, not
#: values) of a one-layer graph of each kind and of the LM head, with rkedge.convert.rknn.decode_step as of issue 16.
#: "graph": a chunk graph's own rows, 2 for x in and out, 1 for the reset flag and 5 for the RoPE tables (counted
#: for every chunk graph: each of the 2b's holds both kinds). Before issue 16's rewrites (Exp -> Elu and the reset
#: folded into log_a in the RG-LRU, its two gates in one MatMul, RoPE as a gather over the whole head, the head's
#: logits left in the NPU's layout) the same builds counted recurrent 57 + 2 Exp on the CPU, attention 61, graph 2,
#: head 8: 1,562 layers for the 2b, 36 of them on the CPU; now 1,401 and none. Not counted: the exDataConvert
#: layers a w8a8 hybrid build adds where fp16 and int8 meet (the tiny model's chunk: 113 fp16, 123 hybrid; not
#: measured at 2b width).
RKNN_LAYERS = {"recurrent": 53, "attention": 53, "graph": 8, "head": 7}
#: Of those, the ops the toolkit placed on the CPU (same builds): none left.
RKNN_CPU_OPS = {"recurrent": 0, "attention": 0, "graph": 0, "head": 0}
#: ASSUMPTION (/work/shared has no per-layer figure for the RKNN runtime; no board has run these graphs): the fixed
#: cost of one RKNN layer on the NPU beyond its bytes (its register commands and the pipeline drain between
#: dependent layers; the decode step's activations are a few KB, so this, not their compute, is what a layer
#: costs). Chosen as an order of magnitude, and cross-checked against the one fitted figure: the perf model's
#: per-decoder-layer overhead of RKLLM (fitted to Rockchip's benchmark table, ~0.35 ms per transformer layer);
#: at ~54 RKNN layers per Griffin layer, 10 us each gives ~0.5 ms per model layer, the same order.
RKNN_LAYER_MS = 0.010
#: ASSUMPTION, likewise: an op on the CPU ends the NPU task, waits for its interrupt, syncs the caches, converts
#: the layout on the CPU and starts a new task: ten layers' worth.
RKNN_CPU_OP_MS = 0.100


#: Graph code of one more input shape in a multi-shape (dynamic_input) model: 3.7 MB measured for a 3-layer
#: RecurrentGemma (benchmarks/bench_rknn_dynamic_shapes.py, fp16), taken to grow with the layers (not measured at
#: 2b depth).
SHAPE_CODE_BYTES_PER_LAYER = 3.7e6 / 3


def prefill_memory_bytes(shape: GriffinShape, dtype: str, hybrid_extra: int) -> int:
    """What the prefill graphs add on the NPU: fp16 shares the decode step's weights (one multi-shape model per
    layer group: its shape code only); w8a8 holds a second, fixed-T copy of the layer weights (the hybrid build
    keeps one input shape; rkedge.convert.rknn.prefill.SHARED_DTYPES)."""
    if dtype in SHARED_DTYPES:
        return int(SHAPE_CODE_BYTES_PER_LAYER * shape.layers)
    return int(shape.layer_params * RKNN_WEIGHT_BYTES[dtype]) + hybrid_extra


def griffin_shape(config: dict[str, Any], tensors: dict[str, Any] | None = None) -> GriffinShape:
    """Shape and parameter split (model-configs.md section 4, Griffin formulas; exact from tensors when given)."""
    shape = GriffinShape.from_dict(config)
    return shape.with_tensor_counts(tensors) if tensors else shape


@dataclass(frozen=True)
class RknnPrediction:
    dtype: str
    weight_bytes: int  # on the NPU: layers + the tied LM head
    hybrid_extra_bytes: int  # RG-LRU gate matrices and conv1d kept in fp16
    host_embedding_bytes: int  # the lookup table in host RAM (fp16)
    state_bytes: int  # constant in context length
    bytes_per_token: int  # DRAM traffic of one decode step
    decode_tokens_per_s: float  # bandwidth bound with the fitted effective bandwidth
    decode_tokens_per_s_pessimistic: float
    ttft_ms: float  # a prompt of prompt_tokens through the chunked prefill graphs (predict_prefill)
    prompt_tokens: int
    graphs: int  # graphs of about 1 GB each, plus the LM head
    rknn_layers: int = 0  # RKNN layers of one decode step (RKNN_LAYERS)
    cpu_ops: int = 0  # of which on the CPU (RKNN_CPU_OPS)
    layer_ms: float = 0.0  # their cost per token: rknn_layers * RKNN_LAYER_MS + cpu_ops * RKNN_CPU_OP_MS
    bandwidth_ms: float = 0.0  # bytes_per_token at the fitted bandwidth

    prefill_chunk: int = 0  # tokens per prefill graph run (rkedge.convert.rknn.prefill.choose_chunk)
    prefill_bytes: int = 0  # NPU memory the prefill graphs add to the decode graphs' (PREFILL_SHARED_DTYPES)
    ttft_token_by_token_ms: float = 0.0  # the same prompt through the decode step (a bundle without prefill)

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.hybrid_extra_bytes + self.host_embedding_bytes + self.state_bytes
                + self.prefill_bytes)


def predict_griffin(shape: GriffinShape, dtype: str = "w8a8", prompt_tokens: int = 128) -> RknnPrediction:
    from rkedge.errors import InputError

    if dtype not in RKNN_WEIGHT_BYTES:
        raise InputError(f"rknn-toolkit2 takes {', '.join(RKNN_WEIGHT_BYTES)} for rk3588, not {dtype!r} (no w4a16).",
                         fix="use --dtype w8a8 (hybrid keeps the RG-LRU path in fp16) or fp16")
    per = RKNN_WEIGHT_BYTES[dtype]
    head = shape.vocab * shape.hidden
    weights = int((shape.layer_params + head) * per)
    # the hybrid build keeps the RG-LRU gates and the conv1d in fp16 (rkedge.convert.rknn.pipeline.HYBRID_PATTERNS)
    fp16_kept = (2 * shape.heads * (shape.lru_width // shape.heads) ** 2 + shape.lru_width * shape.conv_width) \
        * shape.recurrent_layers
    hybrid_extra = int(fp16_kept * (2.0 - per)) if dtype == "w8a8" else 0
    h_state = shape.recurrent_layers * shape.lru_width * 2
    conv_state = shape.recurrent_layers * (shape.conv_width - 1) * shape.lru_width * 2
    kv = shape.attention_layers * 2 * (shape.window - 1) * shape.kv_heads * shape.head_dim * 2
    state = h_state + conv_state + kv
    # weights + KV read + shifted KV written + states in and out + fp16 logits
    traffic = weights + hybrid_extra + 2 * kv + 2 * (h_state + conv_state) + shape.vocab * 2
    bandwidth = load_perf_model().bandwidth_gbs
    per_graph = 1 * GIB
    graphs = max(1, -(-(int(shape.layer_params * per)) // per_graph)) + 1
    # decode time = weight bytes / bandwidth + RKNN layers x a per-layer cost + CPU ops x their cost
    rknn_layers, cpu_ops = decode_layer_count(shape, chunk_graphs=graphs - 1)
    layer_ms = rknn_layers * RKNN_LAYER_MS + cpu_ops * RKNN_CPU_OP_MS
    bandwidth_ms = traffic / (bandwidth * 1e9) * 1000
    step_ms = bandwidth_ms + layer_ms
    pessimistic_ms = traffic / (PESSIMISTIC_BANDWIDTH_GBS * 1e9) * 1000 + layer_ms
    # the prompt: full chunks through the prefill graphs, the rest through the decode step (same physical model)
    prefill = predict_prefill(shape, prompt_tokens, dtype, decode_step_ms=step_ms)
    return RknnPrediction(dtype, weights, hybrid_extra, shape.embedding_params * 2, state, traffic, 1000 / step_ms,
                          1000 / pessimistic_ms, prefill.ttft_ms, prompt_tokens, graphs,
                          prefill_chunk=prefill.chunk, prefill_bytes=prefill_memory_bytes(shape, dtype, hybrid_extra),
                          ttft_token_by_token_ms=prompt_tokens * step_ms,
                          rknn_layers=rknn_layers, cpu_ops=cpu_ops, layer_ms=layer_ms, bandwidth_ms=bandwidth_ms)


def decode_layer_count(shape: GriffinShape, *, chunk_graphs: int, head_graphs: int = 1) -> tuple[int, int]:
    """RKNN layers and CPU ops of one decode step over ``chunk_graphs`` layer graphs and ``head_graphs`` head graphs
    (RKNN_LAYERS, RKNN_CPU_OPS)."""
    parts = {"recurrent": shape.recurrent_layers, "attention": shape.attention_layers, "graph": chunk_graphs,
             "head": head_graphs}
    return (sum(RKNN_LAYERS[part] * n for part, n in parts.items()),
            sum(RKNN_CPU_OPS[part] * n for part, n in parts.items()))


def plan_recurrent_gemma(path: Path, config: dict[str, Any], *, dtype: str = "w8a8", board: str | None = None,
                         ram_gb: float | None = None) -> Any:
    from rkedge.convert.plan import SYSTEM_RESERVE_BYTES, BoardFit, PlanReport
    from rkedge.fit import memory_verdict

    tensors = None
    if Path(path).is_dir():
        from rkedge.convert.inspect import inspect_checkpoint

        tensors = inspect_checkpoint(path).tensors or None
    shape = griffin_shape(config, tensors)
    p = predict_griffin(shape, dtype)
    rams = [ram_gb] if ram_gb is not None else None
    board_name = None
    if rams is None and board is not None:
        from rkedge.boards import get_board

        profile = get_board(board)
        board_name, rams = profile.name, list(profile.ram_gb or ())
    fits = []
    for ram in rams or [4, 8, 16]:
        usable = ram * GIB - SYSTEM_RESERVE_BYTES
        verdict = memory_verdict(p.total_bytes, usable)
        fits.append(BoardFit(ram, verdict, [f"needs ~{p.total_bytes / GIB:.1f} GiB (NPU weights, host embedding "
                                            f"table, state; the RKNN runtime's own overhead is not measured) of "
                                            f"~{usable / GIB:.1f} GiB usable"]))
    prediction = {**asdict(p), "total_bytes": p.total_bytes, "backend": "rknn",
                  "max_context": "unbounded (fixed-size state; local attention over the last "
                                 f"{shape.window} tokens)",
                  "embedding_bytes": p.host_embedding_bytes, "kv_cache_bytes": p.state_bytes, "runtime_bytes": 0}
    notes = [
        f"RecurrentGemma runs on the RKNN backend (rkedge convert --backend rknn), not RKLLM; {SOURCE}",
        f"decode reads {p.bytes_per_token / 1e9:.2f} GB per token ({p.bandwidth_ms:.1f} ms at the fitted "
        f"{load_perf_model().bandwidth_gbs:.1f} GB/s) and runs {p.rknn_layers} RKNN layers ({p.cpu_ops} on the CPU): "
        f"+{p.layer_ms:.1f} ms at an assumed {RKNN_LAYER_MS * 1000:g} us per layer and {RKNN_CPU_OP_MS * 1000:g} us "
        f"per CPU op, so {p.decode_tokens_per_s:.1f} tokens/s ({p.decode_tokens_per_s_pessimistic:.1f} at "
        f"{PESSIMISTIC_BANDWIDTH_GBS:g} GB/s)",
        f"the prompt runs in chunks of {p.prefill_chunk} tokens through prefill graphs that read the weights once "
        f"per chunk: TTFT {p.ttft_ms / 1000:.2f} s for {p.prompt_tokens} tokens ({p.ttft_token_by_token_ms / 1000:.1f} "
        f"s token by token, a bundle converted with --prefill-chunk 0); the prefill graphs add "
        f"{p.prefill_bytes / GIB:.2f} GiB on the NPU ("
        f"{'weights shared with the decode step' if dtype in SHARED_DTYPES else 'a second copy of the layer weights'})",
        f"the model is built as {p.graphs} graphs (about 1 GB each, plus the LM head) chained through their states",
        *RKNN_LIMITS,
    ]
    return PlanReport(Path(path).name, shape.summary(), prediction, fits, board_name, notes,
                      load_perf_model().physical())
