"""Inspection without loading weights: checkpoints, GGUF files, adapters and ``.rkllm`` files.

Everything here reads JSON files and safetensors/GGUF headers only, so it runs on any machine in
milliseconds whatever the model's size, and ``rkedge inspect`` needs no torch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rkedge.convert.safetensors_index import TensorInfo, checkpoint_files, read_checkpoint
from rkedge.errors import InputError
from rkedge.modelfile import is_simulated_file, sniff_rkllm

#: A checkpoint's tokenizer, chat-template and generation files (export copies them beside the weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


@dataclass
class CheckpointInfo:
    """A Hugging Face checkpoint folder, as far as its files tell without loading weights."""

    path: Path
    config: dict[str, Any]
    text_config: dict[str, Any]  # the language model's config (nested text_config, else the top level)
    architecture: str | None
    model_type: str | None
    tensors: dict[str, TensorInfo]
    tokenizer_files: list[str]
    chat_template: str | None
    tokenizer_config: dict[str, Any]
    quantization_config: dict[str, Any] | None
    source_name: str | None  # _name_or_path or the HF repo id
    source_revision: str | None  # the snapshot commit when the folder sits in a HF cache
    weight_files: list[Path] = field(default_factory=list)

    @property
    def param_count(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        return dict(Counter(t.dtype for t in self.tensors.values()))

    @property
    def main_dtype(self) -> str | None:
        counts: Counter[str] = Counter()
        for tensor in self.tensors.values():
            counts[tensor.dtype] += tensor.numel
        return counts.most_common(1)[0][0] if counts else None

    def token_id(self, which: str) -> int | list[int] | None:
        for source in (self.text_config, self.config):
            value = source.get(f"{which}_token_id")
            if isinstance(value, (int, list)):
                return value
        return None

    def linear_weights(self) -> list[TensorInfo]:
        """2-D weights of the transformer blocks (what the toolkit quantizes with group sizes)."""
        skip = ("embed", "wte", "norm", "lm_head", "output.weight", "vision", "visual", "audio")
        return [t for t in self.tensors.values()
                if len(t.shape) == 2 and t.name.endswith(".weight") and not any(s in t.name for s in skip)]

    def summary(self) -> dict[str, Any]:
        tc = self.text_config
        summary: dict[str, Any] = {
            "kind": "checkpoint",
            "path": str(self.path),
            "architecture": self.architecture,
            "model_type": self.model_type,
            "source": self.source_name,
            "revision": self.source_revision,
            "parameters": self.param_count,
            "weight_bytes": self.weight_bytes,
            "dtypes": self.dtypes,
            "tensors": len(self.tensors),
            "weight_files": [p.name for p in self.weight_files],
            "hidden_size": tc.get("hidden_size"),
            "num_hidden_layers": tc.get("num_hidden_layers"),
            "vocab_size": tc.get("vocab_size"),
            "tie_word_embeddings": tie_word_embeddings(self.config),
            "max_position_embeddings": tc.get("max_position_embeddings"),
            "quantization_config": self.quantization_config,
            "tokenizer_files": self.tokenizer_files,
            "chat_template": bool(self.chat_template),
            "bos_token_id": self.token_id("bos"),
            "eos_token_id": self.token_id("eos"),
        }
        source = self.source_quantization()
        if source is not None:
            summary["source_quantization"] = source
        return summary

    def source_quantization(self) -> dict[str, Any] | None:
        """A bitsandbytes checkpoint's quantization and what rkedge does with it (None for any other)."""
        from rkedge._fs import format_size
        from rkedge.convert.bnb import dequantized_dtype, dequantized_view, quantization_from_config, quantized_weights

        source = quantization_from_config(self.config)
        if source is None or source.method != "bitsandbytes":
            return None
        described = source.to_dict()
        weights = quantized_weights(self.tensors)
        if source.dequantizable and weights:
            plain = dequantized_view(self)
            described["rkedge"] = (f"rkedge convert dequantizes it first ({len(weights)} quantized weights, tensor by "
                                   f"tensor) to {dequantized_dtype(self)}: "
                                   f"{plain.param_count:,} parameters, {format_size(plain.weight_bytes)}")
            described["dequantized"] = {"parameters": plain.param_count, "weight_bytes": plain.weight_bytes,
                                        "dtype": dequantized_dtype(self), "quantized_weights": len(weights)}
        else:
            described["rkedge"] = ("not dequantized: " + ("no quantized weights found" if source.dequantizable else
                                                           "only 4-bit nf4/fp4 and 8-bit LLM.int8 are read"))
        return described


