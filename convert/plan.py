"""``rkedge plan``: will this model run on this board, and how fast, before converting it.

Memory (what the runtime holds, term by term), TTFT (128-token prompt) and decode tokens/s come from the fitted
model in :mod:`.perf_model`; the verdict per RAM size weighs them against the board's RAM, the 4 GiB-per-IOMMU-domain
rule and the driver gate (F-1). The thresholds and verdicts are :mod:`rkedge.fit`'s, which ``doctor`` uses on the board too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkedge.convert.perf_model import ModelShape, Prediction, load_perf_model, predict
from rkedge.errors import InputError
from rkedge.fit import (
    DRIVER_GATE_BYTES,
    DRIVER_GATE_FIXED_IN,
    GIB,
    SYSTEM_RESERVE_BYTES,
    iommu_domains,
    memory_verdict,
    needs_driver_gate,
    spans_iommu_domains,
    usable_bytes,
)

if TYPE_CHECKING:
    from rkedge.convert.vlm.families import VlmFamily

__all__ = ["SYSTEM_RESERVE_BYTES", "BoardFit", "PlanReport", "plan_model", "ram_verdict", "report_json", "shape_of"]


@dataclass
class BoardFit:
    ram_gb: float
    verdict: str  # fits | tight | does not fit
    reasons: list[str] = field(default_factory=list)


@dataclass
class PlanReport:
    model: str
    shape: dict[str, Any]
    prediction: dict[str, Any]
    fits: list[BoardFit]
    board: str | None
    notes: list[str]
    perf_model: dict[str, float]
    #: A VLM's encoder (:meth:`PlannedEncoder.to_dict`), counted in ``fits``; None for a language model.
    vision: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        p = self.prediction
        rknn = p.get("backend") == "rknn"
        lines = [f"{self.model}: {self.shape['total_params'] / 1e9:.2f}B parameters, {p['dtype']}, "
                 f"{'RKNN backend' if rknn else 'max_context ' + str(p['max_context'])}",
                 f"  memory   {p['total_bytes'] / GIB:6.2f} GiB = weights {p['weight_bytes'] / GIB:.2f} + "
                 + (f"host embedding {p['embedding_bytes'] / GIB:.2f} + state {p['kv_cache_bytes'] / GIB:.3f}"
                    + (f" + prefill graphs {p['prefill_bytes'] / GIB:.2f}" if p.get("prefill_bytes") else "") if rknn
                    else (f"embedding {p['embedding_bytes'] / GIB:.2f}" if p["embedding_bytes"] else "embedding in storage")
                    + f" + KV cache {p['kv_cache_bytes'] / GIB:.2f} + "
                         f"runtime {p['runtime_bytes'] / GIB:.2f}"),
                 f"  decode   {p['decode_tokens_per_s']:6.2f} tokens/s (RK3588: weights read per token at the fitted bandwidth, plus a per-layer cost)",
                 f"  TTFT     {p['ttft_ms']:6.0f} ms for a {p['prompt_tokens']}-token prompt"]
        if self.vision is not None:
            v = self.vision
            tokens = (f"{v['images']} image(s) x {v['image_tokens']} tokens at {v['image_size']} px"
                      if v["image_tokens"] is not None else "image tokens unknown for this family")
            mib = 2**20  # an encoder is hundreds of MiB, one image's embeddings about one
            lines.insert(2, f"  vision   {v['total_bytes'] / mib:6.1f} MiB = {v['dtype']} encoder "
                            f"{v['weights_bytes'] / mib:.1f} ({v['params'] / 1e6:.1f}M parameters) + embedding "
                            f"buffer {v['images'] * v['embedding_bytes_per_image'] / mib:.2f} ({tokens}); "
                            "counted in the verdicts below")
        for fit in self.fits:
            lines.append(f"  {fit.ram_gb:g} GB board: {fit.verdict.upper()}")
            lines += [f"    - {reason}" for reason in fit.reasons]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def ram_verdict(prediction: Prediction, ram_gb: float, extra_bytes: int = 0) -> BoardFit:
    """Fits / tight / does not fit, with the reasons: RAM, IOMMU domains, driver gate. ``extra_bytes``: memory
    beside the language model's (a VLM's vision encoder)."""
    usable = usable_bytes(ram_gb)
    need = prediction.total_bytes + extra_bytes
    reasons = [f"needs ~{need / GIB:.1f} GiB of ~{usable / GIB:.1f} GiB usable "
               f"({ram_gb:g} GB minus ~{SYSTEM_RESERVE_BYTES / GIB:.2f} GiB for the system)"]
    verdict: str = memory_verdict(need, usable)
    if verdict == "does not fit":
        reasons.append("use a smaller model, a smaller --max-context, or a board with more RAM")
    elif verdict == "tight":
        reasons.append("little left for anything else; swap makes it slow")
    weights = prediction.weight_bytes
    if spans_iommu_domains(weights) and verdict != "does not fit":
        verdict = "tight"
        reasons.append(f"the {weights / GIB:.1f} GiB of quantized weights span {iommu_domains(weights)} NPU IOMMU "
                       "domains of 4 GiB; large models have failed here with 'failed to malloc npu memory' (F-1): "
                       f"run with --base-domain-id 1 and rknpu {DRIVER_GATE_FIXED_IN}")
    elif needs_driver_gate(weights):
        reasons.append(f"{weights / GIB:.1f} GiB of weights: needs rknpu driver {DRIVER_GATE_FIXED_IN} (0.9.6 cannot "
                       f"map buffers over {DRIVER_GATE_BYTES // GIB} GiB; F-1, F-5); rkedge doctor shows the driver")
    return BoardFit(ram_gb, verdict, reasons)


def shape_of(path: Path) -> tuple[ModelShape, dict[str, Any]]:
    """A checkpoint folder (exact split from safetensors headers) or a config.json (formulas)."""
    from rkedge.convert.inspect import inspect_checkpoint, read_json

    if path.is_dir():
        from rkedge.convert.bnb import dequantized_view

        # a bitsandbytes upload is planned as the float checkpoint rkedge dequantizes it to (packed 4-bit shapes
        # would undercount the weights)
        info = dequantized_view(inspect_checkpoint(path))
        config = info.config
        if info.tensors:
            tensors = info.tensors
            if _vlm_family(config) is not None:  # the vision half is the encoder's, not the language model's
                from rkedge.convert.vlm.footprint import is_vision_tensor

                tensors = {k: t for k, t in tensors.items() if not is_vision_tensor(k)}
            return ModelShape.from_tensors(config, tensors, name=path.name), config
        return ModelShape.from_config(config, name=path.name), config
    if path.is_file() and path.suffix == ".json":
        config = read_json(path)
        return ModelShape.from_config(config, name=config.get("_name_or_path") or path.parent.name), config
    raise InputError(f"{path} is neither a checkpoint folder nor a config.json.",
                     fix="pass the folder with config.json (weights optional) or the config.json itself")


def _vlm_family(config: dict[str, Any]) -> VlmFamily | None:
    from rkedge.convert.vlm.families import vlm_family

    return vlm_family(config)


def _planned_vision(path: Path, config: dict[str, Any], images: int) -> dict[str, Any] | None:
    """The encoder of a VLM checkpoint folder (weights from its safetensors headers), or None."""
    family = _vlm_family(config)
    if family is None or not path.is_dir():
        return None
    from rkedge.convert.inspect import inspect_checkpoint
    from rkedge.convert.vlm.footprint import planned_encoder

    return planned_encoder(family, path, config, inspect_checkpoint(path).tensors).to_dict(images)


def plan_model(path: Path, *, dtype: str = "w8a8", max_context: int = 4096, board: str | None = None,
               ram_gb: float | None = None, prompt_tokens: int = 128, images: int = 1) -> PlanReport:
    from rkedge.convert.architectures import config_identity, find_refused

    shape, config = shape_of(Path(path))
    arch, model_type = config_identity(config)
    refused = find_refused(arch, model_type)
    if refused is not None and "rknn backend" in refused.alternatives:
        from rkedge.convert.rknn_plan import plan_recurrent_gemma

        report: PlanReport = plan_recurrent_gemma(path, config, dtype=dtype, board=board, ram_gb=ram_gb)
        return report
    notes: list[str] = []
    if refused is not None:
        notes.append(f"{arch}: {refused.reason}")
    if dtype.startswith("w4a16"):
        notes.append("w4a16 does not run on RK3588 (F-2); the figures are for another platform's dtype")
    prediction = predict(shape, dtype, max_context, prompt_tokens)
    rams: list[float]
    board_name = None
    if ram_gb is not None:
        rams = [ram_gb]
    elif board is not None:
        from rkedge.boards import get_board

        profile = get_board(board)
        board_name = profile.name
        rams = list(profile.ram_gb or ())
        if not rams:
            raise InputError(f"the RAM options of {profile.name} are not known.", fix="pass --ram GB instead")
    else:
        rams = [4, 8, 16, 32]
    vision = _planned_vision(Path(path), config, images)
    if vision is not None:
        if vision["image_tokens"] is not None:  # an exportable family: rkedge converts its language model alone
            notes = [n for n in notes if not n.startswith(f"{arch}:")]
        notes.append("a vision-language model: rkedge convert writes the language model's .rkllm and the vision "
                     "encoder's .rknn (fp16 by default); the encoder's runtime buffers are not in the estimate "
                     "(unknown until rknn_query on a board)")
    fits = [ram_verdict(prediction, ram, vision["total_bytes"] if vision else 0) for ram in rams]
    notes += list(prediction.assumptions)
    shape_dict = {**asdict(shape), "total_params": shape.total_params}
    return PlanReport(shape.name or str(path), shape_dict, prediction.to_dict(), fits, board_name, notes,
                      load_perf_model().physical(), vision)


def report_json(report: PlanReport) -> str:
    return json.dumps(report.to_dict(), indent=1, default=str)
