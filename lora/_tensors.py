"""One tensor at a time in and out of safetensors files, without mapping whole files.

The streaming merge reads each tensor by its byte range (``read_header`` gives it) and writes output
shards with a header computed up front, so its memory stays at a few copies of the largest single tensor
whatever the size of the checkpoint. ``safe_open`` would map the file, and every page it touches counts
towards the process's resident set until the file is closed.

torch (and numpy, for the byte view) are imported inside the functions that need them.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from rkedge.convert.safetensors_index import DTYPE_BYTES, TensorInfo
from rkedge.errors import InputError

if TYPE_CHECKING:
    import torch

#: safetensors dtype code -> name of the torch dtype.
TORCH_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}
#: The floating dtypes a merge computes with and ``dtype=`` converts between.
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
#: Relative precision (one unit in the last place at 1.0) of each floating dtype.
EPSILON: dict[str, float] = {"F64": 2.0**-52, "F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}
_COPY_CHUNK = 16 << 20


def torch_dtype(code: str) -> torch.dtype:
    import torch

    try:
        dtype: torch.dtype = getattr(torch, TORCH_DTYPE_NAMES[code])
        return dtype
    except (KeyError, AttributeError) as exc:
        raise InputError(f"safetensors dtype {code} is not supported by this torch build.") from exc


def nbytes(code: str, shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return int(count * DTYPE_BYTES[code])


class TensorReader:
    """Reads single tensors by byte range, keeping one plain file handle per file (no mmap)."""

    def __init__(self) -> None:
        self._open: dict[Path, tuple[io.BufferedReader, int, int]] = {}

    def _handle(self, info: TensorInfo) -> tuple[io.BufferedReader, int]:
        entry = self._open.get(info.file)
        if entry is None:
            handle = open(info.file, "rb")
            (length,) = struct.unpack("<Q", handle.read(8))
            handle.seek(0, 2)
            entry = (handle, 8 + length, handle.tell())
            self._open[info.file] = entry
        handle, start, size = entry
        if start + info.offsets[1] > size or info.offsets[0] > info.offsets[1]:
            raise InputError(f"{info.file}: tensor {info.name} lies outside the file; the file is truncated or "
                             "corrupt.",
                             fix="re-download or re-save the checkpoint")
        return handle, start

    def read_bytes(self, info: TensorInfo) -> bytearray:
        return self._read_range(info, 0, info.nbytes)

    def _read_range(self, info: TensorInfo, offset: int, length: int) -> bytearray:
        """``length`` bytes of the tensor's data from ``offset`` (relative to the tensor's first byte)."""
        handle, start = self._handle(info)
        buffer = bytearray(length)
        handle.seek(start + info.offsets[0] + offset)
        view = memoryview(buffer)
        filled = 0
        while filled < len(buffer):
            got = handle.readinto(view[filled:])
            if not got:
                raise InputError(f"{info.file}: unexpected end of file in tensor {info.name}.")
            filled += got
        return buffer

    def read(self, info: TensorInfo) -> torch.Tensor:
        """The tensor as a new CPU torch tensor (its own memory, not a view of the file)."""
        import torch

        dtype = torch_dtype(info.dtype)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        expected = nbytes(info.dtype, info.shape)
        if info.nbytes != expected:
            raise InputError(f"{info.file}: tensor {info.name} holds {info.nbytes} bytes, its shape needs {expected}.")
        return torch.frombuffer(self.read_bytes(info), dtype=dtype).reshape(info.shape)

    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (along its first dimension: contiguous bytes in the file) as a new
        tensor; the rest of the tensor is not read."""
        import torch

        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise InputError(f"{info.file}: rows {start}:{stop} lie outside tensor {info.name} {list(info.shape)}.")
        row_bytes = nbytes(info.dtype, info.shape[1:])
        buffer = self._read_range(info, start * row_bytes, (stop - start) * row_bytes)
        if not buffer:
            return torch.empty((0, *info.shape[1:]), dtype=torch_dtype(info.dtype))
        return torch.frombuffer(buffer, dtype=torch_dtype(info.dtype)).reshape(stop - start, *info.shape[1:])

    def copy_to(self, info: TensorInfo, out: BinaryIO) -> int:
        """Copies the tensor's bytes unchanged, in chunks."""
        handle, start = self._handle(info)
        handle.seek(start + info.offsets[0])
        left = info.nbytes
        while left:
            block = handle.read(min(left, _COPY_CHUNK))
            if not block:
                raise InputError(f"{info.file}: unexpected end of file in tensor {info.name}.")
            out.write(block)
            left -= len(block)
        return info.nbytes

    def close(self) -> None:
        for handle, _, _ in self._open.values():
            handle.close()
        self._open.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def safetensors_header(entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header for tensors written in ``entries`` order (name, dtype code, shape)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, code, shape in entries:
        size = nbytes(code, shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text


def write_tensor(out: BinaryIO, tensor: torch.Tensor) -> int:
    """Writes the tensor's raw little-endian bytes; returns the byte count."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    data = flat.view(torch.uint8).numpy()
    out.write(memoryview(data))
    return int(data.nbytes)
