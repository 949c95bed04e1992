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
    "per-layer dispatch overhead (~1,750 RKNN layers for 2b) and the CPU fallbacks (Exp in the RG-LRU gate) are "
    "not measurable without a board",
)


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
    ttft_ms: float  # a 128-token prompt through the decode step, token by token
    prompt_tokens: int
    graphs: int  # graphs of about 1 GB each, plus the LM head

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.hybrid_extra_bytes + self.host_embedding_bytes + self.state_bytes


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
    step_ms = traffic / (bandwidth * 1e9) * 1000
    per_graph = 1 * GIB
    graphs = max(1, -(-(int(shape.layer_params * per)) // per_graph)) + 1
    return RknnPrediction(dtype, weights, hybrid_extra, shape.embedding_params * 2, state, traffic, 1000 / step_ms,
                          PESSIMISTIC_BANDWIDTH_GBS * 1e9 / traffic, prompt_tokens * step_ms, prompt_tokens, graphs)


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
        f"decode is bounded by reading {p.bytes_per_token / 1e9:.2f} GB per token: {p.decode_tokens_per_s:.1f} tokens/s "
        f"at the fitted {load_perf_model().bandwidth_gbs:.1f} GB/s, {p.decode_tokens_per_s_pessimistic:.1f} at "
        f"{PESSIMISTIC_BANDWIDTH_GBS:g} GB/s; per-layer overhead on a board is unknown, so treat these as upper bounds",
        "the prompt goes through the decode step token by token: TTFT grows linearly with the prompt",
        f"the model is built as {p.graphs} graphs (about 1 GB each, plus the LM head) chained through their states",
        *RKNN_LIMITS,
    ]
    return PlanReport(Path(path).name, shape.summary(), prediction, fits, board_name, notes,
                      load_perf_model().physical())
