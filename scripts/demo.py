#!/usr/bin/env python3
"""The main job end to end on the simulated NPU (run by `make demo`).

A tiny Gemma 2 checkpoint (random weights, a tiny tokenizer with Gemma 2's real chat template) and a LoRA
trained a few steps with peft go through the whole host pipeline on the simulated toolkit, and the result is
served to a chat on the simulated NPU. Then a tiny trained RecurrentGemma goes through the RKNN backend and chats
in the rknn-toolkit2 simulator. Each step is the `rkedge` command a user would type.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import make_checkpoint, train_lora

OUT = Path("demo-out")


def step(title: str, *args: str, expect: int = 0) -> None:
    print(f"\n== {title}\n$ {shlex.join(['rkedge', *args])}", flush=True)
    result = subprocess.run([sys.executable, "-m", "rkedge", *args])
    if result.returncode != expect:
        print(f"demo: expected exit code {expect}, got {result.returncode}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    base, adapter = OUT / "tiny-gemma2", OUT / "tiny-gemma2-lora"
    print("== make a tiny Gemma 2 checkpoint (random weights, real chat template) and train a LoRA for 3 steps",
          flush=True)
    make_checkpoint(base, "gemma2")
    train_lora(base, adapter, steps=3)

    step("inspect the checkpoint (headers only; no weights are loaded)", "inspect", str(base))
    step("the failure that brought us here, caught on the host: Gemma 2 + toolkit 1.1.1 + w8a8_g128 (exit 2)",
         "convert", str(base), "--out", str(OUT / "refused"), "--toolkit", "mock", "--toolkit-version", "1.1.1",
         "--dtype", "w8a8_g128", "--dry-run", expect=2)
    step("convert with the LoRA merged in, on the simulated toolkit 1.2.3",
         "convert", str(base), "--out", str(OUT / "rkllm"), "--toolkit", "mock", "--toolkit-version", "1.2.3",
         "--lora", str(adapter), "--board", "orangepi-5")
    # The name comes from the arguments passed to build() and the merged adapter; take what the convert wrote.
    (model,) = sorted((OUT / "rkllm").glob("*.rkllm"))
    step("chat one turn on the simulated NPU (runtime ABI 1.2.3, KV cache reused across turns; the simulated NPU "
         "answers with deterministic placeholder text)", "chat", str(model), "--mock", "--abi", "1.2.3",
         "--prompt", "What is the RK3588?")
    print(f"\n.rkllm, manifest and model card: {(OUT / 'rkllm').resolve()}")
    rknn_part()


def rknn_part() -> None:
    """RecurrentGemma, which no RKLLM converts, through the RKNN backend (needs rknn-toolkit2: x86_64, Python <= 3.12)."""
    try:
        import rknn.api  # noqa: F401
    except Exception as exc:
        print(f"\n(RKNN backend part skipped: rknn-toolkit2 is not importable here: {exc})")
        return
    tiny = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny-recurrentgemma"
    step("RecurrentGemma: RKLLM cannot convert it, and says which backend can (exit 2)",
         "convert", str(tiny), "--out", str(OUT / "refused"), "--toolkit", "mock", "--dry-run", expect=2)
    step("RecurrentGemma through the RKNN backend: verified decode-step graphs, rknn-toolkit2, quality report "
         "(a tiny model trained on Python source)", "convert", str(tiny), "--backend", "rknn", "--dtype", "fp16",
         "--out", str(OUT / "rknn"), "--eval-steps", "64")
    bundle = OUT / "rknn" / "tiny-recurrentgemma_fp16_rk3588_rknn"
    step("chat one turn with it in the rknn-toolkit2 simulator (no chat template: it continues the code)", "chat", str(bundle), "--mock",
         "--max-new-tokens", "48", "--prompt", "class Parser:\n    def __init__(self")
    print(f"\nRKNN bundle: {bundle.resolve()}")


if __name__ == "__main__":
    main()
