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
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkedge.errors import InputError

if TYPE_CHECKING:
    import torch

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
    config = _config(checkpoint_dir)
    q = config.get("quantization_config")
    if not isinstance(q, dict) or not q:
        return None
    method = str(q.get("quant_method") or "unknown")
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


def dequantize_4bit(packed: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """One 4-bit weight from its stored parts (keys: the suffixes in FOUR_BIT_PARTS)."""
    import math

    import torch

    state_key = next(k for k in parts if k.startswith(QUANT_STATE))
    state = json.loads(bytes(parts[state_key].to(torch.uint8).tolist()).decode("utf-8"))
    shape, blocksize = [int(s) for s in state["shape"]], int(state["blocksize"])
    absmax = parts[".absmax"]
    if ".nested_absmax" in parts:  # double quantization: the block scales are 8-bit themselves
        absmax = blockwise_dequantize(absmax, parts[".nested_quant_map"].float(), parts[".nested_absmax"].float(),
                                      int(state.get("nested_blocksize", 256)))
        absmax = absmax + float(state.get("nested_offset", 0.0))
    raw = packed.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    codes = torch.empty(raw.numel() * 2, dtype=torch.int32)
    codes[0::2], codes[1::2] = raw >> 4, raw & 0xF
    n = math.prod(shape)
    values = blockwise_dequantize(codes[:n], parts[".quant_map"].float(), absmax.float(), blocksize)
    return values.reshape(shape).to(_torch_dtype(str(state["dtype"])))


def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One LLM.int8 weight: each row times its absmax / 127 (bitsandbytes' int8_vectorwise_dequant), in ``dtype``."""
    return (weight * scb.float().view(-1, 1) * 7.874015718698502e-3).to(dtype)


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


def dequantize_checkpoint(src: str | Path, dst: str | Path, *, progress: Callable[[str], None] | None = None,
                          shard_bytes: int = DEFAULT_SHARD_BYTES) -> DequantizedInfo:
    """A plain safetensors checkpoint in ``dst`` from the bitsandbytes checkpoint ``src``, one input shard at a
    time (the host holds at most one output shard, ``shard_bytes``); config without ``quantization_config``,
    every other file copied. Written atomically (``dst`` appears only when complete)."""
    from safetensors.torch import save_file

    from rkedge._fs import atomic_dir

    src, dst = Path(src), Path(dst)
    source = quantization_of(src)
    if source is None or not source.dequantizable:
        what = source.describe() if source else "not quantized"
        raise InputError(f"{src} is not a bitsandbytes 4-bit or 8-bit checkpoint ({what}).",
                         fix="pass a checkpoint saved by transformers with a BitsAndBytesConfig")
    started = time.monotonic()
    say = progress or (lambda line: None)
    config = _config(src)
    tensors = _Tensors(src)
    files = tensors.files
    kinds, companions = _plan(set(tensors.where))
    if not kinds:
        raise InputError(f"{src} says it is {source.describe()} but holds no quantized weights.",
                         fix="check the checkpoint; a model saved after dequantize() has no quantization_config")
    int8_dtype = _torch_dtype(source.compute_dtype or _model_dtype(config) or "float16")
    written_dtypes: set[str] = set()
    counts = {"dequantized": 0, "copied": 0, "bytes": 0}
    weight_map: dict[str, str] = {}
    out_names: list[str] = []
    with atomic_dir(dst) as staging:
        pending: dict[str, Any] = {}
        pending_bytes = 0

        def flush() -> None:
            nonlocal pending, pending_bytes
            if not pending:
                return
            name = f"model-{len(out_names) + 1:05d}.safetensors"
            save_file(pending, str(staging / name), metadata={"format": "pt"})
            out_names.append(name)
            weight_map.update({k: name for k in pending})
            counts["bytes"] += (staging / name).stat().st_size
            pending, pending_bytes = {}, 0

        for number, file in enumerate(files, 1):
            say(f"dequantizing shard {number}/{len(files)}: {file}")
            for key in tensors.keys_of(file):
                if key in companions:
                    continue
                if kinds.get(key) == "4bit":
                    parts = {s: tensors.get(key + s) for s in FOUR_BIT_PARTS if key + s in tensors.where}
                    tensor = dequantize_4bit(tensors.get(key), parts)
                    counts["dequantized"] += 1
                elif kinds.get(key) == "int8":
                    tensor = dequantize_int8(tensors.get(key), tensors.get(key[: -len("weight")] + "SCB"), int8_dtype)
                    counts["dequantized"] += 1
                else:
                    tensor = tensors.get(key)
                    counts["copied"] += 1
                if key in kinds:
                    written_dtypes.add(str(tensor.dtype).removeprefix("torch."))
                nbytes = tensor.numel() * tensor.element_size()
                if pending and pending_bytes + nbytes > shard_bytes:
                    flush()
                pending[key] = tensor.contiguous()
                pending_bytes += nbytes
        flush()
        total = len(out_names)
        renamed = {}
        for i, name in enumerate(out_names, 1):  # the usual model-0000i-of-0000n names, now that n is known
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            (staging / name).rename(staging / final)
            renamed[name] = final
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": counts["bytes"]}, "weight_map": {k: renamed[v] for k, v in
                                                                         sorted(weight_map.items())}}, indent=2))
        dtype = sorted(written_dtypes)[0] if len(written_dtypes) == 1 else (_model_dtype(config) or "float16")
        plain = {k: v for k, v in config.items() if k != "quantization_config"}
        plain["dtype"] = dtype
        plain.pop("torch_dtype", None)
        plain["rkedge_source_quantization"] = source.to_dict()
        (staging / "config.json").write_text(json.dumps(plain, indent=2) + "\n", encoding="utf-8")
        for other in _other_files(src):
            shutil.copy2(other, staging / other.name)
    tensors.reader.close()
    return DequantizedInfo(source, dst, dtype, counts["dequantized"], counts["copied"], counts["bytes"],
                           time.monotonic() - started, [renamed[n] for n in out_names])


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
