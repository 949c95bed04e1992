#!/usr/bin/env python3
"""Cost per token of structured output constrained by llguidance, against plain decode, on the simulated NPU.

For each vocabulary size it runs a JSON-schema answer through ``ConstrainedStream`` (logits mode, mask, sample,
one token back per step) and splits the time per token into the host's share (mask + sampling: what the
grammar costs, and what moves to the board as is, scaled by the CPU) and the runtime's share (one logits run
per token: on the board about one decode step plus the per-run overhead, UNKNOWN until measured there). Plain
decode through ``LLM.generate`` at unlimited pace is shown beside it.

Usage: python benchmarks/bench_constrained.py [--vocab 32000 151936] [--answers 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from rkedge.runtime import LLM
from rkedge.runtime.server.constrained import ConstrainedStream, Sampler, grammar_for_format, host_tokenizer
from rkedge.runtime.simmodel import simulated_manifest, write_simulated_model

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "role"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                         "role": {"enum": ["admin", "user", "guest"]}}}
#: RK3588 decode at board pace (Qwen2.5-1.5B w8a8, runtime 1.3.0: 16.69 tokens/s; simmodel.BOARD_PACE).
BOARD_DECODE_MS = 1000 / 16.69
#: How much slower a Cortex-A76 core (2.4 GHz) runs this single-threaded Python + Rust than the development
#: machine: an assumption (typical single-core ratio of desktop x86 to A76), not a measurement.
A76_SLOWDOWN = 2.5


def bench(vocab: int, answers: int, folder: Path) -> dict[str, float]:
    text = " ".join(f"w{i}" for i in range(200))
    path = folder / f"bench-{vocab}.rkllm"
    write_simulated_model(path, simulated_manifest(name="bench", toolkit_version="1.3.0", vocab_size=vocab,
                                                   responses=[{"text": text}], max_context_limit=8192))
    grammar = grammar_for_format({"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    assert grammar is not None
    with LLM(path, library="mock", abi="1.3.0", max_context_len=8192, max_new_tokens=400) as llm:
        start = time.perf_counter()
        plain = llm.generate("go", stream=False)
        plain_ms = (time.perf_counter() - start) * 1000 / max(1, plain.stats.completion_tokens)
        started = time.perf_counter()
        tokenizer = host_tokenizer(llm)
        tokenizer_ms = (time.perf_counter() - started) * 1000
        host, runtime, tokens = [], [], 0
        for seed in range(answers):
            stream = ConstrainedStream(llm, "Describe a person.", grammar, tokenizer, max_tokens=160,
                                       sampler=Sampler(1.0, None, None, seed))
            text_out = "".join(d.text for d in stream.deltas())
            json.loads(text_out)
            assert stream.result is not None
            count = stream.result.stats.completion_tokens
            tokens += count
            host.append(stream.host_s * 1000 / count)
            runtime.append(stream.runtime_s * 1000 / count)
    return {"vocab": vocab, "plain_ms": plain_ms, "host_ms": statistics.median(host),
            "runtime_ms": statistics.median(runtime), "tokens": tokens, "tokenizer_ms": tokenizer_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--answers", type=int, default=5)
    args = parser.parse_args()
    print(f"# {platform.machine()} {platform.python_implementation()} {platform.python_version()}")
    print(f"{'vocab':>7} {'plain ms/tok':>12} {'host ms/tok':>11} {'sim run ms/tok':>14} {'tokens':>6} "
          f"{'board ms/tok (pred.)':>20} {'board overhead':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab:
            row = bench(vocab, args.answers, Path(tmp))
            # Board: a decode step per token (the one-token logits run), plus the host's share on an A76.
            board = BOARD_DECODE_MS + row["host_ms"] * A76_SLOWDOWN
            print(f"{row['vocab']:>7} {row['plain_ms']:>12.3f} {row['host_ms']:>11.3f} {row['runtime_ms']:>14.3f} "
                  f"{row['tokens']:>6} {board:>20.1f} {board / BOARD_DECODE_MS - 1:>13.0%}")


if __name__ == "__main__":
    main()
