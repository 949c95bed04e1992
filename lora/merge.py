"""Streaming LoRA merge: base checkpoint + PEFT LoRA adapter -> one merged Hugging Face checkpoint.

The base is processed one tensor at a time, shard by shard: each tensor is read by its byte range, gets
its delta (or its replacement from the adapter) and is written straight into the output shard, whose
header is computed up front. Peak memory is a few copies of the largest single tensor plus interpreter
and torch, whatever the size of the model; peft's ``merge_and_unload`` holds the whole model.

What is merged, exactly as peft 0.21 does it (``tuners/lora/layer.py``):

- Linear: ``W + transpose(B @ A, fan_in_fan_out) * scaling``; fan_in_fan_out is decided by the module type
  (``Conv1D`` in GPT-2-style models: True; ``nn.Linear``: False), as peft's ``dispatch_default`` does.
- Embedding: ``W + (B @ A).T * scaling`` with A = ``lora_embedding_A`` [r, num_embeddings] and
  B = ``lora_embedding_B`` [embedding_dim, r].
- scaling = alpha / r, or alpha / sqrt(r) with rsLoRA; r and alpha per module from ``rank_pattern`` /
  ``alpha_pattern`` with peft's own pattern matching.
- ``lora_bias=True``: ``b + lora_B.bias * scaling``.
- Full tensors in the adapter (``modules_to_save``, biases trained with ``bias="all"``/``"lora_only"``, base
  weights of LoRA'd embeddings) replace the base tensor, as loading the adapter with peft does.

Every delta is computed in float32 and the result is cast once to the output dtype. Tolerance against
``peft``'s ``merge_and_unload()`` on the same inputs, per element: ``|ours - peft| <= 1e-5 + eps * |peft|``,
where eps is the relative precision of the least precise output or adapter dtype involved (float32 2^-23,
float16 2^-10, bfloat16 2^-7: one rounding of that dtype). Both sides do the same float32 arithmetic, so
the differences seen in the tests are zero or one rounding of the output dtype.

Tied embeddings: when the base ties ``lm_head`` to the input embedding and the adapter changes only one of
them (or both, differently), the merged checkpoint unties them: it writes both tensors and sets
``tie_word_embeddings: false``, so it computes what the adapter computed before merging. peft's
``merge_and_unload`` writes such a change into the shared tensor and changes the other side as well.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from rkedge import __version__
from rkedge._fs import atomic_dir, atomic_path, atomic_write_text, check_free_space
from rkedge.convert.findings import raise_on_errors
from rkedge.convert.inspect import TOKENIZER_FILES as CHECKPOINT_TOKENIZER_FILES
from rkedge.convert.safetensors_index import DTYPE_CODES, TensorInfo, read_header
from rkedge.errors import InputError, RkedgeError
from rkedge.lora._tensors import (
    EPSILON,
    FLOAT_CODES,
    TensorReader,
    nbytes,
    safetensors_header,
    torch_dtype,
    write_tensor,
)
from rkedge.lora.adapter import (
    MERGE_FIX,
    AdapterInfo,
    BaseCheckpoint,
    LoraModule,
    SavedTensor,
    check_adapter,
    inspect_adapter,
    read_base_checkpoint,
    short_list,
)

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int, str], None]

#: Absolute part of the stated tolerance (see the module docstring).
ATOL = 1e-5
REPORT_NAME = "rkedge_merge.json"
INDEX_NAME = "model.safetensors.index.json"
#: Files of the base that are weights (written by the merge) or not to be carried over.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5",
                        ".rkllm", ".partial")
_NOT_COPIED_NAMES = frozenset({"config.json", INDEX_NAME, "pytorch_model.bin.index.json", REPORT_NAME})
#: Tokenizer and chat-template files an adapter folder may carry from its fine-tune; they win over the base's.
TOKENIZER_FILES = frozenset(CHECKPOINT_TOKENIZER_FILES) - {"generation_config.json"}


@dataclass(frozen=True)
class MergeReport:
    """What ``merge_lora`` did; written as ``rkedge_merge.json`` into the merged folder."""

    base_dir: str
    adapter_dir: str
    out_dir: str
    adapter_weights_sha256: str
    adapter: dict[str, Any]  # the variant settings that decide the arithmetic
    dtype: str  # output dtype ("float16", ...) or "base" (every tensor keeps its dtype)
    modules_merged: tuple[dict[str, Any], ...]
    tensors_replaced: tuple[dict[str, Any], ...]
    tied_embeddings: dict[str, Any]
    tolerance: dict[str, Any]
    files: tuple[str, ...]  # weight shards written
    copied_files: dict[str, str]  # file -> "base" | "adapter"
    findings: tuple[dict[str, Any], ...]
    tensors_written: int
    bytes_written: int
    peak_rss_bytes: int  # ru_maxrss of this process when the merge finished (includes anything before it)
    seconds: float
    rkedge_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_dir": self.base_dir, "adapter_dir": self.adapter_dir, "out_dir": self.out_dir,
            "adapter_weights_sha256": self.adapter_weights_sha256, "adapter": self.adapter, "dtype": self.dtype,
            "modules_merged": list(self.modules_merged), "tensors_replaced": list(self.tensors_replaced),
            "tied_embeddings": self.tied_embeddings, "tolerance": self.tolerance, "files": list(self.files),
            "copied_files": self.copied_files, "findings": list(self.findings),
            "tensors_written": self.tensors_written, "bytes_written": self.bytes_written,
            "peak_rss_bytes": self.peak_rss_bytes, "seconds": self.seconds, "rkedge_version": self.rkedge_version,
        }


@dataclass
class _Item:
    """One output tensor and how to produce it."""

    name: str
    source: TensorInfo  # base tensor the value starts from
    out_dtype: str  # safetensors dtype code
    replace: TensorInfo | None = None  # adapter tensor that replaces the base value
    lora: LoraModule | None = None
    lora_tensors: tuple[TensorInfo, TensorInfo] | None = None  # (A, B) in the adapter file
    transpose: bool = False  # Conv1D: the delta is transposed (fan_in_fan_out)
    lora_bias: LoraModule | None = None
    bias_tensor: TensorInfo | None = None  # lora_B.bias in the adapter file

    @property
    def nbytes(self) -> int:
        return nbytes(self.out_dtype, self.source.shape)

    @property
    def raw(self) -> bool:
        """Unchanged bytes: copied without going through torch."""
        return (self.replace is None and self.lora is None and self.lora_bias is None
                and self.out_dtype == self.source.dtype)


@dataclass
class _Plan:
    shards: list[tuple[str, list[_Item]]]
    tied: dict[str, Any]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``; Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def merge_lora(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
               progress: Progress | None = None, allow_base_mismatch: bool = False) -> MergeReport:
    """Merges a PEFT LoRA adapter into a base checkpoint, streaming, and writes a new checkpoint folder.

    The output has the base's shard layout (plus ``model.safetensors.index.json`` when the base has one),
    ``config.json`` without ``quantization_config`` (and with the new dtype), the base's tokenizer,
    generation and chat-template files (the adapter's own tokenizer files win), and ``rkedge_merge.json``.
    It is built in ``<out>.partial-<pid>`` and renamed at the end: a failure leaves no folder at ``out``.

    Tolerance against peft's ``merge_and_unload()``: per element ``|ours - peft| <= 1e-5 + eps * |peft|``
    with eps one rounding of the least precise output/adapter dtype (float32 2^-23, float16 2^-10,
    bfloat16 2^-7); all deltas are computed in float32.

    Args:
        base_dir: Hugging Face checkpoint folder (config.json + safetensors).
        adapter_dir: peft adapter folder (adapter_config.json + adapter_model.safetensors).
        out_dir: folder to create; must not exist (or be empty).
        dtype: None keeps each tensor's dtype; "float16", "bfloat16" or "float32" converts every floating tensor.
        progress: called as ``progress(bytes_done, bytes_total, tensor_name)`` after each tensor.

    Raises:
        CheckFailed: the adapter does not fit the base or cannot be merged exactly (DoRA, other methods, ...).
        InputError: bad paths or dtype.
        RkedgeError: the merge itself failed (disk full, ...).
    """
    started = time.monotonic()
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if dtype is not None and dtype not in DTYPE_CODES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_CODES)}.",
                         fix="pass --dtype float16, bfloat16 or float32, or leave it out to keep the base's dtypes")
    out_code = DTYPE_CODES[dtype] if dtype else None
    adapter = inspect_adapter(adapter_dir)
    base = read_base_checkpoint(base_dir)
    findings = check_adapter(adapter, base, allow_base_mismatch=allow_base_mismatch)
    raise_on_errors(findings, "the LoRA merge", fix=MERGE_FIX)
    _check_out_dir(out_dir, base_dir, adapter_dir)
    try:
        import torch
    except ImportError as exc:
        raise RkedgeError("merging a LoRA needs torch.", fix="pip install 'rkedge[convert]'") from exc

    plan = _plan(adapter, base, out_code)
    total = sum(item.nbytes for _, items in plan.shards for item in items)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # the tensors plus the headers, index and config (64 MB covers them for any real checkpoint)
    check_free_space(out_dir.parent, total + (64 << 20), what="the merged checkpoint")

    done = 0
    written_files: list[str] = []
    try:
        with atomic_dir(out_dir) as partial, TensorReader() as base_reader, TensorReader() as adapter_reader:
            def emit(item: _Item, out: BinaryIO) -> int:
                if item.raw:
                    return base_reader.copy_to(item.source, out)
                return write_tensor(out, _value(item, base_reader, adapter_reader, torch))

            def tensor_done(item: _Item) -> None:
                nonlocal done
                done += item.nbytes
                if progress is not None:
                    progress(done, total, item.name)

            for file_name, items in plan.shards:
                source_file = next((i.source.file for i in items if i.source.file.name == file_name), None)
                metadata = {"format": "pt", **(read_header(source_file)[1] if source_file else {})}
                write_shard(partial / file_name, items, emit, metadata, tensor_done)
                written_files.append(file_name)
                base_reader.close()  # one shard's handle at a time

            items_all = [item for _, items in plan.shards for item in items]
            if base.index is not None:
                _write_index(partial / INDEX_NAME, base, plan)
            atomic_write_text(partial / "config.json",
                              json.dumps(merged_config(base.config, dtype=dtype, untie=plan.tied["untied"]), indent=2)
                              + "\n")
            copied = _copy_side_files(base_dir, adapter_dir, partial)
            report = _report(adapter, base, plan, out_dir, dtype, findings, written_files, copied, items_all, started)
            atomic_write_text(partial / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    except OSError as exc:  # disk full, permissions, a vanished input: one error family at the edge
        raise RkedgeError(f"writing the merged checkpoint failed: {exc}; nothing was left at {out_dir}.",
                          fix="check free space and permissions of the --out folder, then run the merge again") from exc
    return report


def write_shard(target: Path, items: Sequence[_Item], emit: Callable[[_Item, BinaryIO], int],
                metadata: dict[str, str], tensor_done: Callable[[_Item], None]) -> int:
    """Writes one output shard: the header computed from ``items``, then each tensor in order (atomically)."""
    header = safetensors_header([(i.name, i.out_dtype, i.source.shape) for i in items], metadata)
    written = len(header)
    with atomic_path(target) as part, open(part, "wb") as out:
        out.write(header)
        for item in items:
            count = emit(item, out)
            if count != item.nbytes:
                raise RkedgeError(f"internal error: {item.name} produced {count} bytes, the header says {item.nbytes}.")
            written += count
            tensor_done(item)
    return written


def _check_out_dir(out_dir: Path, base_dir: Path, adapter_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} already exists; the merge does not overwrite.",
                         fix="choose another --out, or delete that folder first")
    for other in (base_dir, adapter_dir):
        if out_dir.resolve() == other.resolve():
            raise InputError(f"--out {out_dir} is the same folder as an input.", fix="choose a new folder for --out")


def _plan(adapter: AdapterInfo, base: BaseCheckpoint, out_code: str | None) -> _Plan:
    """Decides, for every output tensor, where its value comes from (nothing is read here)."""
    adapter_tensors, _ = read_header(adapter.weights_file)
    by_weight = {m.weight_name: m for m in adapter.modules}
    by_bias = {f"{m.name}.bias": m for m in adapter.modules if m.bias_key}
    # a module's own saved copy wins over a saved base_layer weight (peft never writes both for one module)
    saved: dict[str, SavedTensor] = {}
    for s in sorted(adapter.saved, key=lambda s: s.origin == "base_layer", reverse=True):
        saved[s.target] = s

    def out_dtype(info: TensorInfo) -> str:
        return out_code if out_code and info.dtype in FLOAT_CODES else info.dtype

    def item(name: str, source: TensorInfo, replace: SavedTensor | None) -> _Item:
        lora, lora_bias = by_weight.get(name), by_bias.get(name)
        return _Item(name=name, source=source, out_dtype=out_dtype(source),
                     replace=adapter_tensors[replace.key] if replace else None, lora=lora,
                     lora_tensors=(adapter_tensors[lora.a_key], adapter_tensors[lora.b_key]) if lora else None,
                     transpose=bool(lora and lora.kind == "linear" and base.is_conv1d(lora.name)),
                     lora_bias=lora_bias,
                     bias_tensor=adapter_tensors[lora_bias.bias_key] if lora_bias and lora_bias.bias_key else None)

    tied: dict[str, Any] = {"base_tied": base.tied, "untied": False, "reason": "the base does not tie embeddings"}
    overrides: dict[str, _Item] = {}
    extra_head: _Item | None = None
    if base.tied and base.embed_key:
        embed, head = base.embed_key, base.head_key
        source = base.tensors[embed]
        shared = next((saved[n] for n in (embed, head) if n in saved and saved[n].origin == "base_layer"), None)
        own = {n: saved[n] for n in (embed, head) if n in saved and saved[n].origin != "base_layer"}
        embed_item = item(embed, source, own.get(embed, shared))
        head_item = item(head, source, own.get(head, shared))
        embed_changed = embed_item.lora is not None or embed in own
        head_changed = head_item.lora is not None or head in own
        overrides[embed] = embed_item
        if not embed_changed and not head_changed:
            tied["reason"] = "the adapter changes neither embedding; the output stays tied"
        elif embed_changed and head_changed and _identical_pair(embed_item, head_item):
            tied["reason"] = "the adapter changes both embeddings identically; the output stays tied"
        else:
            tied["untied"] = True
            changed = [n for n, hit in ((embed, embed_changed), (head, head_changed)) if hit]
            tied["reason"] = (f"the adapter changes {' and '.join(changed)}"
                              f"{' differently' if len(changed) == 2 else ' only'}; both tensors are written and "
                              "tie_word_embeddings is false, so the merged model computes what the unmerged adapter "
                              "did (peft's merge_and_unload would change the shared tensor for both)")
            if head in base.tensors:
                overrides[head] = head_item
            else:
                extra_head = head_item

    shards: list[tuple[str, list[_Item]]] = []
    for file in base.files:
        names = sorted((n for n, info in base.tensors.items() if info.file == file),
                       key=lambda n: base.tensors[n].offsets[0])
        shards.append((file.name, [overrides.get(n) or item(n, base.tensors[n], saved.get(n)) for n in names]))
    if extra_head is not None:
        shards[-1][1].append(extra_head)
    return _Plan(shards=shards, tied=tied)


def _identical_pair(embed: _Item, head: _Item) -> bool:
    """Whether a tied pair stays identical after the merge, decided from the adapter alone."""
    import torch

    with TensorReader() as reader:
        if embed.lora is None and head.lora is None and embed.replace and head.replace:
            return bool(torch.equal(reader.read(embed.replace), reader.read(head.replace)))
        if embed.lora and head.lora and embed.replace == head.replace and embed.lora.kind == "embedding" \
                and head.lora.kind == "linear" and embed.lora.scaling == head.lora.scaling:
            # peft's ensure_weight_tying: lm_head's A is the embedding's B transposed and vice versa
            assert embed.lora_tensors is not None and head.lora_tensors is not None
            e_a, e_b = (reader.read(info) for info in embed.lora_tensors)
            h_a, h_b = (reader.read(info) for info in head.lora_tensors)
            return bool(torch.equal(h_a, e_b.T) and torch.equal(h_b, e_a.T))
    return False


def _value(item: _Item, base_reader: TensorReader, adapter_reader: TensorReader, torch: Any) -> torch.Tensor:
    """The output tensor: base (or adapter replacement) + delta, computed in float32, cast once."""
    # in-place arithmetic on buffers this function owns keeps the peak at two copies of the tensor; the
    # operations and their order are peft's: delta = transpose(B @ A, fan_in_fan_out) * scaling; W += delta
    value = adapter_reader.read(item.replace) if item.replace is not None else base_reader.read(item.source)
    if item.lora is not None or item.lora_bias is not None:
        value = value.to(torch.float32)  # a fresh buffer already when it was read as float32
        if item.lora is not None:
            assert item.lora_tensors is not None
            a = adapter_reader.read(item.lora_tensors[0]).to(torch.float32)
            b = adapter_reader.read(item.lora_tensors[1]).to(torch.float32)
            delta = (b @ a).mul_(item.lora.scaling)
            del a, b
            value.add_(delta.T if item.lora.kind == "embedding" or item.transpose else delta)
            del delta
        if item.lora_bias is not None:
            assert item.bias_tensor is not None
            value.add_(adapter_reader.read(item.bias_tensor).to(torch.float32).mul_(item.lora_bias.scaling))
    return value.to(torch_dtype(item.out_dtype))


def merged_config(config: dict[str, Any], *, dtype: str | None, untie: bool) -> dict[str, Any]:
    """The merged model's config.json: no ``quantization_config``, the new dtype, untied embeddings if needed."""
    merged: dict[str, Any] = json.loads(json.dumps(config))
    merged.pop("quantization_config", None)
    if dtype is not None:
        keys = [k for k in ("torch_dtype", "dtype") if k in merged] or ["torch_dtype"]
        for key in keys:
            merged[key] = dtype
    if untie:
        merged["tie_word_embeddings"] = False
        text = merged.get("text_config")
        if isinstance(text, dict) and "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = False
    return merged


def _write_index(target: Path, base: BaseCheckpoint, plan: _Plan) -> None:
    weight_map = {item.name: file_name for file_name, items in plan.shards for item in items}
    metadata = dict((base.index or {}).get("metadata") or {})
    metadata["total_size"] = sum(item.nbytes for _, items in plan.shards for item in items)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(item.source.numel for _, items in plan.shards for item in items)
    atomic_write_text(target, json.dumps({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))},
                                         indent=2) + "\n")


