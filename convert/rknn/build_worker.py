"""Builds one decode-step graph with rknn-toolkit2 in a child process: ``python -m rkedge.convert.rknn.build_worker JOB``.

A child per graph keeps the host's memory to one graph's build (rknn-toolkit2 needs ~20-28 bytes per parameter;
recurrentgemma-rknn-feasibility.md section 6) and its working folder to itself (hybrid quantization writes its
``.model``/``.data``/``.quantization.cfg`` into the current folder). rknn-toolkit2 both raises and returns -1 on
failure; both become an error here. The last stdout line is the JSON result.

Job: {"onnx", "out_dir", "name", "dtype": "fp16"|"w8a8", "dataset": path|null, "hybrid_patterns": [regex...],
"algorithm": "normal"}.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

CFG_HEADER = "custom_quantize_layers: {}\n"


def hybrid_keys(cfg_text: str, patterns: list[str]) -> list[str]:
    """The int8 tensors of a step-1 quantization cfg whose names match ``patterns`` (raw graph inputs and float
    tensors are not valid operands for custom_quantize_layers)."""
    entries = re.findall(r"^    ([^ ].*):\n(?:        (?!dtype).*\n)*        dtype: (\w+)", cfg_text, re.M)
    return [key for key, dtype in entries if dtype == "int8" and any(re.search(p, key) for p in patterns)]


def edit_cfg(cfg: Path, patterns: list[str]) -> list[str]:
    """Marks the matching tensors float16. Only the first line is rewritten: the toolkit refuses a cfg whose
    other values were re-serialised ('... is not allowed to be modified')."""
    text = cfg.read_text(encoding="utf-8")
    if not text.startswith(CFG_HEADER):
        raise RuntimeError(f"unexpected quantization cfg layout in {cfg}")
    keys = hybrid_keys(text, patterns)
    block = "custom_quantize_layers:\n" + "".join(f"    '{key}': float16\n" for key in keys) if keys else CFG_HEADER
    cfg.write_text(block + text[len(CFG_HEADER):], encoding="utf-8")
    return keys


def _check(ret: Any, step: str) -> None:
    if ret != 0:
        raise RuntimeError(f"rknn-toolkit2 {step} returned {ret}")


def build(job: dict[str, Any]) -> dict[str, Any]:
    from rknn.api import RKNN

    out = Path(job["out_dir"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    name = job["name"]
    onnx = Path(job["onnx"]).resolve()
    started = time.time()
    result: dict[str, Any] = {"name": name, "dtype": job["dtype"], "rknn": f"{name}.rknn"}
    rknn = RKNN(verbose=False)
    if job["dtype"] == "fp16":
        _check(rknn.config(target_platform="rk3588"), "config")
        _check(rknn.load_onnx(model=str(onnx)), "load_onnx")
        _check(rknn.build(do_quantization=False), "build")
        result["simulator"] = {"build": "float", "onnx": onnx.relative_to(out).as_posix()}
    else:
        _check(rknn.config(target_platform="rk3588", quantized_dtype="w8a8",
                           quantized_algorithm=job.get("algorithm", "normal"), quantized_method="channel"), "config")
        _check(rknn.load_onnx(model=str(onnx)), "load_onnx")
        _check(rknn.hybrid_quantization_step1(dataset=job["dataset"]), "hybrid_quantization_step1")
        rknn.release()
        stem = onnx.stem
        model, data, cfg = (out / f"{stem}.model", out / f"{stem}.data", out / f"{stem}.quantization.cfg")
        keys = edit_cfg(cfg, job.get("hybrid_patterns") or [])
        rknn = RKNN(verbose=False)  # step 2 takes its config from step 1's files (calling config again can clash)
        _check(rknn.hybrid_quantization_step2(model_input=str(model), data_input=str(data),
                                              model_quantization_cfg=str(cfg)), "hybrid_quantization_step2")
        result["simulator"] = {"build": "hybrid", "model": model.name, "data": data.name, "cfg": cfg.name}
        result["fp16_tensors"] = keys
    _check(rknn.export_rknn(str(out / f"{name}.rknn")), "export_rknn")
    rknn.release()
    result["seconds"] = round(time.time() - started, 2)
    result["rknn_bytes"] = (out / f"{name}.rknn").stat().st_size
    return result


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = build(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as JSON
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps({"ok": True, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
