"""Memory, time to first token and decode speed of a model on RK3588, before converting it.

A few parameters, each with a physical meaning, fitted to Rockchip's published figures
(``convert/data/rk3588_benchmarks.json``; ``benchmarks/fit_perf_model.py`` writes the coefficients to
``convert/data/rk3588_perf_model.json``, ``benchmarks/validate_perf_model.py`` prints the errors, in-sample and
leave-one-out):

- **decode** is bound by memory bandwidth: every token reads all quantized weights (the transformer's linear
  layers and the LM-head matrix, which tied models take from the embedding) and the KV cache, plus a fixed cost
  per layer (kernel launches, synchronisation, the CPU-side ops):
  ``ms/token = bytes_read / bandwidth + layers * layer_ms``;
- **prefill** is bound by the NPU's int8 compute, plus attention, which grows with the prompt length squared
  and the attention width (heads x head_dim) per layer:
  ``TTFT = 2*linear_params*T / matmul_throughput + layers * heads*head_dim * attention_cost * (T/128)^2``;
- **memory** is what the runtime holds, term by term (:func:`memory_features`):
  the NPU weights, i.e. the linear layers and an LM-head matrix (vocab x hidden, tied or not: the NPU computes the
  logits, so a tied model's embedding is quantized into it too) at the dtype's width, plus data per quantization
  group; the embedding table only when it is resident (runtime 1.1.x; from 1.2.0 ``embed_flash = 1``, which
  Rockchip's demo and server set, reads it from storage and the 1.2+ figures show no trace of it); the KV cache
  for ``max_context`` tokens (fp16 assumed, 2 bytes per element, not fitted); a runtime overhead that grows with
  the vocabulary (its cause is not public: tokenizer tables and logits buffers are guesses).
  The fit's rows and the rows held back are listed, with their sources, in the data file's "memory" section.
  Known: the weight widths (int8 = 1 byte, int4 = 0.5) and that the embedding stops being resident with
  ``embed_flash``. Fitted: bytes per weight byte (lands at 1.0), bytes per group, bytes per resident embedding
  parameter (lands near 4: a float32 table), the fixed and per-vocabulary overhead.

Only the standard library is used here: the board and ``rkedge plan`` need no numpy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from rkedge.convert.estimate import GIB, KV_BYTES, WEIGHT_BYTES, bytes_per_param, model_shape
from rkedge.convert.rules import group_size

REFERENCE_PROMPT = 128  # the published TTFT is for a 128-token prompt
DECODE_CONTEXT_ADD = 32  # decode speed is averaged over 64 new tokens: the KV read is taken at prompt + 32
#: The KV context of a published memory row that states none (benchmark.md from v1.2.1 says only "Seqlen 128,
#: New_tokens 64"): the max_context Rockchip's earlier tables state (320). An assumption.
MEMORY_ROW_CONTEXT = 320
MIB = float(1 << 20)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model."""

    linear_params: int  # everything but the embedding table and an untied LM head
    embedding_params: int
    lm_head_params: int  # 0 when the LM head is tied to the embedding
    layers: int
    hidden: int
    attention_heads: int
    head_dim: int
    kv_elems_per_token: int  # K and V elements per token over all attention layers
    vocab: int
    name: str = ""

    @property
    def head_matrix_params(self) -> int:
        """The LM head's size: decode reads it every token, tied or not."""
        return self.lm_head_params or self.embedding_params

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.lm_head_params

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str = "") -> ModelShape:
        return cls(int(data["linear_params"]), int(data["embedding_params"]), int(data["lm_head_params"]),
                   int(data["layers"]), int(data["hidden"]), int(data["attention_heads"]), int(data["head_dim"]),
                   int(data["kv_elems_per_token"]), int(data["vocab"]), name)

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "") -> ModelShape:
        """From config.json alone (dense decoders; Llama-like formulas of model-configs.md section 4)."""
        from rkedge.convert.estimate import split_params_from_config
        from rkedge.convert.inspect import tie_word_embeddings

        split = split_params_from_config(config, tie_word_embeddings(config))
        return cls._with_split(config, split, name)

    @classmethod
    def from_tensors(cls, config: dict[str, Any], tensors: dict[str, Any], name: str = "") -> ModelShape:
        """From a checkpoint: the exact parameter split read from its safetensors headers."""
        from rkedge.convert.estimate import split_params_from_tensors
        from rkedge.convert.inspect import tie_word_embeddings

        split = split_params_from_tensors(tensors, tie_word_embeddings(config))
        return cls._with_split(config, split, name)

    @classmethod
    def _with_split(cls, config: dict[str, Any], split: dict[str, int], name: str) -> ModelShape:
        s = model_shape(config)
        kv = 2 * s["layers"] * s["kv_heads"] * s["head_dim"]
        return cls(split["linear"], split["embedding"], split["lm_head"], s["layers"], s["hidden"], s["heads"],
                   s["head_dim"], kv, s["vocab"], name)


