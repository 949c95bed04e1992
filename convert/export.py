"""Export: the (merged or original) checkpoint as sharded safetensors, in the dtype chosen for the toolkit.

Tensor by tensor: one tensor (and its converted copy) is in memory at a time, never a whole shard. When the
dtype does not change, shards are hard-linked (or copied, across disks) instead of rewritten. Config, tokenizer and chat-template files are copied; the
config loses any ``quantization_config`` only when the weights really are plain floats (a bitsandbytes or
GPTQ checkpoint is refused by the planner before this step). ``rkedge_export.json`` records what the simulated
toolkit and the manifest need: chat family and template parts, BOS/EOS ids, the source's identity.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rkedge.convert.inspect import TOKENIZER_FILES, CheckpointInfo
from rkedge.convert.safetensors_index import DTYPE_CODES, TensorInfo, read_header
from rkedge.errors import InputError

EXPORT_META = "rkedge_export.json"


def export_checkpoint(info: CheckpointInfo, out_dir: Path, *, dtype: str | None, meta: dict[str, Any],
                      progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Writes ``out_dir`` (new or empty: the caller renames it into place when done)."""
    if dtype is not None and dtype not in DTYPE_CODES:
        raise InputError(f"unknown export dtype {dtype!r}.", fix=f"use one of: {', '.join(DTYPE_CODES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = info.weight_files
    target = DTYPE_CODES.get(dtype) if dtype else None
    for index, source in enumerate(files):
        if progress:
            progress(index, len(files), source.name)
        dtypes = {t.dtype for t in info.tensors.values() if t.file == source}
        if dtype is None or target is None or dtypes <= {target} or not (dtypes & set(DTYPE_CODES.values())):
            _link_or_copy(source, out_dir / source.name)
        else:
            _convert_shard(source, out_dir / source.name, dtype)
    if progress:
        progress(len(files), len(files), "done")
    index_file = info.path / "model.safetensors.index.json"
    if index_file.is_file():
        shutil.copyfile(index_file, out_dir / index_file.name)
    config = dict(info.config)
    if dtype:
        config["torch_dtype"] = dtype
        if "dtype" in config:
            config["dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (info.path / name).is_file():
            shutil.copyfile(info.path / name, out_dir / name)
    (out_dir / EXPORT_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _convert_shard(source: Path, target: Path, dtype: str) -> None:
    """Rewrites one shard tensor by tensor: a floating tensor converted to ``dtype``, any other copied as bytes.
    The output header is computed from the source header first, so at most one tensor (and its converted copy)
    is in memory at a time, whatever the size of the shard (real checkpoints ship 4-5 GB shards)."""
    from rkedge.lora._tensors import FLOAT_CODES, TensorReader, safetensors_header, torch_dtype, write_tensor

    tensors, metadata = read_header(source)
    code = DTYPE_CODES[dtype]
    ordered = sorted(tensors.values(), key=lambda t: t.offsets[0])  # read the source front to back

    def out_code(tensor: TensorInfo) -> str:
        return code if tensor.dtype in FLOAT_CODES else tensor.dtype

    header = safetensors_header([(t.name, out_code(t), t.shape) for t in ordered], {**metadata, "format": "pt"})
    with TensorReader() as reader, open(target, "wb") as out:
        out.write(header)
        for tensor in ordered:
            if out_code(tensor) == tensor.dtype:
                reader.copy_to(tensor, out)
            else:
                write_tensor(out, reader.read(tensor).to(torch_dtype(code)))
