#!/usr/bin/env python3
"""Vision encoders of tiny VLMs in the rknn-toolkit2 simulator: build time, .rknn size, latency per image, and
quality per dtype against transformers' ``get_image_features`` (cosine min/mean and max abs error over varied
images).

The towers are tiny random ones (Qwen2-VL: 2 blocks, width 64; Gemma 3's SigLIP: 2 layers, width 64) at real
input sizes (392 px is what Rockchip's Qwen2-VL demo uses: 196 image tokens). Simulator latency says how fast CI
and a developer's loop run on this host, nothing about a board: the simulator emulates the NPU's arithmetic, not
its speed.

Usage: python benchmarks/bench_vision.py [--qwen-sizes 112 224 392] [--gemma-sizes 64] [--runs 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def bench_one(root: Path, family: str, size: int, runs: int) -> dict[str, Any]:
    from tiny_vlms import make_gemma3_vlm, make_qwen2_vl, varied_images

    from rkedge.convert.vlm import VlmRequest, convert_vlm
    from rkedge.runtime._stderr import capture_native_output
    from rkedge.runtime.vision import VisionEncoder

    source = root / f"{family}-{size}"
    (make_qwen2_vl if family == "qwen2_vl" else make_gemma3_vlm)(source, image_size=size)
    calibration = root / "calibration.json"
    calibration.write_text(json.dumps([{"prompt": p, "target": "ok"} for p in ("Hello!", "Describe it.")]))
    started = time.perf_counter()
    with capture_native_output():
        result = convert_vlm(VlmRequest(model=source, out=root / f"out-{family}-{size}", calibration=str(calibration)))
    row: dict[str, Any] = {"family": family, "size": size, "image_tokens": result.manifest.image_tokens,
                           "hidden": result.manifest.hidden_size, "convert_s": round(time.perf_counter() - started, 1),
                           "dtypes": {}}
    images = varied_images(runs, seed=77)
    for dtype, encoder_file in result.manifest.encoders.items():
        figures = result.manifest.verification["encoders"][dtype]
        with capture_native_output(), VisionEncoder.open(result.manifest_file.parent, dtype=dtype,
                                                         backend="simulator") as encoder:
            encoder.encode(images[:1])  # warm-up
            encoder.encode(images)
            latencies = sorted(encoder.last_latency_ms)
        row["dtypes"][dtype] = {
            "rknn_kb": round(encoder_file.size / 1024), "build_s": figures["build_s"],
            "sim_ms_p50": round(latencies[len(latencies) // 2], 1), "sim_ms_max": round(latencies[-1], 1),
            "cosine_min": round(figures["cosine_min"], 7), "cosine_mean": round(figures["cosine_mean"], 7),
            "max_abs_error": float(f"{figures['max_abs_error']:.3g}"), "ref_max_abs": round(figures["reference_max_abs"], 3),
            "fp16_tensors": len(encoder_file.fp16_tensors), "images": figures["images"]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qwen-sizes", type=int, nargs="*", default=[112, 224, 392])
    parser.add_argument("--gemma-sizes", type=int, nargs="*", default=[64, 224])
    parser.add_argument("--runs", type=int, default=10, help="images timed per encoder")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rkedge-bench-vision-") as tmp:
        for family, sizes in (("qwen2_vl", args.qwen_sizes), ("gemma3", args.gemma_sizes)):
            for size in sizes:
                rows.append(bench_one(Path(tmp), family, size, args.runs))
                print(f"done {family} {size} px in {rows[-1]['convert_s']} s", flush=True)
    print(f"\nhost: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}")
    header = ("family", "px", "tokens", "dtype", ".rknn KB", "build s", "sim ms p50", "cos min", "cos mean",
              "max |err|", "ref max")
    print(" | ".join(header))
    for row in rows:
        for dtype, d in row["dtypes"].items():
            print(" | ".join(str(v) for v in (row["family"], row["size"], row["image_tokens"], dtype, d["rknn_kb"],
                                              d["build_s"], d["sim_ms_p50"], d["cosine_min"], d["cosine_mean"],
                                              d["max_abs_error"], d["ref_max_abs"])))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