# --- features (shared with the fitting script, so fit and prediction cannot drift apart) --------------------

def decode_features(shape: ModelShape, dtype: str = "w8a8", context: int = REFERENCE_PROMPT + DECODE_CONTEXT_ADD
                    ) -> list[float]:
    """[GB read per token, layers] -> coefficients [ms per GB, ms per layer]."""
    weights = (shape.linear_params + shape.head_matrix_params) * bytes_per_param(dtype)
    kv = shape.kv_elems_per_token * KV_BYTES * context
    return [(weights + kv) / 1e9, float(shape.layers)]


def prefill_features(shape: ModelShape, prompt_tokens: int = REFERENCE_PROMPT) -> list[float]:
    """[GFLOP of the linear layers (+ the LM head for the last token), layers x attention width in thousands,
    scaled by (T/128)^2] -> coefficients [ms per GFLOP, attention ms per layer-kchannel at 128 tokens]."""
    gflop = (2 * shape.linear_params * prompt_tokens + 2 * shape.head_matrix_params) / 1e9
    attention = shape.layers * shape.attention_heads * shape.head_dim / 1000 * (prompt_tokens / REFERENCE_PROMPT) ** 2
    return [gflop, attention]


def npu_weight_params(shape: ModelShape) -> int:
    """What the NPU holds as matrices: the linear layers and an LM head (vocab x hidden), tied or not."""
    return shape.linear_params + shape.head_matrix_params


def memory_features(shape: ModelShape, dtype: str = "w8a8", embedding_resident: bool = False) -> list[float]:
    """[1, vocabulary entries, NPU weight bytes at the dtype's width, quantization groups of an 8-bit dtype, of a
    4-bit dtype, resident embedding parameters], all but the first in Mi units -> coefficients [runtime MiB, bytes
    per vocabulary entry, bytes per weight byte, bytes per 8-bit group, bytes per 4-bit group, bytes per resident
    embedding parameter]; their dot product is MiB. The KV cache is not a feature: :func:`kv_cache_bytes`.

    Groups are split by width because the published figures disagree otherwise: w8a8_gN costs ~3x more per group
    than w4a16_gN (why is not public; the scale format is not documented)."""
    params = npu_weight_params(shape)
    base = dtype.split("_")[0]
    group = group_size(dtype)
    groups = params / group / MIB if group else 0.0
    eight_bit = WEIGHT_BYTES[base] == 1.0
    return [1.0, shape.vocab / MIB, params * WEIGHT_BYTES[base] / MIB, groups if eight_bit else 0.0,
            0.0 if eight_bit else groups, (shape.embedding_params if embedding_resident else 0) / MIB]


def kv_cache_bytes(shape: ModelShape, max_context: int) -> float:
    """K and V for every attention layer and ``max_context`` tokens, at KV_BYTES per element (fp16 assumed)."""
    return shape.kv_elems_per_token * KV_BYTES * max_context


@dataclass(frozen=True)
class PerfModel:
    decode: tuple[float, ...]  # [ms per GB read, ms per layer]
    prefill: tuple[float, ...]  # [ms per GFLOP, attention ms per (layer x 1000 channels) at 128 tokens]
    memory: tuple[float, ...]  # memory_features' coefficients: [runtime MiB, bytes per vocabulary entry, per weight
    #                             byte, per 8-bit group, per 4-bit group, per resident embedding parameter]
    fit: dict[str, Any] = field(default_factory=dict)

    @property
    def bandwidth_gbs(self) -> float:
        return 1000 / self.decode[0] if self.decode[0] else float("inf")

    @property
    def matmul_tops(self) -> float:
        return 1 / self.prefill[0] if self.prefill[0] else float("inf")  # GFLOP/ms == TFLOP/s

    def physical(self) -> dict[str, float]:
        """The coefficients in the units a person reasons in."""
        return {
            "effective_bandwidth_GBps": round(self.bandwidth_gbs, 2),
            "decode_overhead_ms_per_layer": round(self.decode[1], 3),
            "effective_int8_matmul_TOPS": round(self.matmul_tops, 3),
            "prefill_attention_ms_per_layer_per_1000_channels_at_128_tokens": round(self.prefill[1], 3),
            "runtime_overhead_MB": round(self.memory[0], 1),
            "runtime_bytes_per_vocabulary_entry": round(self.memory[1], 1),
            "bytes_per_weight_byte": round(self.memory[2], 3),
            "bytes_per_8bit_quantization_group": round(self.memory[3], 2),
            "bytes_per_4bit_quantization_group": round(self.memory[4], 2),
            "bytes_per_resident_embedding_parameter": round(self.memory[5], 3),
        }


