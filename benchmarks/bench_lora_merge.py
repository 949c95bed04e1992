#!/usr/bin/env python3
"""Peak memory and wall time of rkedge's streaming LoRA merge against peft's in-memory merge.

Creates a synthetic Llama checkpoint of about 2.2 GB (float32; hidden 2048, 8 layers, intermediate 5632,
vocab 32000: 543M parameters), written shard by shard straight from random tensors, plus a rank-16 LoRA
on q/k/v/o/gate/up/down. Then, each in its own fresh subprocess, measures peak RSS (``ru_maxrss`` of the
child) and wall time of:

  (a) ``rkedge.lora.merge.merge_lora`` (streaming);
  (b) peft: ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload()``
      + ``save_pretrained``.

Peak RSS is the child's VmHWM (its own address space's high-water mark; ``ru_maxrss`` is printed beside it).
Prints both, the ratio (target: rkedge <= 0.5 x peft) and the largest difference between the two merged
checkpoints on a few tensors. Everything lives in a temporary folder that is removed at the end.

Usage: python benchmarks/bench_lora_merge.py [--hidden 2048] [--layers 8] [--intermediate 5632]
       [--vocab 32000] [--rank 16] [--shard-mb 500] [--keep]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The parent never imports torch and never holds tensors: Linux carries a process's ru_maxrss across fork and
# exec, so a large parent would set a floor under every child's figure. VmHWM (the high-water mark of the
# child's own address space, reset at exec) is read as well and is the figure printed.
CHILD_PRELUDE = """
import json, resource, sys, time

def hwm_kib():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

import torch
baseline_kib = hwm_kib()
started = time.perf_counter()
"""

CHILD_RKEDGE = CHILD_PRELUDE + """
from rkedge.lora.merge import merge_lora
merge_lora(sys.argv[1], sys.argv[2], sys.argv[3])
"""

CHILD_PEFT = CHILD_PRELUDE + """
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(model, sys.argv[2])
model = model.merge_and_unload()
model.save_pretrained(sys.argv[3], safe_serialization=True, max_shard_size="500MB")
"""

CHILD_EPILOGUE = """
print(json.dumps({"seconds": time.perf_counter() - started, "peak_kib": hwm_kib(),
                  "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "baseline_kib": baseline_kib}))
"""


def write_base(folder: Path, *, hidden: int, layers: int, intermediate: int, vocab: int, shard_bytes: int) -> int:
    """A Llama checkpoint from random tensors, one shard in memory at a time. Returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    heads = hidden // 128
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
              "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,))]
        shapes += [(f"{p}.self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        shapes += [(f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
                   (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
                   (f"{p}.mlp.down_proj.weight", (hidden, intermediate))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]

    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 4 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0
    for number, group in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02)
                   for name, shape in group}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def write_adapter(folder: Path, base: Path, *, hidden: int, layers: int, intermediate: int, rank: int) -> int:
    """A rank-``rank`` LoRA on every projection, in peft's on-disk layout."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(1)
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden)}  # (in, out)
    tensors = {}
    for i in range(layers):
        for name, (fan_in, fan_out) in dims.items():
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{group}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
              "target_modules": sorted(dims), "bias": "none", "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, "base_model_name_or_path": str(base), "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return sum(t.numel() * 4 for t in tensors.values())


def run_child(code: str, *args: Path) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", code + CHILD_EPILOGUE, *map(str, args)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"child failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_difference(ours: Path, theirs: Path, names: list[str]) -> float:
    import torch
    from safetensors import safe_open

    def find(folder: Path, name: str) -> torch.Tensor:
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                if name in handle.keys():
                    return handle.get_tensor(name)
        raise KeyError(name)

    return max(float((find(ours, n) - find(theirs, n)).abs().max()) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--generate", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.generate is not None:  # child mode: write the synthetic data and report sizes
        size = write_base(args.generate / "base", hidden=args.hidden, layers=args.layers,
                          intermediate=args.intermediate, vocab=args.vocab, shard_bytes=args.shard_mb << 20)
        adapter_size = write_adapter(args.generate / "adapter", args.generate / "base", hidden=args.hidden,
                                     layers=args.layers, intermediate=args.intermediate, rank=args.rank)
        print(json.dumps({"size": size, "adapter_size": adapter_size}))
        return

    root = Path(tempfile.mkdtemp(prefix="rkedge-bench-lora-"))
    try:
        started = time.perf_counter()
        generated = subprocess.run([sys.executable, __file__, "--generate", str(root), "--hidden", str(args.hidden),
                                    "--layers", str(args.layers), "--intermediate", str(args.intermediate),
                                    "--vocab", str(args.vocab), "--rank", str(args.rank), "--shard-mb",
                                    str(args.shard_mb)], capture_output=True, text=True)
        if generated.returncode != 0:
            raise SystemExit(f"generating the synthetic checkpoint failed:\n{generated.stderr[-3000:]}")
        sizes = json.loads(generated.stdout.strip().splitlines()[-1])
        size, adapter_size = sizes["size"], sizes["adapter_size"]
        shards = len(list((root / "base").glob("*.safetensors")))
        print(f"synthetic base: {size / 1e9:.2f} GB float32 in {shards} shards ({size // 4 / 1e6:.0f}M parameters); "
              f"adapter r={args.rank} on q/k/v/o/gate/up/down: {adapter_size / 1e6:.1f} MB "
              f"(written in {time.perf_counter() - started:.1f} s)")
        ours = run_child(CHILD_RKEDGE, root / "base", root / "adapter", root / "out-rkedge")
        theirs = run_child(CHILD_PEFT, root / "base", root / "adapter", root / "out-peft")
        checked = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{args.layers - 1}.mlp.down_proj.weight",
                   "model.embed_tokens.weight"]
        diff = max_difference(root / "out-rkedge", root / "out-peft", checked)  # torch only after the children
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    def mb(kib: int) -> str:
        return f"{kib / 1024:.0f} MB"

    print(f"\nmachine: {platform.machine()}, python {platform.python_version()}")
    print(f"{'':26}{'peak RSS':>11}{'ru_maxrss':>12}{'after import torch':>20}{'wall time':>12}")
    for label, run in (("(a) rkedge merge_lora", ours), ("(b) peft merge_and_unload", theirs)):
        print(f"{label:26}{mb(run['peak_kib']):>11}{mb(run['ru_maxrss_kib']):>12}{mb(run['baseline_kib']):>20}"
              f"{run['seconds']:>10.1f} s")
    ratio = ours["peak_kib"] / theirs["peak_kib"]
    above = (ours["peak_kib"] - ours["baseline_kib"]) / max(1, theirs["peak_kib"] - theirs["baseline_kib"])
    print(f"\npeak RSS ratio rkedge / peft: {ratio:.3f} (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'}); "
          f"above the after-import baseline: {above:.3f}")
    print(f"wall time ratio rkedge / peft: {ours['seconds'] / theirs['seconds']:.2f}")
    print(f"max |rkedge - peft| on {len(checked)} checked tensors: {diff:.3g}")


if __name__ == "__main__":
    main()