def tie_word_embeddings(config: dict[str, Any]) -> bool:
    """Gemma/Gemma2/Gemma3/RecurrentGemma configs omit the key and default to True (model-configs.md)."""
    text = config.get("text_config") or {}
    for source in (config, text):
        if "tie_word_embeddings" in source:
            return bool(source["tie_word_embeddings"])
    return True


def read_json(path: Path, *, fix: str | None = "re-download the file") -> dict[str, Any]:
    """A JSON object from ``path``; anything else is an :class:`InputError` carrying ``fix``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc}).", fix=fix) from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object.", fix=fix)
    return data


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Reads ``config.json``, safetensors headers, tokenizer files and the chat template of a folder."""
    folder = Path(path)
    config_path = folder / "config.json" if folder.is_dir() else folder
    if not config_path.is_file():
        raise InputError(f"{folder} has no config.json: it is not a Hugging Face checkpoint folder.",
                         fix="pass the folder that holds config.json and the *.safetensors files")
    config = read_json(config_path)
    nested = config.get("text_config")
    if nested is not None and not isinstance(nested, dict):
        raise InputError(f"{config_path}: text_config is a {type(nested).__name__}, not an object.", fix=CONFIG_FIX)
    text_config: dict[str, Any] = nested if isinstance(nested, dict) else config
    check_config(config_path, config, text_config)
    architectures = config.get("architectures") or text_config.get("architectures") or []
    architecture = architectures[0] if architectures else None
    model_type = config.get("model_type") or text_config.get("model_type")
    tensors: dict[str, TensorInfo] = {}
    weight_files: list[Path] = []
    if folder.is_dir():
        weight_files = checkpoint_files(folder)
        if not weight_files and list(folder.glob("*.bin")):
            raise InputError(f"{folder} holds PyTorch pickle weights (*.bin) and no safetensors.",
                             fix="save it again with safe_serialization=True (model.save_pretrained(..., "
                                 "safe_serialization=True)); pickles are not read by rkedge")
        tensors = read_checkpoint(folder)
    tokenizer_config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if folder.is_dir():
        check_tokenizer_files(folder, tokenizer_config)
    return CheckpointInfo(
        path=folder,
        config=config,
        text_config=text_config,
        architecture=architecture,
        model_type=model_type,
        tensors=tensors,
        tokenizer_files=[name for name in TOKENIZER_FILES if (folder / name).is_file()],
        chat_template=read_chat_template(folder, tokenizer_config),
        tokenizer_config=tokenizer_config,
        quantization_config=config.get("quantization_config") or text_config.get("quantization_config"),
        source_name=config.get("_name_or_path") or None,
        source_revision=_snapshot_revision(folder),
        weight_files=weight_files,
    )


def read_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """``chat_template.jinja`` / ``chat_template.json`` / ``tokenizer_config.json`` (newest layout first).

    Raises:
        InputError: a template file that is not UTF-8 text, or a template entry that is not text.
    """
    fix = "restore the chat template from the base model's repository"
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{jinja} is not readable UTF-8 text ({exc}).", fix=fix) from exc
    if (folder / "chat_template.json").is_file():
        template = read_json(folder / "chat_template.json", fix=fix).get("chat_template")
        if isinstance(template, str):
            return template
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise InputError(f"{folder / 'tokenizer_config.json'}: chat_template is a {type(template).__name__}, not "
                         "template text.", fix=fix)
    return template


#: config.json keys that, when present, must be positive integers (None is allowed: "not set").
_POSITIVE_INT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim", "sliding_window",
                      "attention_window_size")
