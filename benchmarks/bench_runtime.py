#!/usr/bin/env python3
"""Throughput of ``LLM.generate`` on the simulated NPU at unlimited pace, per ABI.

Prints tokens/s through the whole Python path (C runtime thread -> ctypes trampoline -> queue -> iterator
-> UTF-8 text) and the per-token overhead in microseconds. The simulated NPU's own cost per token is
shown beside it as a floor: the same runs into a Python handler that only counts (NativeModel layer).
Target (issue 2): >= 50,000 tokens/s on the development machine.

Usage: python benchmarks/bench_runtime.py [--tokens N] [--repeats R] [--abi 1.3.0 ...]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

from rkedge.runtime import LLM
from rkedge.runtime._stderr import capture_native_stderr
from rkedge.runtime.abi._native import NativeLibrary, NativeModel
from rkedge.runtime.library import resolve_library
from rkedge.runtime.simmodel import simulated_manifest, write_simulated_model
from rkedge.runtime.types import InitParams, RunRequest

TOOLKIT = {"1.1": "1.1.4", "1.2.0": "1.2.0", "1.2.1": "1.2.1", "1.2.3": "1.2.3", "1.3.0": "1.3.0"}


def make_model(folder: Path, abi: str, tokens: int) -> Path:
    text = " ".join(f"w{i % 1000}" for i in range(tokens))  # one token per word
    path = folder / f"bench-{abi}.rkllm"
    write_simulated_model(path, simulated_manifest(name="bench", toolkit_version=TOOLKIT[abi],
                                                   responses=[{"text": text}], max_context_limit=16384))
    return path


def bench_llm(model: Path, abi: str, tokens: int, repeats: int) -> list[float]:
    rates = []
    with LLM(model, library="mock", abi=abi, max_context_len=16384, max_new_tokens=tokens + 10) as llm:
        llm.generate("warm up", stream=False)
        for _ in range(repeats):
            start = time.perf_counter()
            count = sum(1 for _ in llm.generate("go"))
            elapsed = time.perf_counter() - start
            rates.append(count / elapsed)
    return rates


def bench_native(model: Path, abi: str, tokens: int, repeats: int) -> list[float]:
    """The floor: C thread -> ctypes trampoline -> a handler that only counts."""
    runtime = resolve_library("mock", abi)
    counter = [0]

    def on_event(run_id: int, event) -> int:
        counter[0] += 1
        return 0

    with capture_native_stderr():  # the runtime's init lines
        native = NativeModel(NativeLibrary.load(runtime.path, abi), str(model),
                             InitParams(max_context_len=16384, max_new_tokens=tokens + 10), on_event)
    rates = []
    try:
        for _ in range(repeats):
            counter[0] = 0
            start = time.perf_counter()
            native.run(1, RunRequest(prompt=b"go"))
            rates.append(counter[0] / (time.perf_counter() - start))
    finally:
        native.destroy()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--abi", nargs="*", default=list(TOOLKIT))
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}")
    print(f"{args.tokens} tokens per run, best and median of {args.repeats} runs, unlimited pace\n")
    print(f"{'ABI':6} {'LLM.generate tok/s':>20} {'median':>10} {'us/token':>9} {'trampoline-only tok/s':>22}")
    with tempfile.TemporaryDirectory() as folder:
        for abi in args.abi:
            model = make_model(Path(folder), abi, args.tokens)
            llm_rates = bench_llm(model, abi, args.tokens, args.repeats)
            floor = bench_native(model, abi, args.tokens, args.repeats)
            best = max(llm_rates)
            print(f"{abi:6} {best:>20,.0f} {statistics.median(llm_rates):>10,.0f} {1e6 / best:>9.2f} "
                  f"{max(floor):>22,.0f}")
    print("\ntarget: >= 50,000 tokens/s through LLM.generate")


if __name__ == "__main__":
    main()
