#!/usr/bin/env python3
"""Fits the RK3588 performance model (rkedge.convert.perf_model) to Rockchip's published figures.

Each of decode time, TTFT and memory is a non-negative combination of physically meaningful features
(see perf_model.py); the coefficients are found by non-negative least squares on relative error (so a 0.5B
and a 6B model weigh the same), solved exactly by enumerating the active sets (five or fewer unknowns).
Speed comes from the RK3588 rows of benchmark.md v1.3.0; memory from every RK3588 memory row across releases
(the RK3576 rows are held back, see convert/data/rk3588_benchmarks.json), with the KV cache computed, not fitted.
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
from typing import Any

import numpy as np

from rkedge.convert.perf_model import (
    MEMORY_ROW_CONTEXT,
    MIB,
    ModelShape,
    PerfModel,
    benchmark_rows,
    decode_features,
    kv_cache_bytes,
    memory_features,
    memory_row_shape,
    memory_rows,
    prefill_features,
)

OUT = Path(__file__).resolve().parents[1] / "convert" / "data" / "rk3588_perf_model.json"
Row = dict[str, Any]
Array = np.ndarray[Any, np.dtype[np.float64]]


def nnls_relative(features: Array, target: Array, fixed: Array | None = None) -> Array:
    """min sum(((features @ c + fixed) / target - 1)^2) subject to c >= 0 (``fixed``: a known part of the target)."""
    a = features / target[:, None]
    b = 1 - fixed / target if fixed is not None else np.ones(len(target))
    best: tuple[Array, float] | None = None
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


def fit_speed(rows: list[Row]) -> dict[str, list[float]]:
    shapes = [ModelShape.from_dict(r["shape"], r["checkpoint"]) for r in rows]
    measured = [r["measured"] for r in rows]
    design = {
        "decode": (np.array([decode_features(s) for s in shapes]), np.array([1000 / m["tokens_per_s"] for m in measured])),
        "prefill": (np.array([prefill_features(s) for s in shapes]), np.array([m["ttft_ms"] for m in measured])),
    }
    return {name: [float(c) for c in nnls_relative(x, y)] for name, (x, y) in design.items()}


def fit_memory(rows: list[Row]) -> list[float]:
    """Memory coefficients from the rows marked "fit" among ``rows``."""
    used = [r for r in rows if r["use"] == "fit"]
    shapes = [memory_row_shape(r) for r in used]
    x = np.array([memory_features(s, r["dtype"], r["embedding_resident"]) for s, r in zip(shapes, used, strict=True)])
    kv = np.array([kv_cache_bytes(s, r.get("max_context") or MEMORY_ROW_CONTEXT) / MIB
                   for s, r in zip(shapes, used, strict=True)])
    return [float(c) for c in nnls_relative(x, np.array([r["memory_mb"] for r in used]), kv)]


def fit(rows: list[Row], memory: list[Row]) -> dict[str, list[float]]:
    return {**fit_speed(rows), "memory": fit_memory(memory)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    rows, memory = benchmark_rows(), memory_rows()
    coefficients = fit(rows, memory)
    data = {**coefficients, "fit": {
        "rows": [r["checkpoint"] for r in rows],
        "memory_rows": sorted({f"{r['model']} {r['platform']} {r['dtype']} runtime {r['runtime']}"
                               for r in memory if r["use"] == "fit"}),
        "method": "non-negative least squares on relative error, benchmarks/fit_perf_model.py",
        "source": "convert/data/rk3588_benchmarks.json (Rockchip benchmark.md v1.3.0 for speed; benchmark.md "
                  "v1.2.1-v1.3.0 and README v1.1.1-v1.2.1b1 for memory)",
        "fitted_at": time.strftime("%Y-%m-%d"),
    }}
    if args.check:
        committed = json.loads(OUT.read_text())
        same = all(np.allclose(committed[k], coefficients[k], rtol=1e-6) for k in coefficients)
        print("committed coefficients match a fresh fit" if same else "committed coefficients are stale")
        sys.exit(0 if same else 1)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    model = PerfModel(tuple(coefficients["decode"]), tuple(coefficients["prefill"]), tuple(coefficients["memory"]))
    print(f"wrote {OUT}")
    for key, value in model.physical().items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