#: Of those, the ones a language model's config cannot leave unset once it names them.
_REQUIRED_WHEN_PRESENT = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
CONFIG_FIX = "re-download config.json from the model's repository (it is damaged or hand-edited)"


def check_config(path: Path, config: dict[str, Any], text_config: dict[str, Any]) -> None:
    """Refuses a config.json whose fields the planner, the toolkit or transformers would trip over (a string
    where a size belongs, a zero head count, ``architectures`` that is not a list of names...)."""
    problems: list[str] = []
    for where, section in (("", config), ("text_config.", text_config)) if text_config is not config else (("", config),):
        for key in _POSITIVE_INT_KEYS:
            if key not in section:
                continue
            value = section[key]
            if value is None and key not in _REQUIRED_WHEN_PRESENT:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{where}{key} is {value!r}, not a positive integer")
        architectures = section.get("architectures")
        if architectures is not None and (not isinstance(architectures, list)
                                          or not all(isinstance(a, str) for a in architectures)):
            problems.append(f"{where}architectures is {architectures!r}, not a list of class names")
        model_type = section.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            problems.append(f"{where}model_type is {model_type!r}, not a name")
        if "tie_word_embeddings" in section and not isinstance(section["tie_word_embeddings"], bool):
            problems.append(f"{where}tie_word_embeddings is {section['tie_word_embeddings']!r}, not true/false")
        quantization = section.get("quantization_config")
        if quantization is not None and not isinstance(quantization, dict):
            problems.append(f"{where}quantization_config is {quantization!r}, not an object")
        for token in ("bos_token_id", "eos_token_id"):  # pad_token_id is left out: old configs say -1
            value = section.get(token)
            ids = value if isinstance(value, list) else [value]
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                problems.append(f"{where}{token} is {value!r}, not a token id (or a list of them)")
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems) + ".", fix=CONFIG_FIX)


