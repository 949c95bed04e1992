#!/usr/bin/env python3
"""rkedge at the seeds' real sizes: random-weight checkpoints of real shapes through ``rkedge convert``.

For each shape (from /work/shared/knowledge/model-configs.json: gemma-2-2b-it, recurrentgemma-2b-it, and with
``--shape gemma-2-9b-it`` the 9B), optionally at reduced depth (``--layers``), this
  1. writes a bf16 checkpoint in shards, tensor by tensor from the model's meta-device layout (the builder never
     holds more than one shard), with a byte-level tokenizer (scripts/tiny_models.py; its ids fit any vocabulary);
  2. for the Gemma shapes, writes an all-linear rank-16 LoRA (random A and B) and converts with
     ``--toolkit mock --toolkit-version 1.2.3 --lora``; RecurrentGemma converts with ``--backend rknn --dtype w8a8``;
  3. samples the RSS of the whole process tree (psutil, every 0.25 s) and prints per step (from the CLI's
     ``[..] step`` lines) the wall time and peak RSS, the overall peak and its ratio to the checkpoint size, the
     bytes the tree wrote (its processes' write_bytes as last seen) and the output size, and the I/O floor: the
     time to copy the checkpoint once.
Checkpoints live in a temporary folder under --work (default /work/tmp-bench-scale) removed after each shape.
Random weights say nothing about quality, only about time and memory.

Usage: python benchmarks/bench_scale.py [--shape recurrentgemma-2b-it] [--layers 3] [--eval-steps 16]
       [--shard-gb 2] [--no-lora] [--keep]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path("/work/shared/knowledge/model-configs.json")
DEFAULT_SHAPES = ("gemma-2-2b-it", "recurrentgemma-2b-it")
DEFAULT_LAYERS = {"recurrentgemma-2b-it": 3}  # 26 layers take hours through the simulator on 2 cores
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_config(shape: str, layers: int | None) -> dict[str, Any]:
    """The shape's config.json as its repository ships it (the fields model-configs.json records)."""
    rows = {row["name"].split("/")[-1]: row for row in json.loads(CONFIGS.read_text())}
    row = rows[shape]
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
    config = {k: row[k] for k in keys}
    config["architectures"] = [row["architecture"]]
    extra = {k: v for k, v in row.get("extra", {}).items() if not k.startswith(("_", "n_", "layer_pattern", "norms"))
             and k not in ("mlp_width_actually_used", "embeddings_scale_by_sqrt_dim")}
    config.update(extra)
    if row.get("max_position_embeddings"):
        config["max_position_embeddings"] = row["max_position_embeddings"]
    if layers:
        config["num_hidden_layers"] = layers
    config.update({"torch_dtype": "bfloat16", "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})
    return config


def write_checkpoint(folder: Path, config: dict[str, Any], shard_bytes: int) -> int:
    """Random bf16 weights in the model's own tensor names and shapes, shard by shard; returns the bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    hf = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    tensors = [(n, tuple(p.shape)) for n, p in model.state_dict().items()
               if not (config.get("tie_word_embeddings") and n == "lm_head.weight")]
    del model
    generator = torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, shape in shard:
            scale = 0.0 if name.endswith("norm.weight") else 0.02  # Gemma norms scale by (1 + w)
            data[name] = (torch.randn(shape, generator=generator) * scale).to(torch.bfloat16)
            weight_map[name] = file
            total += data[name].numel() * 2
        save_file(data, str(folder / file), metadata={"format": "pt"})
        del data
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    spec = importlib.util.spec_from_file_location("tiny_models", ROOT / "scripts" / "tiny_models.py")
    assert spec and spec.loader
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    tiny.make_tokenizer("gemma").save_pretrained(folder)
    return total


def write_lora(folder: Path, base: Path, config: dict[str, Any], rank: int = 16) -> None:
    """An all-linear rank-``rank`` LoRA in PEFT's layout, random A and B (B non-zero so the merge does work)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    data = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in LORA_TARGETS and isinstance(module, torch.nn.Linear):
            prefix = f"base_model.model.{name}"
            data[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
            data[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
    folder.mkdir(parents=True)
    save_file(data, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS), "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(base), "use_rslora": False, "use_dora": False}, indent=2))


class TreeSampler:
    """Peak RSS of a process and its descendants, and the bytes they wrote, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval, self.peak, self.current, self.step_peak = interval, 0, 0, 0
        self.written: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                    self.written[proc.pid] = proc.io_counters().write_bytes
                except psutil.Error:
                    continue
            self.current, self.peak, self.step_peak = total, max(self.peak, total), max(self.step_peak, total)
            time.sleep(self.interval)


def run_convert(args: list[str]) -> dict[str, Any]:
    """``rkedge convert ARGS`` with per-step wall time and peak RSS (from its ``[..] step`` lines)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "rkedge", "convert", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    sampler = TreeSampler(proc.pid)
    steps: list[dict[str, Any]] = []
    tail: list[str] = []

    def close_step() -> None:
        if steps and "seconds" not in steps[-1]:
            steps[-1]["seconds"] = time.monotonic() - steps[-1]["start"]
            steps[-1]["peak_seen"] = sampler.step_peak
        sampler.step_peak = sampler.current

    assert proc.stderr is not None
    for line in proc.stderr:
        tail = (tail + [line.rstrip()])[-20:]
        if line.startswith("[..] "):
            close_step()
            steps.append({"name": line[5:].split(":", 1)[0], "start": time.monotonic()})
    out, _ = proc.communicate()
    close_step()
    sampler.stop.set()
    sampler.thread.join()
    return {"rc": proc.returncode, "seconds": time.monotonic() - started, "peak": sampler.peak,
            "written": sum(sampler.written.values()), "steps": steps, "tail": tail, "stdout": out[-2000:]}


def folder_bytes(folder: Path) -> int:
    """Bytes on disk under ``folder``, a hard-linked file counted once (the export links an unchanged checkpoint)."""
    from rkedge._fs import folder_size

    return folder_size(folder)

def copy_time(folder: Path, into: Path) -> float:
    started = time.monotonic()
    shutil.copytree(folder, into)
    subprocess.run(["sync"], check=False)
    seconds = time.monotonic() - started
    shutil.rmtree(into)
    return seconds


def bench(shape: str, options: argparse.Namespace) -> dict[str, Any]:
    layers = options.layers if options.layers is not None else DEFAULT_LAYERS.get(shape)
    config = hf_config(shape, layers)
    work = Path(options.work)
    work.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f"{shape}-", dir=work))
    try:
        started = time.monotonic()
        model = temp / shape
        size = write_checkpoint(model, config, int(options.shard_gb * 1e9))
        built = time.monotonic() - started
        floor = copy_time(model, temp / "copy")
        args = [str(model), "--out", str(temp / "out"), "-v"]
        lora = config["model_type"] != "recurrent_gemma" and not options.no_lora
        if config["model_type"] == "recurrent_gemma":
            args += ["--backend", "rknn", "--dtype", "w8a8"]
            if options.eval_steps:
                args += ["--eval-steps", str(options.eval_steps)]
        else:
            args += ["--toolkit", "mock", "--toolkit-version", "1.2.3"]
            if lora:
                write_lora(temp / "lora", model, config)
                args += ["--lora", str(temp / "lora")]
        result = run_convert(args)
        result.update(shape=shape, layers=config["num_hidden_layers"], checkpoint_bytes=size, build_s=built,
                      copy_s=floor, lora=lora, output_bytes=folder_bytes(temp / "out") if (temp / "out").exists()
                      else 0)
        return result
    finally:
        if not options.keep:
            shutil.rmtree(temp, ignore_errors=True)


def report(result: dict[str, Any]) -> None:
    gb = 1e9
    print(f"\n## {result['shape']} ({result['layers']} layers{', + LoRA r=16 all-linear' if result['lora'] else ''})"
          f": checkpoint {result['checkpoint_bytes'] / gb:.2f} GB bf16 (written in {result['build_s']:.0f} s)")
    print("| step | wall s | peak RSS GB |\n|---|---:|---:|")
    for step in result["steps"]:
        print(f"| {step['name']} | {step.get('seconds', 0):.1f} | {step['peak_seen'] / gb:.2f} |")
    print(f"| **total** (rc {result['rc']}) | {result['seconds']:.1f} | {result['peak'] / gb:.2f} |")
    print(f"peak RSS / checkpoint: {result['peak'] / result['checkpoint_bytes']:.2f}x; disk written by the tree: "
          f"{result['written'] / gb:.2f} GB; output folder with its .rkedge-work cache {result['output_bytes'] / gb:.2f} GB; I/O floor (copying the "
          f"checkpoint once): {result['copy_s']:.1f} s")
    if result["rc"] != 0:
        print("last lines:\n  " + "\n  ".join(result["tail"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=["gemma-2-2b-it", "gemma-2-9b-it",
                                                             "recurrentgemma-2b-it"])
    parser.add_argument("--layers", type=int, default=None, help="reduced depth (default: full, RecurrentGemma 3)")
    parser.add_argument("--eval-steps", type=int, default=16, help="RKNN quality steps (0: the default budget)")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--work", default="/work/tmp-bench-scale")
    options = parser.parse_args()
    for shape in options.shape or DEFAULT_SHAPES:
        report(bench(shape, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
