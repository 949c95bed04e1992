"""Reading safetensors headers without loading weights.

A safetensors file starts with an 8-byte little-endian header length and a JSON header that gives each
tensor's dtype, shape and byte range. That is all inspection, the planner's group-size checks and the
streaming LoRA merge need to plan their work; no tensor data is read here.
"""

from __future__ import annotations

import json
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


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors and ``__metadata__`` of one safetensors file.

    Raises:
        InputError: when the file is not a readable safetensors file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise InputError(f"{path} is too short to be a safetensors file.")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER:
                raise InputError(f"{path}: safetensors header of {length} bytes is not plausible; the file is corrupt.")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc}).",
                         fix="re-download the checkpoint, or save it again with safetensors") from exc
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {
        name: TensorInfo(name, info["dtype"], tuple(info["shape"]), path, tuple(info["data_offsets"]))
        for name, info in header.items()
    }
    return tensors, metadata


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in index order when an index file exists."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    return sorted(folder.glob("*.safetensors"))


def read_checkpoint(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder (all shards), by name."""
    tensors: dict[str, TensorInfo] = {}
    for file in checkpoint_files(folder):
        found, _ = read_header(file)
        tensors.update(found)
    return tensors
