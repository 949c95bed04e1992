"""bitsandbytes checkpoints as inputs: detect them and dequantize them, shard by shard, into a plain checkpoint.

The seeds' own uploads are bitsandbytes checkpoints (recurrentgemma-2b-it in 4-bit, gemma-2b-it in 8-bit); no
toolkit reads them, so rkedge dequantizes first and converts the result like any float checkpoint. Quality is
then bounded by the 4-bit/8-bit source: the manifest and card say so.

Layouts read (as transformers 5.x saves bitsandbytes 0.4x-0.50 models; checked against bitsandbytes 0.50.2):
- 4-bit (``Params4bit``): ``<m>.weight`` uint8 (two 4-bit codes per byte, high nibble first; another
  ``bnb_4bit_quant_storage`` dtype is the same bytes), ``.absmax`` (float32 per block of ``blocksize``),
  ``.quant_map`` (the 16-entry nf4/fp4 code), ``.quant_state.bitsandbytes__<nf4|fp4>`` (a JSON dict as uint8:
  shape, dtype, blocksize, and with double quantization nested_blocksize and nested_offset). Double quantization
  stores ``.absmax`` as uint8 codes into ``.nested_quant_map``, scaled per ``nested_blocksize`` block by
  ``.nested_absmax``, plus the offset.
- 8-bit LLM.int8 (``Int8Params``): ``<m>.weight`` int8 [out, in], ``<m>.SCB`` float32 per output row (absmax),
  ``<m>.weight_format``; the weight is ``int8 * SCB / 127``.
The arithmetic is bitsandbytes' own CPU path (``backends/default/ops.py``: code lookup and block scale in float32,
then one cast to the stored dtype), so the result equals ``bitsandbytes.functional.dequantize_4bit`` /
``int8_vectorwise_dequant`` (tests/test_bnb.py compares both, and the logits). bitsandbytes itself is not needed.
Every other tensor is copied as it is stored.

Memory: every output header is computed up front from the input headers and each 4-bit weight's JSON state
(:func:`plan_dequantization`), then tensors are streamed one at a time, each dequantized in chunks of whole
blocks: the host holds about one weight, never a shard. The planner sees the checkpoint through
:func:`dequantized_view` (the float checkpoint's shapes and sizes), before anything is written.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from rkedge.errors import InputError

if TYPE_CHECKING:
    import torch

    from rkedge.convert.inspect import CheckpointInfo
    from rkedge.convert.safetensors_index import TensorInfo
    from rkedge.lora._tensors import TensorReader

QUANT_STATE = ".quant_state.bitsandbytes__"
#: Companions of a 4-bit weight ``<m>.weight``: stored as ``<m>.weight<suffix>``.
FOUR_BIT_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", f"{QUANT_STATE}nf4",
                  f"{QUANT_STATE}fp4")
#: Companions of an int8 weight ``<m>.weight``: stored as ``<m>.<suffix>``.
INT8_PARTS = ("SCB", "weight_format")
DEFAULT_SHARD_BYTES = 2 * 1000**3
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "torch.float16": "float16",
          "torch.bfloat16": "bfloat16", "torch.float32": "float32"}


@dataclass(frozen=True)
class SourceQuantization:
    """How a checkpoint is quantized (its config's ``quantization_config``)."""

    method: str  # "bitsandbytes", or another quant_method rkedge cannot read (gptq, awq...)
    bits: int | None = None  # 4 or 8 for bitsandbytes
    quant_type: str | None = None  # "nf4" | "fp4" | "int8"
    double_quant: bool = False
    compute_dtype: str | None = None  # bnb_4bit_compute_dtype (4-bit) / the config's dtype (8-bit)

    @property
    def dequantizable(self) -> bool:
        return self.method == "bitsandbytes" and self.bits in (4, 8)

    def describe(self) -> str:
        if not self.dequantizable:
            return f"{self.method} quantization"
        if self.bits == 8:
            return "bitsandbytes 8-bit (LLM.int8)"
        return f"bitsandbytes 4-bit {self.quant_type}{' with double quantization' if self.double_quant else ''}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe(),
                "warning": quality_warning(self) if self.dequantizable else None}


@dataclass
class DequantizedInfo:
    source: SourceQuantization
    output: Path
    dtype: str  # what the dequantized weights were written in
    tensors_dequantized: int
    tensors_copied: int
    bytes_written: int
    seconds: float
    shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"source_quantization": self.source.to_dict(), "dtype": self.dtype,
                "tensors_dequantized": self.tensors_dequantized, "tensors_copied": self.tensors_copied,
                "bytes_written": self.bytes_written, "seconds": round(self.seconds, 2),
                "warning": quality_warning(self.source)}