def _copy_side_files(base_dir: Path, adapter_dir: Path, out: Path) -> dict[str, str]:
    """Tokenizer, generation config, chat template, licence... from the base; the adapter's tokenizer files win."""
    copied: dict[str, str] = {}
    sources = [(path, "base") for path in sorted(base_dir.iterdir())
               if path.is_file() and not path.name.startswith(".") and path.name not in _NOT_COPIED_NAMES
               and not path.name.endswith(_NOT_COPIED_SUFFIXES)]
    sources += [(adapter_dir / name, "adapter") for name in sorted(TOKENIZER_FILES) if (adapter_dir / name).is_file()]
    for path, origin in sources:
        with atomic_path(out / path.name) as part:
            shutil.copyfile(path, part)
        copied[path.name] = origin
    return copied


def _report(adapter: AdapterInfo, base: BaseCheckpoint, plan: _Plan, out_dir: Path, dtype: str | None,
            findings: Sequence[Any], files: list[str], copied: dict[str, str], items: list[_Item],
            started: float) -> MergeReport:
    merged = [
        {"tensor": i.name, "module": i.lora.name, "kind": "conv1d" if i.transpose else i.lora.kind,
         "rank": i.lora.rank, "alpha": i.lora.alpha, "scaling": i.lora.scaling}
        for i in items if i.lora is not None
    ] + [{"tensor": i.name, "module": i.lora_bias.name, "kind": "lora_bias", "rank": i.lora_bias.rank,
          "alpha": i.lora_bias.alpha, "scaling": i.lora_bias.scaling} for i in items if i.lora_bias is not None]
    replaced = [{"tensor": i.name, "from": i.replace.name} for i in items if i.replace is not None]
    precisions = {i.out_dtype for i in items if i.lora or i.lora_bias or i.replace} | {
        d for m in adapter.modules for d in m.dtype.split("/")}
    eps = max((EPSILON[d] for d in precisions if d in EPSILON), default=EPSILON["F32"])
    tolerance = {
        "reference": "peft merge_and_unload() of the same base and adapter (for an untied pair of tied embeddings: "
                     "the unmerged peft model's forward pass)",
        "compute_dtype": "float32", "atol": ATOL, "rtol": eps,
        "rule": "per element |ours - peft| <= atol + rtol * |peft|; rtol is one rounding of the least precise "
                "output/adapter dtype involved",
    }
    settings = {
        "peft_type": adapter.peft_type, "peft_version": adapter.config.get("peft_version"),
        "base_model_name_or_path": adapter.base_model_name_or_path, "revision": adapter.revision,
        "r": adapter.r, "lora_alpha": adapter.lora_alpha, "use_rslora": adapter.use_rslora,
        "rank_pattern": adapter.rank_pattern, "alpha_pattern": adapter.alpha_pattern, "bias": adapter.bias,
        "lora_bias": adapter.lora_bias, "fan_in_fan_out_config": adapter.fan_in_fan_out,
        "fan_in_fan_out_effective": any(i.transpose for i in items), "modules_to_save": adapter.modules_to_save,
        "target_modules": adapter.target_modules, "init_lora_weights": adapter.init_lora_weights,
        "embedding_loras": [m.name for m in adapter.embedding_loras],
    }
    return MergeReport(
        base_dir=str(base.path.resolve()), adapter_dir=str(adapter.path.resolve()), out_dir=str(out_dir.resolve()),
        adapter_weights_sha256=adapter.weights_sha256, adapter=settings, dtype=dtype or "base",
        modules_merged=tuple(merged), tensors_replaced=tuple(replaced), tied_embeddings=plan.tied,
        tolerance=tolerance, files=tuple(files), copied_files=copied,
        findings=tuple(f.to_dict() for f in findings), tensors_written=len(items),
        bytes_written=sum(i.nbytes for i in items), peak_rss_bytes=peak_rss_bytes(),
        seconds=round(time.monotonic() - started, 3))


