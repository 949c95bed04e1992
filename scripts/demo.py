#!/usr/bin/env python3
"""The main job end to end on the simulated NPU (run by `make demo`).

Each step is the `rkedge` command a user would type; the commands are printed as they run.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

OUT = Path("demo-out")


def step(title: str, *args: str) -> None:
    command = ["rkedge", *args]
    print(f"\n== {title}\n$ {shlex.join(command)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "rkedge", *args])
    if result.returncode != 0:
        sys.exit(result.returncode)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    model = OUT / "demo-gemma.rkllm"
    step("create a simulated model (rkedge's own header; no weights; the real runtime refuses it)",
         "mock-model", "--out", str(model), "--name", "demo-gemma", "--arch", "Gemma2ForCausalLM",
         "--template", "gemma", "--pace", "board",
         "--response", "RK3588=>The RK3588 has a 6 TOPS NPU with three cores; I run on it through librkllmrt.")
    step("chat one turn on the simulated NPU (ABI 1.3.0, board pace)",
         "chat", str(model), "--mock", "--prompt", "What is the RK3588?")
    print("\ndemo finished: outputs in", OUT.resolve())


if __name__ == "__main__":
    main()