#: Tokenizer-side JSON files: each, when present, must be a JSON object (vocab.json: a map of tokens to ids).
_TOKENIZER_JSON = ("tokenizer.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                   "chat_template.json", "generation_config.json")


def check_tokenizer_files(folder: Path, tokenizer_config: dict[str, Any]) -> None:
    """Refuses tokenizer files the toolkit (through transformers) could not load: each JSON file readable, the
    special tokens text, ``tokenizer.json`` a tokenizer the ``tokenizers`` library reads (when installed)."""
    fix = "copy the tokenizer files again from the base model's repository"
    for name in _TOKENIZER_JSON:
        if (folder / name).is_file():
            read_json(folder / name, fix=fix)
    template = tokenizer_config.get("chat_template")
    if template is not None and not isinstance(template, str) and not (
            isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str)
                                               for t in template)):
        raise InputError(f"{folder / 'tokenizer_config.json'}: chat_template is {str(template)[:60]!r}, not template "
                         "text (nor a list of named templates).", fix=fix)
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = tokenizer_config.get(key)
        if token is not None and not isinstance(token, str) and \
                not (isinstance(token, dict) and isinstance(token.get("content"), str)):
            raise InputError(f"{folder / 'tokenizer_config.json'}: {key} is {token!r}, not a token text.", fix=fix)
    if (folder / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:  # rkedge inspect without the convert extra: the JSON check above is what it gets
            return
        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust library raises plain Exceptions for every malformed file
            raise InputError(f"{folder / 'tokenizer.json'} is not a tokenizer the tokenizers library can read "
                             f"({str(exc)[:200]}).", fix=fix) from exc


def _snapshot_revision(folder: Path) -> str | None:
    """A Hugging Face cache snapshot folder is named by its commit (``.../snapshots/<40 hex>``)."""
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    return None


# --- GGUF ---------------------------------------------------------------------------------------------------------

def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file, read with gguf-py's ``GGUFReader`` (memory-mapped: the tensors are
    not read). Arrays are reduced to ``{"array_length": n}`` (a tokenizer's vocabulary is 150k strings).

    Raises:
        InputError: the file is not a GGUF file gguf-py can read.
    """
    try:
        from gguf import GGUFReader, GGUFValueType
    except ImportError as exc:
        raise InputError(f"reading GGUF files needs the gguf package ({exc}).",
                         fix="pip install 'rkedge[convert]'") from None
    try:
        reader = GGUFReader(Path(path))
    except (ValueError, OSError, IndexError) as exc:
        raise InputError(f"{path} is not a GGUF file ({exc}).",
                         fix="pass a .gguf file (or convert the Hugging Face checkpoint instead)") from None
    metadata: dict[str, Any] = {}
    for key, gguf_field in reader.fields.items():
        kind = gguf_field.types[0] if gguf_field.types else None
        value = gguf_field.parts[gguf_field.data[0]] if gguf_field.data else None
        if kind == GGUFValueType.ARRAY:
            metadata[key] = {"array_length": len(gguf_field.data)}
        elif kind == GGUFValueType.STRING and value is not None:
            metadata[key] = bytes(value).decode("utf-8", "replace")
        elif value is not None:
            metadata[key] = value.tolist()[0]  # a one-element numpy array: the plain Python scalar
    return metadata


def gguf_file_type_name(file_type: int) -> str | None:
    """``general.file_type`` by the name gguf-py gives it (the toolkit prints the same, rknn-llm#312)."""
    from gguf import LlamaFileType

    try:
        name: str = LlamaFileType(file_type).name
    except ValueError:
        return None
    return name


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """``general.architecture``, ``general.name`` and ``general.file_type`` of a GGUF file (header only)."""
    path = Path(path)
    metadata = read_gguf_metadata(path)
    file_type = metadata.get("general.file_type")
    type_name = (gguf_file_type_name(file_type) or f"type {file_type}") if isinstance(file_type, int) else None
    return {"kind": "gguf", "path": str(path), "gguf_version": metadata.get("GGUF.version"),
            "architecture": metadata.get("general.architecture"), "name": metadata.get("general.name"),
            "file_type": type_name}


# --- .rkllm files ----------------------------------------------------------------------------------------

def inspect_rkllm(path: str | Path) -> dict[str, Any]:
    """A ``.rkllm``: simulated (our header + manifest) or vendor (trailer, sidecar manifest)."""
    from rkedge.errors import ModelFileError
    from rkedge.manifest import read_manifest
    from rkedge.runtime.simmodel import read_simulated_model

    path = Path(path)
    manifest_problem: str | None = None
    try:  # the one manifest reader; a broken sidecar is reported, since inspect is where people look
        read = read_manifest(path)
        manifest: dict[str, Any] | None = read.to_dict() if read is not None else None
    except ModelFileError as exc:
        manifest, manifest_problem = None, str(exc)
    sniffed = sniff_rkllm(path)
    info: dict[str, Any]
    if sniffed.simulated:
        info = {"kind": "simulated-rkllm", "path": str(path), "size": sniffed.size,
                "note": "rkedge simulated model: runs on the simulated NPU only (no weights)",
                "simulated_manifest": read_simulated_model(path), "manifest": manifest}
    else:
        info = {"kind": "rkllm", "path": str(path), "size": sniffed.size,
                "toolkit_version_trailer": sniffed.toolkit_version_trailer, "manifest": manifest}
    if sniffed.problem:
        info["problem"] = sniffed.problem
    if manifest_problem:
        info["manifest_problem"] = manifest_problem
    return info


def inspect_path(path: str | Path) -> dict[str, Any]:
    """What ``rkedge inspect PATH`` shows, for any kind of input."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from rkedge.lora.adapter import inspect_adapter

        adapter = inspect_adapter(path)
        return {"kind": "adapter", **_as_dict(adapter)}
    if path.is_dir() or path.name == "config.json":
        return inspect_checkpoint(path).summary()
    if path.suffix == ".gguf":
        return inspect_gguf(path)
    if path.suffix == ".rkllm" or is_simulated_file(path):
        return inspect_rkllm(path)
    raise InputError(f"don't know how to inspect {path}.",
                     fix="pass a checkpoint folder, a config.json, an adapter folder, a .gguf or a .rkllm file")


def _as_dict(value: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        converted: dict[str, Any] = json.loads(json.dumps(asdict(value), default=str))
        return converted
    return dict(value)
