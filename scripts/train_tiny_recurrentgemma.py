#!/usr/bin/env python3
"""Trains the tiny RecurrentGemmas used by the RKNN backend's tests and benchmarks (tests/data/tiny-*).

A random-weight RecurrentGemma is a useless accuracy proxy (with tied embeddings it predicts its own input
token; recurrentgemma-rknn-feasibility.md section 2), so the tests use models trained for a few hundred steps on
byte-level text found on any Debian-like host with Python: CPython's own standard-library sources (``--corpus
python``, the default fixture tests/data/tiny-recurrentgemma and a deeper, wider one) or the licence texts in
/usr/share/common-licenses (``--corpus prose``: English prose). Deterministic: fixed seeds, fixed files. The
defaults reproduce tests/data/tiny-recurrentgemma (a few minutes on 2 CPU cores); the results are committed.

``--texts DIR`` also writes the model's own evaluation data: ``calibration.txt`` (excerpts of files the model
was not trained on, split by blank lines) and ``heldout.txt`` (the first 3000 characters of another unseen file).

Usage: python scripts/train_tiny_recurrentgemma.py [--corpus python|prose] [--width 128] [--depth 3]
       [--steps 400] [--seed 0] [--out tests/data/tiny-recurrentgemma] [--texts DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BYTE_OFFSET = 3  # ids 0 pad, 1 eos, 2 bos; byte b -> b + 3
LICENSES = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class Corpus:
    folder: Path
    train: tuple[str, ...]
    held_out: str  # the training script's own held-out loss, and heldout.txt
    calibration: tuple[str, ...]  # calibration.txt: unseen files of the same kind
    describe: str


def corpora() -> dict[str, Corpus]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return {
        "python": Corpus(lib, ("argparse.py", "textwrap.py", "string.py", "shlex.py", "fractions.py", "heapq.py",
                               "bisect.py", "difflib.py", "calendar.py", "pprint.py"),
                         "glob.py", ("fnmatch.py", "queue.py"), "CPython standard-library sources"),
        # GPL-2/LGPL share phrasing with GPL-3 (calibration), as any in-domain text does; the held-out MPL-2.0 is a
        # different licence written in other words.
        "prose": Corpus(LICENSES, ("GPL-1", "GPL-2", "LGPL-2", "LGPL-2.1", "GFDL-1.2", "MPL-1.1", "Apache-2.0",
                                   "Artistic"),
                        "MPL-2.0", ("GPL-3", "CC0-1.0"), f"English licence texts ({LICENSES})"),
    }


def read(corpus: Corpus, names: tuple[str, ...]) -> bytes:
    return b"\n".join((corpus.folder / name).read_bytes() for name in names)


def config_dict(width: int = 128, depth: int = 3) -> dict[str, Any]:
    """Griffin's layer pattern (two recurrent blocks, then local attention), repeated to ``depth`` layers."""
    heads = 4
    kinds = ["recurrent", "recurrent", "attention"]
    return dict(vocab_size=256 + BYTE_OFFSET, hidden_size=width, lru_width=width, intermediate_size=4 * width,
                num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=1, head_dim=width // heads,
                attention_window_size=64, conv1d_width=4, block_types=[kinds[i % 3] for i in range(depth)],
                pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)


def excerpts(text: str, size: int = 400) -> list[str]:
    """Consecutive excerpts of about ``size`` characters cut at line ends, for calibration.txt."""
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current) >= size:
            out.append(current.strip("\n"))
            current = ""
    if current.strip():
        out.append(current.strip("\n"))
    return [e for e in out if e.strip()]


def write_texts(corpus: Corpus, folder: Path, prompts: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = read(corpus, corpus.calibration).decode("utf-8", errors="replace")
    chosen = excerpts(text)
    step = max(1, len(chosen) // prompts)
    # One blank line between excerpts: how `--calibration FILE.txt` splits a plain-text file into prompts.
    calibration = "\n\n".join(e.replace("\n\n", "\n") for e in chosen[::step][:prompts])
    (folder / "calibration.txt").write_text(calibration + "\n", encoding="utf-8")
    held = read(corpus, (corpus.held_out,)).decode("utf-8", errors="replace")[:3000]
    (folder / "heldout.txt").write_text(held, encoding="utf-8")


def main() -> None:
    import torch
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", choices=sorted(corpora()), default="python")
    parser.add_argument("--width", type=int, default=128, help="hidden size = lru width (4 heads)")
    parser.add_argument("--depth", type=int, default=3, help="layers (recurrent, recurrent, attention, ...)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/tiny-recurrentgemma")
    parser.add_argument("--texts", type=Path, default=None, help="also write calibration.txt and heldout.txt here")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 on a busy host: 2 threads spin at each barrier when a core is taken)")
    args = parser.parse_args()
    corpus = corpora()[args.corpus]
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**config_dict(args.width, args.depth)))
    data = torch.tensor(list(read(corpus, corpus.train)), dtype=torch.long) + BYTE_OFFSET
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    batch, length = 16, 128
    generator = torch.Generator().manual_seed(args.seed + 1)
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
    held = torch.tensor(list(read(corpus, (corpus.held_out,))[:2048]), dtype=torch.long)[None] + BYTE_OFFSET
    with torch.no_grad():
        held_loss = model(input_ids=held, labels=held, use_cache=False).loss.item()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    (args.out / "rkedge_tokenizer.json").write_text(json.dumps(
        {"type": "bytes", "offset": BYTE_OFFSET, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}) + "\n")
    (args.out / "README.md").write_text(
        f"---\nlicense: apache-2.0\n---\n# tiny RecurrentGemma (test fixture)\n\nByte-level (id = byte + {BYTE_OFFSET}), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, trained {args.steps} steps on {corpus.describe} "
        f"by scripts/train_tiny_recurrentgemma.py. Held-out loss ({corpus.held_out}, 2048 bytes): "
        f"{held_loss:.3f} nats/byte.\n")
    if args.texts is not None:
        write_texts(corpus, args.texts)
    print(f"held-out loss {held_loss:.3f} nats/byte; wrote {args.out}")


if __name__ == "__main__":
    main()
