#!/usr/bin/env python3
"""w8a8 by the automatic fp16 choice on three tiny RecurrentGemmas trained differently, each with its own
calibration text and held-out text: does each meet the quality target (top-1 >= 95%, |NLL delta| <= 1% against
transformers, teacher-forced in the rknn-toolkit2 simulator)?

The models (scripts/train_tiny_recurrentgemma.py):
- tiny-recurrentgemma: 3 layers x 128, Python source (CPython stdlib); calibration and held-out text: rkedge's
  own sources (tests/data/rknn/calibration.json, heldout.txt);
- tiny-recurrentgemma-py6x160: 6 layers x 160, the same stdlib files; calibration and held-out text from other
  stdlib files (tests/data/rknn/py6x160/);
- tiny-recurrentgemma-prose: English licence texts; tests/data/rknn/prose/.

The search reads a fifth of the calibration set (held out from calibration) and the held-out text, as
`rkedge convert --calibration C --eval-text E` does: a choice must meet the target on both, so the reported
figures (on the held-out text) are not independent of the choice; the split alone missed the domain of the
6-layer model (plain w8a8: 97.7% top-1 on the split, 94.9% and NLL +3.2% on glob.py). Prints each model's
trade-off table (worst of the two texts) and a summary.

Usage: python benchmarks/bench_rknn_quality_target.py [--model NAME ...] [--steps 256] [--target top1=0.95,nll=1.0]
       [--algorithm normal|mmse|kl_divergence] [--method channel|layer] [--granularity layer|group]
       [--manual] (the fixed fp16 set, no search)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rkedge.convert.rknn.pipeline import HYBRID_PATTERNS, RknnRequest, convert_rknn
from rkedge.convert.rknn.precision import render_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests/data"
#: name -> (model folder, calibration file, held-out text)
MODELS = {
    "tiny-recurrentgemma": (DATA / "tiny-recurrentgemma", DATA / "rknn/calibration.json", DATA / "rknn/heldout.txt"),
    "tiny-recurrentgemma-py6x160": (DATA / "tiny-recurrentgemma-py6x160", DATA / "rknn/py6x160/calibration.txt",
                                    DATA / "rknn/py6x160/heldout.txt"),
    "tiny-recurrentgemma-prose": (DATA / "tiny-recurrentgemma-prose", DATA / "rknn/prose/calibration.txt",
                                  DATA / "rknn/prose/heldout.txt"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", action="append", choices=list(MODELS), default=None)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--target", default=None)
    parser.add_argument("--algorithm", default="normal")
    parser.add_argument("--method", default="channel")
    parser.add_argument("--manual", action="store_true", help="the fixed fp16 set (HYBRID_PATTERNS), no search")
    parser.add_argument("--granularity", choices=["layer", "group"], default=None,
                        help="parts per layer or per op group over all layers (default: layer when it fits)")
    args = parser.parse_args()
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(args.model or MODELS):
            model, calibration, held_out = MODELS[name]
            started = time.perf_counter()
            result = convert_rknn(RknnRequest(
                model=model, out=Path(tmp) / str(index), dtype="w8a8", calibration=str(calibration),
                eval_text=held_out, eval_steps=args.steps, quality_target=args.target, prefill_chunk=0,
                quantized_algorithm=args.algorithm, quantized_method=args.method,
                precision_granularity=args.granularity,
                fp16_patterns=HYBRID_PATTERNS if args.manual else None))
            seconds = time.perf_counter() - started
            manifest = result.manifest
            assert manifest is not None
            quality, precision = manifest["quality"], manifest["precision"]
            print(f"\n{name}: {manifest['dims']['layers']} layers x {manifest['dims']['hidden']}, calibration "
                  f"{calibration.relative_to(ROOT)}, search on {precision.get('searched_on', '-')}", flush=True)
            for line in render_table(precision.get("table") or [], precision.get("chosen")):
                print("  " + line)
            chosen = precision.get("chosen") if precision["mode"] == "auto" else precision["mode"]
            summary.append((name, chosen, quality, precision.get("met"), seconds))
    print(f"\nheld-out text ({args.steps} teacher-forced steps), algorithm {args.algorithm}, method {args.method}:")
    print(f"{'model':<30} {'top-1':>6} {'NLL delta':>9} {'KL':>8} {'target':>6} {'s':>5}  fp16 parts")
    for name, chosen, quality, met, seconds in summary:
        print(f"{name:<30} {quality['top1_agreement'] * 100:>5.1f}% {quality['nll_delta_pct']:>+8.2f}% "
              f"{quality['kl_divergence']:>8.5f} {'met' if met else 'BELOW':>6} {seconds:>5.0f}  "
              f"{', '.join(chosen) if isinstance(chosen, list) else chosen}")


if __name__ == "__main__":
    main()
