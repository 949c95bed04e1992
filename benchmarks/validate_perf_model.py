#!/usr/bin/env python3
"""Predicted vs measured for every published RK3588 row: tokens/s, TTFT and memory, with relative errors,
for the shipped coefficients and under leave-one-out (each row predicted by a fit on the other six).

Acceptance (issue 6): tokens/s and memory within +-15% for >= 80% of rows, also under leave-one-out;
TTFT within +-25% for >= 70%. Usage: python benchmarks/validate_perf_model.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_perf_model import fit

from rkedge.convert.perf_model import ModelShape, PerfModel, benchmark_rows, load_perf_model, predict

LIMITS = {"tokens_per_s": 0.15, "memory_mb": 0.15, "ttft_ms": 0.25}
SHARES = {"tokens_per_s": 0.8, "memory_mb": 0.8, "ttft_ms": 0.7}


def predicted(model: PerfModel, row: dict) -> dict[str, float]:
    p = predict(ModelShape.from_dict(row["shape"]), "w8a8", max_context=0, model=model)
    return {"tokens_per_s": p.decode_tokens_per_s, "ttft_ms": p.ttft_ms, "memory_mb": p.total_bytes / 2**20}


def share_within(values: list[float], limit: float) -> float:
    """The share of relative errors within +-limit."""
    return sum(abs(v) <= limit for v in values) / len(values)


def evaluate() -> dict[str, dict[str, list[float]]]:
    """Relative errors per metric of the shipped model ("fit") and of leave-one-out refits ("loo")."""
    rows = benchmark_rows()
    shipped = load_perf_model()
    errors: dict[str, dict[str, list[float]]] = {"fit": {k: [] for k in LIMITS}, "loo": {k: [] for k in LIMITS}}
    print(f"{'model':34} {'metric':13} {'measured':>9} {'predicted':>10} {'error':>8} {'leave-one-out':>14}")
    for index, row in enumerate(rows):
        others = rows[:index] + rows[index + 1:]
        c = fit(others)
        loo_model = PerfModel(tuple(c["decode"]), tuple(c["prefill"]), tuple(c["memory"]))
        ours, loo = predicted(shipped, row), predicted(loo_model, row)
        for metric in LIMITS:
            measured = row["measured"][metric]
            e, l = ours[metric] / measured - 1, loo[metric] / measured - 1
            errors["fit"][metric].append(e)
            errors["loo"][metric].append(l)
            print(f"{row['checkpoint'][:34]:34} {metric:13} {measured:9.2f} {ours[metric]:10.2f} {e * 100:+7.1f}% "
                  f"{l * 100:+13.1f}%")
    return errors


def main() -> int:
    errors = evaluate()
    ok = True
    print()
    for kind in ("fit", "loo"):
        for metric, limit in LIMITS.items():
            values = errors[kind][metric]
            share = share_within(values, limit)
            passed = share >= SHARES[metric]
            ok &= passed
            print(f"{kind:4} {metric:13} within +-{limit * 100:.0f}%: {share * 100:5.1f}% of rows "
                  f"(need {SHARES[metric] * 100:.0f}%) max |error| {max(abs(v) for v in values) * 100:5.1f}%"
                  f" {'ok' if passed else 'FAIL'}")
    physical = load_perf_model().physical()
    print("\nfitted parameters: " + ", ".join(f"{k} {v}" for k, v in physical.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