@lru_cache(maxsize=1)
def load_perf_model() -> PerfModel:
    data = json.loads(resources.files("rkedge.convert").joinpath("data/rk3588_perf_model.json").read_text())
    return PerfModel(tuple(data["decode"]), tuple(data["prefill"]), tuple(data["memory"]), data.get("fit", {}))


@dataclass(frozen=True)
class Prediction:
    dtype: str
    max_context: int
    prompt_tokens: int
    weight_bytes: int  # quantized linears + the LM head (tied or not) + group data, as the NPU maps them
    embedding_bytes: int  # the resident embedding table: 0 when read from storage (embed_flash)
    kv_cache_bytes: int
    runtime_bytes: int
    decode_tokens_per_s: float
    ttft_ms: float
    assumptions: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.embedding_bytes + self.kv_cache_bytes + self.runtime_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_bytes"] = self.total_bytes
        data["total_gib"] = round(self.total_bytes / GIB, 2)
        return data


ASSUMPTIONS = (
    "the runtime allocates the KV cache (fp16) for max_context_len at init",
    "the embedding table is read from storage (extend_param.embed_flash = 1, as Rockchip's demo and server set, and "
    "as every 1.2+ memory figure shows); rkedge leaves embed_flash at the runtime's default, which is not public",
    "decode speed is bound by reading every quantized weight once per token (memory bandwidth)",
    "figures are for RK3588 at maximum CPU/NPU/DDR clocks (scripts/rk3588-pin-freq.sh pin), as Rockchip measured",
)


def predict(shape: ModelShape, dtype: str = "w8a8", max_context: int = 4096,
            prompt_tokens: int = REFERENCE_PROMPT, model: PerfModel | None = None, embed_flash: bool = True
            ) -> Prediction:
    model = model or load_perf_model()
    decode_ms = _dot(model.decode, decode_features(shape, dtype, prompt_tokens + DECODE_CONTEXT_ADD))
    ttft_ms = _dot(model.prefill, prefill_features(shape, prompt_tokens))
    runtime_mb, per_vocab, per_weight, per_group8, per_group4, per_embedding = model.memory
    _, vocab, weights, groups8, groups4, embedding = memory_features(shape, dtype, embedding_resident=not embed_flash)
    notes = list(ASSUMPTIONS)
    if prompt_tokens != REFERENCE_PROMPT:
        notes.append("TTFT for other prompt lengths assumes attention cost grows with the square of the prompt")
    if embed_flash:
        resident = shape.embedding_params * per_embedding
        notes.append(f"with embed_flash = 0 (or a 1.1 runtime) the embedding is resident: ~{resident / GIB:.2f} GiB more")
    return Prediction(dtype, max_context, prompt_tokens, int((weights * per_weight + groups8 * per_group8 + groups4 * per_group4) * MIB),
                      int(embedding * per_embedding * MIB), int(kv_cache_bytes(shape, max_context)),
                      int((runtime_mb + vocab * per_vocab) * MIB), 1000 / decode_ms if decode_ms > 0 else float("inf"),
                      ttft_ms, tuple(notes))


def _dot(coefficients: tuple[float, ...], features: list[float]) -> float:
    return sum(c * f for c, f in zip(coefficients, features, strict=True))


@lru_cache(maxsize=1)
def _benchmarks() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(resources.files("rkedge.convert").joinpath("data/rk3588_benchmarks.json")
                                      .read_text())
    return data


def benchmark_rows() -> list[dict[str, Any]]:
    """The speed rows (RK3588, runtime 1.3.0), each with its model's shape."""
    rows: list[dict[str, Any]] = _benchmarks()["rows"]
    return rows


def memory_rows() -> list[dict[str, Any]]:
    """Every published memory figure with a known shape (see the file's "memory" section for sources and use)."""
    rows: list[dict[str, Any]] = _benchmarks()["memory"]["rows"]
    return rows


def memory_row_shape(row: dict[str, Any]) -> ModelShape:
    return ModelShape.from_dict(_benchmarks()["memory"]["shapes"][row["model"]], row["model"])


def predict_memory_row(row: dict[str, Any], model: PerfModel | None = None) -> float:
    """MiB for a published memory row, under the row's own conditions (dtype, context, embedding residency)."""
    p = predict(memory_row_shape(row), row["dtype"], row.get("max_context") or MEMORY_ROW_CONTEXT, model=model,
                embed_flash=not row["embedding_resident"])
    return p.total_bytes / MIB
