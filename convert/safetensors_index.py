"""Reading safetensors headers without loading weights.

A safetensors file starts with an 8-byte little-endian header length and a JSON header that gives each
tensor's dtype, shape and byte range. That is all inspection, the planner's group-size checks and the
streaming LoRA merge need to plan their work; no tensor data is read here.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from rkedge.errors import InputError

#: Bytes per element of each safetensors dtype.
DTYPE_BYTES: dict[str, float] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U32": 4, "U16": 2, "U64": 8, "F4": 0.5,
}
#: ``--dtype`` / ``--load-dtype`` names -> safetensors dtype codes (the export and the LoRA merge convert to these).
DTYPE_CODES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int]  # byte range inside the file's data section

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


_DAMAGED_FIX = "re-download the checkpoint, or save it again with safetensors (save_pretrained(safe_serialization=True))"


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors and ``__metadata__`` of one safetensors file, every entry checked against the format (a dtype
    of the format, a shape of non-negative integers, a byte range inside the file whose length is the shape's).

    Raises:
        InputError: when the file is not a readable, consistent safetensors file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise InputError(f"{path} is too short to be a safetensors file ({len(prefix)} bytes).",
                                 fix=_DAMAGED_FIX)
            (length,) = struct.unpack("<Q", prefix)
            size = os.fstat(handle.fileno()).st_size
            if length > _MAX_HEADER or 8 + length > size:
                raise InputError(f"{path}: a safetensors header of {length} bytes is not plausible in a file of "
                                 f"{size} bytes; the file is corrupt or truncated.", fix=_DAMAGED_FIX)
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror or exc}).",
                         fix="check that the file exists and is readable") from exc
    except ValueError as exc:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        raise InputError(f"{path} is not a readable safetensors file: its header is not JSON ({exc}).",
                         fix=_DAMAGED_FIX) from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object.",
                         fix=_DAMAGED_FIX)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: __metadata__ must map names to strings.", fix=_DAMAGED_FIX)
    data_size = size - 8 - length
    tensors = {name: _tensor(path, name, info, data_size) for name, info in header.items()}
    return tensors, metadata


def _tensor(path: Path, name: str, info: object, data_size: int) -> TensorInfo:
    """One header entry, or an InputError saying what in it is wrong."""
    def bad(problem: str) -> InputError:
        return InputError(f"{path}: tensor {name!r} {problem}; the file is damaged.", fix=_DAMAGED_FIX)

    if not isinstance(info, dict):
        raise bad(f"is described by a JSON {type(info).__name__}, not an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise bad(f"has no {', '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise bad(f"has dtype {dtype!r}, not one of the format's ({', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise bad(f"has shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if begin > end or end > data_size:
        raise bad(f"has data_offsets [{begin}, {end}] outside its data section of {data_size} bytes")
    result = TensorInfo(name, dtype, tuple(shape), path, (begin, end))
    if result.numel * DTYPE_BYTES[dtype] != end - begin:
        raise bad(f"holds {end - begin} bytes, but shape {shape} of {dtype} needs "
                  f"{result.numel * DTYPE_BYTES[dtype]:g}")
    return result


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in index order when an index file exists.

    Raises:
        InputError: when the index is not a weight map of file names inside the folder, or names a missing file.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    fix = "re-download model.safetensors.index.json (it lists which shard holds each tensor)"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{index} is not readable JSON ({exc}).", fix=fix) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index} has no weight_map of tensor names to shard file names.", fix=fix)
    files = [folder / name for name in dict.fromkeys(weight_map.values())]
    for file in files:
        if file.resolve().parent != folder.resolve():
            raise InputError(f"{index} names {file.name!r} outside the checkpoint folder.", fix=fix)
        if not file.is_file():
            raise InputError(f"{index} names {file.name}, which is not in {folder} (an incomplete download?).",
                             fix="download every shard the index lists")
    return files


def read_checkpoint(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder (all shards), by name; a name in two shards is refused."""
    tensors: dict[str, TensorInfo] = {}
    for file in checkpoint_files(folder):
        found, _ = read_header(file)
        for name in found.keys() & tensors.keys():
            raise InputError(f"tensor {name!r} is in both {tensors[name].file.name} and {file.name}; which one the "
                             "toolkit loads is undefined.", fix=_DAMAGED_FIX)
        tensors.update(found)
    return tensors
