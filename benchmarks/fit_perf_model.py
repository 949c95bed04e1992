#!/usr/bin/env python3
"""Fits the RK3588 performance model (rkedge.convert.perf_model) to Rockchip's published figures.

Each of decode time, TTFT and memory is a non-negative combination of physically meaningful features
(see perf_model.py); the coefficients are found by non-negative least squares on relative error (so a 0.5B
and a 6B model weigh the same), solved exactly by enumerating the active sets (three or fewer unknowns).
Writes convert/data/rk3588_perf_model.json. Usage: python benchmarks/fit_perf_model.py [--check]
(--check fits and compares with the committed file instead of writing it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from rkedge.convert.perf_model import (
    ModelShape,
    benchmark_rows,
    decode_features,
    memory_features,
    prefill_features,
)

OUT = Path(__file__).resolve().parents[1] / "convert" / "data" / "rk3588_perf_model.json"


def nnls_relative(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """min sum(((features @ c) / target - 1)^2) subject to c >= 0."""
    a = features / target[:, None]
    b = np.ones(len(target))
    best: tuple[np.ndarray, float] | None = None
    columns = features.shape[1]
    for size in range(1, columns + 1):
        for subset in itertools.combinations(range(columns), size):
            solution, *_ = np.linalg.lstsq(a[:, subset], b, rcond=None)
            if (solution < 0).any():
                continue
            full = np.zeros(columns)
            full[list(subset)] = solution
            residual = float(np.sum((a @ full - b) ** 2))
            if best is None or residual < best[1]:
                best = (full, residual)
    assert best is not None
    return best[0]


def design(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    shapes = [ModelShape.from_dict(r["shape"], r["checkpoint"]) for r in rows]
    measured = [r["measured"] for r in rows]
    return {
        "decode": (np.array([decode_features(s) for s in shapes]), np.array([1000 / m["tokens_per_s"] for m in measured])),
        "prefill": (np.array([prefill_features(s) for s in shapes]), np.array([m["ttft_ms"] for m in measured])),
        "memory": (np.array([memory_features(s) for s in shapes]), np.array([m["memory_mb"] for m in measured])),
    }


def fit(rows: list[dict]) -> dict[str, list[float]]:
    return {name: [float(c) for c in nnls_relative(x, y)] for name, (x, y) in design(rows).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    rows = benchmark_rows()
    coefficients = fit(rows)
    data = {**coefficients, "fit": {
        "rows": [r["checkpoint"] for r in rows],
        "method": "non-negative least squares on relative error, benchmarks/fit_perf_model.py",
        "source": "convert/data/rk3588_benchmarks.json (Rockchip benchmark.md v1.3.0, RK3588, w8a8)",
        "fitted_at": time.strftime("%Y-%m-%d"),
    }}
    if args.check:
        committed = json.loads(OUT.read_text())
        same = all(np.allclose(committed[k], coefficients[k], rtol=1e-6) for k in coefficients)
        print("committed coefficients match a fresh fit" if same else "committed coefficients are stale")
        sys.exit(0 if same else 1)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    from rkedge.convert.perf_model import PerfModel

    model = PerfModel(tuple(coefficients["decode"]), tuple(coefficients["prefill"]), tuple(coefficients["memory"]))
    print(f"wrote {OUT}")
    for key, value in model.physical().items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
