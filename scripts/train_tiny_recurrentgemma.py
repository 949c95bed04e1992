#!/usr/bin/env python3
"""Trains the tiny RecurrentGemma fixture used by the RKNN backend's tests (tests/data/tiny-recurrentgemma).

A random-weight RecurrentGemma is a useless accuracy proxy (with tied embeddings it predicts its own input
token; recurrentgemma-rknn-feasibility.md section 2), so the tests use a model trained for a few hundred steps on
byte-level text: CPython's own standard-library sources (present wherever Python is). Deterministic: fixed seeds,
fixed files. Takes a few minutes on 2 CPU cores; the result is committed.

Usage: python scripts/train_tiny_recurrentgemma.py [--steps 400] [--out tests/data/tiny-recurrentgemma]
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

TRAIN_FILES = ("argparse.py", "textwrap.py", "string.py", "shlex.py", "fractions.py", "heapq.py", "bisect.py",
               "difflib.py", "calendar.py", "pprint.py")
HELD_OUT_FILE = "glob.py"
BYTE_OFFSET = 3  # ids 0 pad, 1 eos, 2 bos; byte b -> b + 3


def corpus(names: tuple[str, ...]) -> bytes:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return b"\n".join((lib / name).read_bytes() for name in names)


def config_dict() -> dict:
    return dict(vocab_size=256 + BYTE_OFFSET, hidden_size=128, lru_width=128, intermediate_size=512,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                attention_window_size=64, conv1d_width=4, block_types=["recurrent", "recurrent", "attention"],
                pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)


def main() -> None:
    import torch
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/tiny-recurrentgemma")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**config_dict()))
    data = torch.tensor(list(corpus(TRAIN_FILES)), dtype=torch.long) + BYTE_OFFSET
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    batch, length = 16, 128
    generator = torch.Generator().manual_seed(1)
    started = time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        ids = torch.stack([data[s:s + length] for s in starts])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    model.eval()
    held = torch.tensor(list(corpus((HELD_OUT_FILE,))[:2048]), dtype=torch.long)[None] + BYTE_OFFSET
    with torch.no_grad():
        held_loss = model(input_ids=held, labels=held, use_cache=False).loss.item()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    (args.out / "rkedge_tokenizer.json").write_text(json.dumps(
        {"type": "bytes", "offset": BYTE_OFFSET, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}) + "\n")
    (args.out / "README.md").write_text(
        f"---\nlicense: apache-2.0\n---\n# tiny RecurrentGemma (test fixture)\n\nByte-level (id = byte + {BYTE_OFFSET}), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, trained {args.steps} steps on CPython standard-library "
        f"sources by scripts/train_tiny_recurrentgemma.py. Held-out loss ({HELD_OUT_FILE}, 2048 bytes): "
        f"{held_loss:.3f} nats/byte.\n")
    print(f"held-out loss {held_loss:.3f} nats/byte; wrote {args.out}")


if __name__ == "__main__":
    main()
