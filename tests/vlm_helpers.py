"""One tiny Qwen2-VL (and Gemma 3) converted once per test session, for the VLM test modules."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tiny_vlms import make_gemma3_vlm, make_qwen2_vl

from rkedge.convert.vlm import VlmRequest, VlmResult, convert_vlm

PROMPTS = ("Hello!", "What is an NPU?", "Name a color.", "Describe the picture.")


@cache
def converted(root: Path, family: str = "qwen2_vl") -> tuple[Path, VlmResult]:
    """The checkpoint folder and its conversion (mock rkllm-toolkit 1.3.0, the real rknn-toolkit2), under ``root``."""
    source = root / f"{family}-checkpoint"
    (make_qwen2_vl if family == "qwen2_vl" else make_gemma3_vlm)(source)
    calibration = root / f"{family}-calibration.json"
    calibration.write_text(json.dumps([{"prompt": p, "target": "ok"} for p in PROMPTS]), encoding="utf-8")
    result = convert_vlm(VlmRequest(model=source, out=root / f"{family}-out", toolkit="mock",
                                    calibration=str(calibration)))
    return source, result
