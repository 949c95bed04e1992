#!/usr/bin/env python3
"""The RKNN backend: decode steps/s in the rknn-toolkit2 simulator, and predicted board tokens/s for
recurrentgemma-2b-it.

Simulator figures are for the tiny RecurrentGemma fixture (3 layers, hidden 128) on this x86_64 host: they say
how fast the CI and a developer's loop run, nothing about a board (the simulator emulates the NPU's arithmetic,
not its speed). Board figures come from rkedge's plan model (fitted to Rockchip's RKLLM benchmarks) with the
assumptions printed; no RK3588 has run these graphs yet.

Usage: python benchmarks/bench_rknn.py [--steps 200] [--bundle DIR ...]   (builds fp16 and w8a8 bundles of the
tiny fixture in a temporary folder when no --bundle is given)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/data/tiny-recurrentgemma"
HELD_OUT = ROOT / "tests/data/rknn/heldout.txt"
CALIBRATION = ROOT / "tests/data/rknn/calibration.json"
CONFIG_2B = ROOT / "tests/data/configs/recurrentgemma-2b-it.json"


def build_bundles(folder: Path) -> list[Path]:
    from rkedge.convert.rknn.pipeline import RknnRequest, convert_rknn

    bundles = []
    for dtype in ("fp16", "w8a8"):
        started = time.perf_counter()
        result = convert_rknn(RknnRequest(model=TINY, out=folder / dtype, dtype=dtype, eval_text=str(HELD_OUT),
                                          calibration=str(CALIBRATION), eval_steps=64))
        print(f"built {dtype} bundle in {time.perf_counter() - started:.1f} s")
        assert result.bundle is not None
        bundles.append(result.bundle)
    return bundles


def bench_loop(bundle: Path, steps: int) -> dict[str, float]:
    """Raw decode steps through every graph (chunks + head)."""
    from rkedge.convert.rknn.quality import simulator_loop
    from rkedge.runtime._stderr import capture_native_output

    loop = simulator_loop(bundle)
    try:
        with capture_native_output():
            loop.step(2)  # first runs print and allocate
            loop.reset()
            started = time.perf_counter()
            for index in range(steps):
                loop.step(3 + index % 200)
            elapsed = time.perf_counter() - started
    finally:
        loop.runner.release()
    return {"steps_per_s": steps / elapsed, "ms_per_step": elapsed / steps * 1000}


def bench_llm(bundle: Path, tokens: int) -> dict[str, float]:
    """Tokens/s through rkedge.runtime.LLM (tokenizer, sampling, callbacks, the worker thread)."""
    from rkedge.runtime import LLM

    with LLM(bundle, library="mock", max_new_tokens=tokens, ignore_eos_token=True) as llm:
        llm.generate("import os\n", stream=False, max_new_tokens=4)
        started = time.perf_counter()
        result = llm.generate("def main(argv):\n", stream=False)
        elapsed = time.perf_counter() - started
    return {"tokens": result.stats.completion_tokens, "tokens_per_s": result.stats.completion_tokens / elapsed,
            "ttft_ms": result.stats.ttft_ms or 0.0}


def board_prediction() -> None:
    from rkedge.convert.inspect import read_json
    from rkedge.convert.perf_model import load_perf_model
    from rkedge.convert.rknn_plan import PESSIMISTIC_BANDWIDTH_GBS, griffin_shape, predict_griffin

    shape = griffin_shape(read_json(CONFIG_2B))
    bandwidth = load_perf_model().bandwidth_gbs
    print(f"\nrecurrentgemma-2b-it on RK3588 (predicted; {shape.total_params / 1e9:.2f}B parameters, "
          f"{shape.layers} layers, vocab {shape.vocab})")
    print(f"{'dtype':<6} {'GB read/token':>13} {'tok/s @' + format(bandwidth, '.1f'):>12} "
          f"{'tok/s @' + format(PESSIMISTIC_BANDWIDTH_GBS, 'g'):>10} {'TTFT 128 tok':>13} {'RAM GiB':>8} {'graphs':>6}")
    for dtype in ("w8a8", "fp16"):
        p = predict_griffin(shape, dtype)
        print(f"{dtype:<6} {p.bytes_per_token / 1e9:>13.2f} {p.decode_tokens_per_s:>12.1f} "
              f"{p.decode_tokens_per_s_pessimistic:>10.1f} {p.ttft_ms / 1000:>11.1f} s {p.total_bytes / 2**30:>8.2f} "
              f"{p.graphs:>6}")
    print("assumptions:")
    for line in (
        f"decode reads every NPU weight once per token (layers + the tied 256k x {shape.hidden} LM head), the "
        "attention window's K/V, the states and fp16 logits; nothing else costs time",
        f"effective DRAM bandwidth {bandwidth:.1f} GB/s, fitted to Rockchip's RKLLM decode figures on RK3588 "
        f"(benchmarks/fit_perf_model.py); {PESSIMISTIC_BANDWIDTH_GBS:g} GB/s is the feasibility study's figure",
        "the generic RKNN runtime matches RKLLM's bandwidth use; per-layer dispatch (~1,750 RKNN layers) and CPU "
        "fallbacks are not modelled, so these are upper bounds",
        "w8a8 = hybrid: RG-LRU gates and conv1d in fp16 (a few MB more); the embedding is a host table, not read by "
        "the NPU",
        "TTFT: the prompt runs through the decode step token by token (no prefill graph)",
    ):
        print(f"  - {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--bundle", type=Path, action="append", default=None)
    args = parser.parse_args()
    print(f"host: {platform.machine()} {platform.processor() or ''} ({platform.python_implementation()} "
          f"{platform.python_version()})")
    try:
        import rknn.api  # noqa: F401
    except Exception as exc:
        print(f"rknn-toolkit2 is not importable ({exc}); simulator figures skipped")
        board_prediction()
        return
    with tempfile.TemporaryDirectory() as tmp:
        bundles = args.bundle or build_bundles(Path(tmp))
        print(f"\nsimulator, tiny RecurrentGemma, {args.steps} decode steps")
        print(f"{'bundle':<52} {'steps/s':>8} {'ms/step':>8} {'LLM tok/s':>10} {'TTFT ms':>8}")
        for bundle in bundles:
            manifest = json.loads((bundle / "bundle.json").read_text())
            loop = bench_loop(bundle, args.steps)
            llm = bench_llm(bundle, args.steps)
            label = f"{bundle.name} ({len(manifest['graphs'])}+{len(manifest['heads'])} graphs)"
            print(f"{label:<52} {loop['steps_per_s']:>8.1f} {loop['ms_per_step']:>8.2f} "
                  f"{llm['tokens_per_s']:>10.1f} {llm['ttft_ms']:>8.1f}")
    board_prediction()


if __name__ == "__main__":
    main()