def quality_warning(source: SourceQuantization) -> str:
    return (f"converted from a {source.describe()} checkpoint: quality is bounded by that source (the original "
            "float weights are not recoverable; convert the original checkpoint when you have it)")


def _config(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _model_dtype(config: dict[str, Any]) -> str | None:
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype is None and isinstance(config.get("text_config"), dict):
        dtype = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    return DTYPES.get(str(dtype)) if dtype else None


def quantization_of(checkpoint_dir: str | Path) -> SourceQuantization | None:
    """The checkpoint's quantization, or None when its config records none."""
    return quantization_from_config(_config(checkpoint_dir))


def quantization_from_config(config: dict[str, Any]) -> SourceQuantization | None:
    """:func:`quantization_of` for an already read ``config.json`` (top level, else its ``text_config``)."""
    q = config.get("quantization_config")
    if not q and isinstance(config.get("text_config"), dict):
        q = config["text_config"].get("quantization_config")
    if not isinstance(q, dict) or not q:
        return None
    legacy = any(q.get(k) for k in ("load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit"))
    method = str(q.get("quant_method") or ("bitsandbytes" if legacy else "unknown"))  # old configs had no method
    if method != "bitsandbytes":
        return SourceQuantization(method)
    if q.get("load_in_4bit") or q.get("_load_in_4bit"):
        compute = q.get("bnb_4bit_compute_dtype")
        return SourceQuantization(method, 4, str(q.get("bnb_4bit_quant_type") or "fp4"),
                                  bool(q.get("bnb_4bit_use_double_quant")),
                                  DTYPES.get(str(compute), str(compute)) if compute else None)
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        return SourceQuantization(method, 8, "int8", False, _model_dtype(config))
    return SourceQuantization(method)


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, DTYPES.get(name, name), None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"unknown dtype {name!r} in the bitsandbytes quantization state.",
                         fix="re-save the checkpoint with bitsandbytes >= 0.43")
    return dtype


def blockwise_dequantize(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                         blocksize: int) -> torch.Tensor:
    """``code[codes]`` scaled per block of ``blocksize`` by ``absmax`` (float32; bitsandbytes' blockwise rule)."""
    import torch

    values = code[codes.reshape(-1).to(torch.int64)]
    n = values.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    out = values.clone()
    out[:full] = (values[:full].view(blocks, blocksize) * absmax[:blocks].view(-1, 1)).reshape(full)
    if full < n:
        out[full:] = values[full:] * absmax[blocks]
    return out


#: Elements dequantized at a time (whole blocks): the float32 intermediates of one weight stay ~100 MB whatever
#: its size (a 4-bit weight's codes, scales and values would otherwise be ~20 bytes per element at once).
CHUNK_ELEMENTS = 1 << 22