def smoke_forward(model_dir: str | Path, *, tokens: int = 8, layers: int = 2) -> dict[str, Any]:
    """Verifies a checkpoint without loading it whole: every header, every tensor finite (one tensor in memory at
    a time), every weight the model declares present with its shape (the model built on the meta device, which
    allocates nothing), then a forward pass with a loss through the first ``layers`` layers (the embedding, those
    layers, the final norm and the head: a fraction of the model).

    The check from F-9 (the maintainer's own check for merged checkpoints): no missing or mismatched weights,
    finite logits; made streaming so a 9B merge is checked within the memory of its largest tensors.

    Raises:
        RkedgeError: a weight is missing, mis-shaped or not finite, or the forward pass fails or is not finite.
    """
    started = time.monotonic()
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise RkedgeError("the smoke forward pass needs torch and transformers.",
                          fix="pip install 'rkedge[convert]', or skip it with --no-smoke") from exc
    from rkedge.convert.safetensors_index import read_checkpoint

    model_dir = Path(model_dir)
    tensors = read_checkpoint(model_dir)
    bug = "the merge or the adapter produced a broken checkpoint; check the adapter with peft (report it if peft " \
          "merges it fine)"
    with TensorReader() as reader:
        for info in tensors.values():
            value = reader.read(info)
            if value.is_floating_point() and not _all_finite(value):
                raise RkedgeError(f"{model_dir}: tensor {info.name} holds non-finite values (inf/NaN).", fix=bug)
            del value
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many types; all mean "cannot build this model"
        raise RkedgeError(f"transformers cannot build the model of {model_dir}: {exc}",
                          fix="see the message above; the merged checkpoint is not usable as it is") from exc
    expected = dict(skeleton.named_parameters())  # tied weights appear once, under the name that is saved
    missing = sorted(name for name in expected if name not in tensors)
    mismatched = sorted(name for name, param in expected.items()
                        if name in tensors and tuple(param.shape) != tensors[name].shape)
    if missing or mismatched:
        raise RkedgeError(f"{model_dir} lacks or mis-shapes weights ({short_list(missing + mismatched)}); "
                          "transformers would initialise them randomly.", fix="report this as an rkedge bug")
    small, kept = _first_layers(config, layers)
    dtype = next((t.dtype for t in tensors.values() if t.dtype in FLOAT_CODES), "F32")

    from rkedge.convert.layer_stream import load_layer_streamed

    # the first layers, their weights read as they run, the embedding rows and the head streamed (no table held)
    model = load_layer_streamed(model_dir, torch_dtype(dtype), config=small)
    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.tensor([[(1 + 7 * i) % vocab for i in range(tokens)]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    finite = bool(torch.isfinite(out.logits).all())
    loss = float(out.loss)
    if not finite or not math.isfinite(loss):
        raise RkedgeError(f"the forward pass of {model_dir} gives non-finite logits or loss (loss {loss}).",
                          fix="the merge or the adapter produced inf/NaN weights; check the adapter with peft")
    return {"ok": True, "loss": loss, "logits_finite": True, "tokens": tokens, "layers_run": kept,
            "tensors_checked": len(tensors),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "seconds": round(time.monotonic() - started, 3)}


def _all_finite(value: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """``isfinite(value).all()`` in slices, so a 256k-vocabulary table needs no boolean copy of itself."""
    import torch

    flat = value.reshape(-1)
    return all(bool(torch.isfinite(flat[start:start + chunk]).all()) for start in range(0, flat.numel(), chunk))


def smoke_forward_in_child(model_dir: str | Path, *, layers: int = 2) -> dict[str, Any]:
    """:func:`smoke_forward` in a child process, so the layers, embedding and head it held are returned to the
    system before the next heavy step (the toolkit) starts, whatever the allocator keeps. Same result, same
    errors (the child's RkedgeError comes back as one)."""
    import subprocess

    code = ("import json, sys\n"
            "from rkedge.errors import RkedgeError\n"
            "from rkedge.lora.merge import smoke_forward\n"
            "try:\n"
            "    print(json.dumps({'result': smoke_forward(sys.argv[1], layers=int(sys.argv[2]))}))\n"
            "except RkedgeError as exc:\n"
            "    print(json.dumps({'error': exc.message, 'fix': exc.fix}))\n")
    done = subprocess.run([sys.executable, "-c", code, str(model_dir), str(layers)], capture_output=True, text=True,
                          check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    answer: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if "result" in answer:
        result: dict[str, Any] = answer["result"]
        return result
    if "error" in answer:
        raise RkedgeError(answer["error"], fix=answer.get("fix"))
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    raise RkedgeError(f"the smoke check of {model_dir} failed (exit {done.returncode}: {tail}).",
                      fix="see the message above; the merged checkpoint is not usable as it is")


def _first_layers(config: Any, layers: int) -> tuple[Any, int]:
    """A copy of ``config`` (or of its text config's owner) with only the first ``layers`` layers: per-layer lists
    (layer_types, block_types...) cut to match, so the smaller model keeps the first layers' kinds."""
    import copy

    small = copy.deepcopy(config)
    text = getattr(small, "text_config", None) or small
    total = int(getattr(text, "num_hidden_layers", 0) or 0)
    kept = min(layers, total) if total else 0
    if kept:
        for key, value in list(vars(text).items()):
            if isinstance(value, list) and len(value) == total and key != "architectures":
                setattr(text, key, value[:kept])
        text.num_hidden_layers = kept
    return small, kept
