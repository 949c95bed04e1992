#!/usr/bin/env python3
"""Which tensors the RKNN backend's hybrid w8a8 build keeps in fp16: the measurement behind HYBRID_PATTERNS.

Builds the tiny RecurrentGemma fixture in several variants through the same pipeline as `rkedge convert
--backend rknn` and compares each, in the rknn-toolkit2 simulator, with transformers over many teacher-forced
steps on in-domain held-out text (both sides keep their own states, so drift shows). KL divergence is the
steadiest figure; top-1 agreement moves by 1/steps per flipped near-tie.

Usage: python benchmarks/bench_rknn_hybrid.py [--steps 1024] [--variant NAME ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rkedge.convert.rknn.pipeline import HYBRID_PATTERNS, RknnRequest, convert_rknn

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/data/tiny-recurrentgemma"
HELD_OUT = ROOT / "tests/data/rknn/heldout.txt"
CALIBRATION = ROOT / "tests/data/rknn/calibration.json"
RG_LRU_AND_STATES = (r"/rg_lru/", r"^(h|k|v)\d+_rs$", r"^new_(h|k|v)\d+-rs$")
RESIDUAL = (r"^x_tp_rs$", r"/blocks\.\d+/Add_4_output", r"/blocks\.\d+/Add_6_output", r"^x_out-rs$")

#: name -> (patterns kept in fp16, LM head dtype)
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "plain w8a8": ((), "w8a8"),
    "RG-LRU + h/k/v state": (RG_LRU_AND_STATES, "w8a8"),
    "+ conv1d and its state (default)": (HYBRID_PATTERNS, "w8a8"),
    "default + LM head fp16": (HYBRID_PATTERNS, "fp16"),
    "default + residual stream": (HYBRID_PATTERNS + RESIDUAL, "w8a8"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1024)
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), default=None)
    args = parser.parse_args()
    print(f"tiny RecurrentGemma, {args.steps} teacher-forced steps on {HELD_OUT.name}, calibration "
          f"{CALIBRATION.name}; reference = transformers (float32)")
    print(f"{'variant':<36} {'NLL delta':>10} {'top-1':>7} {'KL':>9} {'fp16 tensors':>13} {'build s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(args.variant or VARIANTS):
            patterns, head_dtype = VARIANTS[name]
            started = time.perf_counter()
            result = convert_rknn(RknnRequest(model=TINY, out=Path(tmp) / str(index), dtype="w8a8",
                                              hybrid=bool(patterns), fp16_patterns=patterns, head_dtype=head_dtype,
                                              calibration=str(CALIBRATION), eval_text=str(HELD_OUT),
                                              eval_steps=args.steps))
            manifest = result.manifest or {}
            quality = manifest["quality"]
            kept = sum(len(g.get("fp16_tensors", [])) for g in manifest["graphs"])
            print(f"{name:<36} {quality['nll_delta_pct']:>+9.3f}% {quality['top1_agreement'] * 100:>6.1f}% "
                  f"{quality['kl_divergence']:>9.5f} {kept:>13} {time.perf_counter() - started:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