def dequantize_4bit(packed: torch.Tensor, parts: dict[str, torch.Tensor], *,
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """One 4-bit weight from its stored parts (keys: the suffixes in FOUR_BIT_PARTS), ``chunk_elements`` at a
    time (each element's arithmetic is the same whatever the chunking)."""
    import math

    import torch

    state = _quant_state(parts)
    shape, blocksize = [int(s) for s in state["shape"]], int(state["blocksize"])
    absmax = parts[".absmax"]
    if ".nested_absmax" in parts:  # double quantization: the block scales are 8-bit themselves
        absmax = blockwise_dequantize(absmax, parts[".nested_quant_map"].float(), parts[".nested_absmax"].float(),
                                      int(state.get("nested_blocksize", 256)))
        absmax = absmax + float(state.get("nested_offset", 0.0))
    absmax, code = absmax.float(), parts[".quant_map"].float()
    dtype = _torch_dtype(str(state["dtype"]))
    raw = packed.contiguous().view(torch.uint8).reshape(-1)
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype)
    step = max(1, chunk_elements // (2 * blocksize)) * 2 * blocksize  # whole blocks, whole bytes
    for begin in range(0, n, step):
        end = min(n, begin + step)
        pairs = raw[begin // 2:(end + 1) // 2].to(torch.int32)
        codes = torch.stack((pairs >> 4, pairs & 0xF), dim=1).reshape(-1)[: end - begin]  # high nibble first
        out[begin:end] = blockwise_dequantize(codes, code, absmax[begin // blocksize:], blocksize).to(dtype)
    return out.reshape(shape)


def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype, *,
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """One LLM.int8 weight: each row times its absmax / 127 (bitsandbytes' int8_vectorwise_dequant), in ``dtype``,
    a few rows at a time."""
    import torch

    out = torch.empty(weight.shape, dtype=dtype)
    scale = scb.float().view(-1, 1)
    rows = max(1, chunk_elements // max(1, weight.numel() // max(1, weight.shape[0])))
    for begin in range(0, weight.shape[0], rows):
        end = begin + rows
        out[begin:end] = (weight[begin:end] * scale[begin:end] * 7.874015718698502e-3).to(dtype)
    return out


def _quant_state(parts: dict[str, Any]) -> dict[str, Any]:
    """The JSON quantization state bitsandbytes stores (as uint8) beside a 4-bit weight; ``parts`` values are
    tensors or raw bytes."""
    key = next(k for k in parts if k.startswith(QUANT_STATE))
    value = parts[key]
    data = bytes(value) if isinstance(value, (bytes, bytearray)) else bytes(value.to("cpu").view(-1).tolist())
    state = json.loads(data.decode("utf-8"))
    if not isinstance(state, dict) or "shape" not in state or "dtype" not in state:
        raise InputError(f"the bitsandbytes quantization state {key} is not the JSON bitsandbytes writes.",
                         fix="re-save the checkpoint with bitsandbytes >= 0.43")
    return state


class _Tensors:
    """Every tensor of the checkpoint by name, each read by its byte range from whichever shard holds it (no mmap:
    pages of a mapped file count towards the resident set until it is closed)."""

    def __init__(self, src: Path) -> None:
        from rkedge.convert.safetensors_index import checkpoint_files, read_checkpoint
        from rkedge.lora._tensors import TensorReader

        self.files = [f.name for f in checkpoint_files(src)]
        if not self.files:
            raise InputError(f"{src} has no .safetensors weights.", fix="pass a folder saved with save_pretrained")
        self.where = read_checkpoint(src)
        self.reader = TensorReader()

    def get(self, key: str) -> torch.Tensor:
        return self.reader.read(self.where[key])

    def keys_of(self, file: str) -> list[str]:
        return [k for k, info in self.where.items() if info.file.name == file]


def _plan(keys: set[str]) -> tuple[dict[str, str], set[str]]:
    """Which weights are quantized ("4bit" | "int8") and which stored keys are only their companions."""
    kinds, companions = {}, set()
    for key in keys:
        if not key.endswith(".weight"):
            continue
        four = [key + s for s in FOUR_BIT_PARTS if key + s in keys]
        if any(QUANT_STATE in k for k in four):
            kinds[key] = "4bit"
            companions.update(four)
        module = key[: -len("weight")]
        if module + "SCB" in keys:
            kinds[key] = "int8"
            companions.update(module + s for s in INT8_PARTS if module + s in keys)
    return kinds, companions


def quantized_weights(tensors: Mapping[str, TensorInfo]) -> dict[str, str]:
    """The stored weights bitsandbytes quantized, by name -> "4bit" | "int8" (empty for a plain checkpoint)."""
    return _plan(set(tensors))[0]


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the dequantized checkpoint: what is written (dtype code, shape) and what it comes from."""

    name: str
    kind: str  # "4bit" | "int8" (dequantized) | "copy" (written as stored)
    code: str  # safetensors dtype code written
    shape: tuple[int, ...]
    stored: TensorInfo  # the stored tensor (a quantized weight's packed codes)

    @property
    def nbytes(self) -> int:
        from rkedge.lora._tensors import nbytes

        return nbytes(self.code, self.shape)


def plan_dequantization(tensors: Mapping[str, TensorInfo], source: SourceQuantization, config: dict[str, Any],
                        reader: TensorReader | None = None) -> list[PlannedTensor]:
    """Every tensor the dequantized checkpoint holds, in stored order, with its shape and dtype: read from the
    headers and each 4-bit weight's small JSON quantization state (no torch, no weight data)."""
    from rkedge.convert.safetensors_index import DTYPE_CODES
    from rkedge.lora._tensors import TensorReader

    kinds, companions = _plan(set(tensors))
    int8_code = DTYPE_CODES.get(DTYPES.get(source.compute_dtype or _model_dtype(config) or "float16", ""), "F16")
    own = reader is None
    reader = reader or TensorReader()
    planned: list[PlannedTensor] = []
    try:
        for name, stored in tensors.items():
            if name in companions:
                continue
            kind = kinds.get(name, "copy")
            if kind == "4bit":
                state = _quant_state({k: reader.read_bytes(tensors[name + k]) for k in FOUR_BIT_PARTS
                                      if k.startswith(QUANT_STATE) and name + k in tensors})
                code = DTYPE_CODES.get(DTYPES.get(str(state["dtype"]), ""))
                if code is None:
                    raise InputError(f"{name}: bitsandbytes recorded dtype {state['dtype']!r}, not a float dtype.",
                                     fix="re-save the checkpoint with bitsandbytes >= 0.43")
                planned.append(PlannedTensor(name, kind, code, tuple(int(s) for s in state["shape"]), stored))
            elif kind == "int8":
                planned.append(PlannedTensor(name, kind, int8_code, stored.shape, stored))
            else:
                planned.append(PlannedTensor(name, kind, stored.dtype, stored.shape, stored))
    finally:
        if own:
            reader.close()
    return planned


def dequantized_tensors(tensors: Mapping[str, TensorInfo], source: SourceQuantization,
                        config: dict[str, Any]) -> dict[str, TensorInfo]:
    """The tensors the dequantized checkpoint will hold, as headers would describe them (for planning: shapes,
    dtypes and sizes are those written; ``file``/``offsets`` do not address the dequantized values)."""
    from rkedge.convert.safetensors_index import TensorInfo

    return {t.name: TensorInfo(t.name, t.code, t.shape, t.stored.file, (0, t.nbytes))
            for t in plan_dequantization(tensors, source, config)}


def dequantized_view(info: CheckpointInfo) -> CheckpointInfo:
    """``info`` as the planner should see a bitsandbytes checkpoint rkedge dequantizes: the tensors, parameter
    count, sizes and dtypes of the float checkpoint it becomes (``quantization_config`` stays, so the planner
    still knows what the source was). Any other checkpoint is returned as it is."""
    import dataclasses

    source = quantization_from_config(info.config)
    if source is None or not source.dequantizable or not quantized_weights(info.tensors):
        return info
    return dataclasses.replace(info, tensors=dequantized_tensors(info.tensors, source, info.config))


def dequantized_dtype(info: CheckpointInfo) -> str | None:
    """What the quantized weights become, as bitsandbytes dequantizes them: each 4-bit weight's recorded dtype, an
    int8 weight's compute dtype (e.g. "bfloat16"; several joined by "/"); None when rkedge does not dequantize."""
    from rkedge.lora._tensors import TORCH_DTYPE_NAMES

    source = quantization_from_config(info.config)
    kinds = quantized_weights(info.tensors)
    if source is None or not source.dequantizable or not kinds:
        return None
    planned = dequantized_tensors(info.tensors, source, info.config)
    return "/".join(sorted({TORCH_DTYPE_NAMES[planned[name].dtype] for name in kinds}))


def dequantize_checkpoint(src: str | Path, dst: str | Path, *, progress: Callable[[str], None] | None = None,
                          shard_bytes: int = DEFAULT_SHARD_BYTES) -> DequantizedInfo:
    """A plain safetensors checkpoint in ``dst`` from the bitsandbytes checkpoint ``src``, written atomically
    (``dst`` appears only when complete); see :func:`dequantize_into`."""
    from rkedge._fs import atomic_dir

    with atomic_dir(dst) as staging:
        info = dequantize_into(src, staging, progress=progress, shard_bytes=shard_bytes)
    info.output = Path(dst)
    return info


def dequantize_into(src: str | Path, folder: str | Path, *, progress: Callable[[str], None] | None = None,
                    shard_bytes: int = DEFAULT_SHARD_BYTES) -> DequantizedInfo:
    """Writes the dequantized checkpoint of ``src`` into the existing empty ``folder``: output shards of at most
    ``shard_bytes`` (each header computed up front from :func:`plan_dequantization`, then one tensor at a time
    read, dequantized and written: the host holds about one weight, never a shard); config without
    ``quantization_config``, every other file copied."""
    from rkedge.lora._tensors import safetensors_header, write_tensor

    src, staging = Path(src), Path(folder)
    source = quantization_of(src)
    if source is None or not source.dequantizable:
        what = source.describe() if source else "not quantized"
        raise InputError(f"{src} is not a bitsandbytes 4-bit or 8-bit checkpoint ({what}).",
                         fix="pass a checkpoint saved by transformers with a BitsAndBytesConfig")
    started = time.monotonic()
    say = progress or (lambda line: None)
    config = _config(src)
    tensors = _Tensors(src)
    try:
        if not quantized_weights(tensors.where):
            raise InputError(f"{src} says it is {source.describe()} but holds no quantized weights.",
                             fix="check the checkpoint; a model saved after dequantize() has no quantization_config")
        # stored order: shard by shard, as the source's index lists them
        stored = {key: tensors.where[key] for file in tensors.files for key in tensors.keys_of(file)}
        planned = plan_dequantization(stored, source, config, tensors.reader)
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in planned:
            if shards[-1] and size + tensor.nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.nbytes
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        counts = {"dequantized": 0, "copied": 0, "bytes": 0}
        source_file = ""
        for name, shard in zip(names, shards, strict=True):
            with open(staging / name, "wb") as out:
                out.write(safetensors_header([(t.name, t.code, t.shape) for t in shard], {"format": "pt"}))
                for tensor in shard:
                    if tensor.stored.file.name != source_file:
                        source_file = tensor.stored.file.name
                        say(f"dequantizing shard {tensors.files.index(source_file) + 1}/{len(tensors.files)}: "
                            f"{source_file} -> {name}")
                    written = _write_one(tensors, tensor, source, config, out, write_tensor)
                    if written != tensor.nbytes:  # the header promised another size: the file would be corrupt
                        raise InputError(f"{tensor.name}: dequantized to {written} bytes, its plan said "
                                         f"{tensor.nbytes}.", fix="report this checkpoint to rkedge")
                    counts["copied" if tensor.kind == "copy" else "dequantized"] += 1
            counts["bytes"] += (staging / name).stat().st_size
        weight_map = {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard}
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.nbytes for t in planned)},
             "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        from rkedge.lora._tensors import TORCH_DTYPE_NAMES

        written_dtypes = {TORCH_DTYPE_NAMES[t.code] for t in planned if t.kind != "copy"}
        dtype = sorted(written_dtypes)[0] if len(written_dtypes) == 1 else (_model_dtype(config) or "float16")
        plain = {k: v for k, v in config.items() if k != "quantization_config"}
        plain["dtype"] = dtype
        plain.pop("torch_dtype", None)
        plain["rkedge_source_quantization"] = source.to_dict()
        (staging / "config.json").write_text(json.dumps(plain, indent=2) + "\n", encoding="utf-8")
        for other in _other_files(src):
            shutil.copy2(other, staging / other.name)
    finally:
        tensors.reader.close()
    return DequantizedInfo(source, staging, dtype, counts["dequantized"], counts["copied"], counts["bytes"],
                           time.monotonic() - started, names)


def _write_one(tensors: _Tensors, tensor: PlannedTensor, source: SourceQuantization, config: dict[str, Any],
               out: BinaryIO, write_tensor: Callable[[BinaryIO, torch.Tensor], int]) -> int:
    """Writes one planned tensor: a copy as its stored bytes, a quantized weight dequantized."""
    if tensor.kind == "copy":
        return tensors.reader.copy_to(tensor.stored, out)
    name = tensor.name
    if tensor.kind == "4bit":
        parts = {s: tensors.get(name + s) for s in FOUR_BIT_PARTS if name + s in tensors.where}
        value = dequantize_4bit(tensors.get(name), parts)
    else:
        int8_dtype = _torch_dtype(source.compute_dtype or _model_dtype(config) or "float16")
        value = dequantize_int8(tensors.get(name), tensors.get(name[: -len("weight")] + "SCB"), int8_dtype)
    return write_tensor(out, value)


def _other_files(src: Path) -> Iterator[Path]:
    """Tokenizer, generation config, chat template, card...: everything but the weights and the config."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (
                "config.json", "model.safetensors.index.json"):
            yield path


def base_model_name(checkpoint_dir: str | Path) -> str | None:
    """The model a quantized upload was made from: its card's ``base_model`` (Hugging Face front matter), else the
    config's ``_name_or_path`` when that names a repository rather than a local folder."""
    card = Path(checkpoint_dir) / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
            lines = front.splitlines()
            for number, line in enumerate(lines):
                if line.startswith("base_model:"):
                    value = line.split(":", 1)[1].strip().strip("'\"")
                    if not value and number + 1 < len(lines):  # a YAML list: "base_model:\n- org/name"
                        value = lines[number + 1].strip().lstrip("-").strip().strip("'\"")
                    if value:
                        return value
    name = _config(checkpoint_dir).get("_name_or_path")
    if isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/")):
        return name
    return None
