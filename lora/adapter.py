"""What a PEFT LoRA adapter holds, and whether it fits a base checkpoint, from headers only.

``inspect_adapter`` reads ``adapter_config.json`` and the safetensors header of the adapter weights;
``validate_adapter`` checks the result against a base checkpoint's ``config.json`` and safetensors
headers. Neither loads a weight, so both run in a second on any model and need neither torch nor peft.

How peft lays an adapter out (peft 0.21, checked against its source and its ``save_pretrained`` output):

- keys start with ``base_model.model.`` and then the module name inside the transformers model
  (``model.layers.0.self_attn.q_proj``); the adapter name (``default``) is removed on save;
- a Linear LoRA is ``<module>.lora_A.weight`` [r, in] and ``<module>.lora_B.weight`` [out, r]
  (plus ``lora_B.bias`` [out] with ``lora_bias=True``); an Embedding LoRA is ``<module>.lora_embedding_A``
  [r, num_embeddings] and ``<module>.lora_embedding_B`` [embedding_dim, r];
- every other tensor is a full tensor that replaces the base one when peft loads the adapter:
  ``modules_to_save`` copies (``lm_head.weight``), trained biases (``bias="all"``/``"lora_only"``, saved as
  ``<module>.bias`` or ``<module>.base_layer.bias``) and the base weights of LoRA'd embeddings
  (``<module>.base_layer.weight``, written by ``save_embedding_layers``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rkedge._fs import sha256_file
from rkedge.convert.findings import Finding, Severity
from rkedge.convert.inspect import read_json
from rkedge.convert.safetensors_index import TensorInfo, checkpoint_files, read_header
from rkedge.errors import InputError
from rkedge.lora._tensors import FLOAT_CODES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_FAILURES = "converter-anchors-and-failure-modes.md"
SOURCE_F10 = f"{_FAILURES} F-10 (LoRA conversion)"
SOURCE_F9 = f"{_FAILURES} F-9 (pre-quantized or LoRA-merged checkpoints)"
SOURCE_PEFT = "peft 0.21 source: tuners/lora/model.py, tuners/lora/layer.py, utils/save_and_load.py"

#: LoraConfig fields that switch on a LoRA variant whose merge is not ``W + scaling * B @ A``.
_VARIANT_FIELDS = ("velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora", "arrow_config",
                   "kasa_config", "use_qalora", "target_parameters", "trainable_token_indices", "layer_replication")
#: ``init_lora_weights`` values after which the adapter is plain ``W + scaling * B @ A`` on the untouched base.
#: PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base weights at init; their adapters need that residual.
_PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica"})  # plus True/False
#: Architectures whose projections are transformers' ``Conv1D`` (weights stored [in, out]); peft forces
#: ``fan_in_fan_out=True`` on those and ``False`` on ``nn.Linear``, whatever the config says.
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
_CONV1D_LEAVES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
_HEAD_KEYS = ("lm_head.weight", "embed_out.weight")

_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<param>weight|bias)$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])$")
_BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>[^.]+)$")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA'd module: its low-rank pair, shapes, and the scaling peft applies to it."""

    name: str  # module name in the base model, e.g. model.layers.0.self_attn.q_proj
    kind: Literal["linear", "embedding"]
    rank: int  # rank of the stored A matrix
    in_features: int  # linear: in-features; embedding: num_embeddings
    out_features: int  # linear: out-features; embedding: embedding_dim
    b_rank: int  # rank of the stored B matrix (must equal ``rank``)
    dtype: str  # safetensors dtype of A (``A/B`` when they differ)
    config_rank: int  # r after rank_pattern: what peft divides by
    alpha: float  # lora_alpha after alpha_pattern
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    a_key: str
    b_key: str
    bias_key: str | None = None  # lora_B.bias (lora_bias=True)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"


@dataclass(frozen=True)
class SavedTensor:
    """A full tensor in the adapter that replaces a base tensor (peft loads it over the base one)."""

    key: str  # key in the adapter file
    target: str  # base tensor it replaces
    origin: Literal["modules_to_save", "bias", "base_layer", "other"]
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class AdapterInfo:
    """Everything ``inspect_adapter`` read, without loading a weight."""

    path: Path
    weights_file: Path
    peft_type: str | None
    base_model_name_or_path: str | None
    revision: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str] | str | None
    modules_to_save: list[str] | None
    bias: str
    lora_bias: bool
    fan_in_fan_out: bool  # as written in the config; the effective value depends on the base module type
    init_lora_weights: bool | str
    modules: tuple[LoraModule, ...]
    saved: tuple[SavedTensor, ...]
    unrecognised: tuple[str, ...]  # "key: why" for tensors this tool cannot merge
    total_bytes: int
    weights_sha256: str
    config: dict[str, Any] = field(repr=False)

    @property
    def embedding_loras(self) -> tuple[LoraModule, ...]:
        return tuple(m for m in self.modules if m.kind == "embedding")

    @property
    def linear_loras(self) -> tuple[LoraModule, ...]:
        return tuple(m for m in self.modules if m.kind == "linear")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "weights_file": str(self.weights_file), "peft_type": self.peft_type,
            "base_model_name_or_path": self.base_model_name_or_path, "revision": self.revision, "r": self.r,
            "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora, "use_dora": self.use_dora,
            "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern,
            "target_modules": self.target_modules, "modules_to_save": self.modules_to_save, "bias": self.bias,
            "lora_bias": self.lora_bias, "fan_in_fan_out": self.fan_in_fan_out,
            "init_lora_weights": self.init_lora_weights,
            "modules": [
                {"name": m.name, "kind": m.kind, "rank": m.rank, "in_features": m.in_features,
                 "out_features": m.out_features, "dtype": m.dtype, "alpha": m.alpha, "scaling": m.scaling,
                 "lora_bias": m.bias_key is not None}
                for m in self.modules
            ],
            "embedding_loras": [m.name for m in self.embedding_loras],
            "saved": [{"key": s.key, "target": s.target, "origin": s.origin, "shape": list(s.shape), "dtype": s.dtype}
                      for s in self.saved],
            "unrecognised": list(self.unrecognised), "total_bytes": self.total_bytes,
            "weights_sha256": self.weights_sha256,
        }


@dataclass(frozen=True)
class BaseCheckpoint:
    """A base checkpoint as seen through ``config.json`` and safetensors headers."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: tuple[Path, ...]
    index: dict[str, Any] | None  # model.safetensors.index.json, when there is one
    embed_key: str | None  # input embedding weight
    head_key: str  # output embedding weight as transformers names it (may be absent when tied)
    tied: bool  # the output embedding is the input embedding

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of a base tensor; a tied head has the embedding's shape."""
        if name in self.tensors:
            return self.tensors[name].shape
        if self.tied and name == self.head_key and self.embed_key:
            return self.tensors[self.embed_key].shape
        return None

    def dtype(self, name: str) -> str | None:
        if name in self.tensors:
            return self.tensors[name].dtype
        if self.tied and name == self.head_key and self.embed_key:
            return self.tensors[self.embed_key].dtype
        return None

    def is_conv1d(self, module: str) -> bool:
        """Whether peft wraps this module as a ``Conv1D`` (fan_in_fan_out=True): GPT-2-style projections."""
        return self.config.get("model_type") in _CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in _CONV1D_LEAVES


# -- peft's rank/alpha pattern matching ----------------------------------------------------------------


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """peft's ``get_pattern_key``, verbatim: the first pattern that matches the whole key or a dotted suffix
    of it, as a regular expression; the key itself when none does."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def module_rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """r and lora_alpha peft gives ``module`` (``LoraModel._create_and_replace``)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    try:
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
    except re.error as exc:
        raise InputError(f"adapter_config.json: a rank_pattern/alpha_pattern key is not a regular expression ({exc}).",
                         fix="fix the pattern; peft itself could not load this adapter") from exc
    return r, alpha


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``LoraLayer.update_layer``: alpha / sqrt(r) with rsLoRA, alpha / r otherwise."""
    if r <= 0:
        return math.nan
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# -- inspection ------------------------------------------------------------------------------------------


def inspect_adapter(path: str | Path) -> AdapterInfo:
    """Reads an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) without loading weights.

    Raises:
        InputError: no such folder, no adapter config, pickled weights (``adapter_model.bin``), or unreadable files.
    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{path} does not exist.", fix="pass the folder that holds adapter_config.json")
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise InputError(f"{folder} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG}.",
                         fix="pass the folder written by peft's save_pretrained (adapter_config.json + weights)")
    config = read_json(config_path, fix="re-save the adapter with peft")
    _check_config_types(config_path, config)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise InputError(
                f"{folder} stores its weights as a pickle (adapter_model.bin); rkedge does not unpickle files, "
                "because loading a pickle can run arbitrary code.",
                fix="re-save the adapter with safetensors: PeftModel.from_pretrained(base, DIR)"
                    ".save_pretrained(NEW_DIR, safe_serialization=True)")
        raise InputError(f"{folder} has no {ADAPTER_WEIGHTS}.", fix="pass the folder written by peft's save_pretrained")
    tensors, _ = read_header(weights)

    use_rslora = bool(config.get("use_rslora", False))
    prefix = PEFT_PREFIX if tensors and all(k.startswith(PEFT_PREFIX) for k in tensors) else ""
    modules, saved, unrecognised = _classify(tensors, config, prefix, use_rslora)
    raw_targets = config.get("target_modules")
    return AdapterInfo(
        path=folder, weights_file=weights, peft_type=config.get("peft_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"), revision=config.get("revision"),
        r=config.get("r", 8), lora_alpha=config.get("lora_alpha", 8), use_rslora=use_rslora,
        use_dora=bool(config.get("use_dora", False)), rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        target_modules=sorted(raw_targets) if isinstance(raw_targets, list) else raw_targets,
        modules_to_save=list(config["modules_to_save"]) if config.get("modules_to_save") else None,
        bias=config.get("bias", "none") or "none", lora_bias=bool(config.get("lora_bias", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        init_lora_weights=config.get("init_lora_weights", True),
        modules=modules, saved=saved, unrecognised=unrecognised, total_bytes=weights.stat().st_size,
        weights_sha256=sha256_file(weights), config=config,
    )


def _classify(tensors: dict[str, TensorInfo], config: dict[str, Any], prefix: str, use_rslora: bool
              ) -> tuple[tuple[LoraModule, ...], tuple[SavedTensor, ...], tuple[str, ...]]:
    pairs: dict[tuple[str, str], dict[str, TensorInfo]] = {}
    saved: list[SavedTensor] = []
    unrecognised: list[str] = []
    modules_to_save = config.get("modules_to_save") or []
    bias_mode = config.get("bias", "none") or "none"
    for key, info in sorted(tensors.items()):
        name = key[len(prefix):]
        if match := _LINEAR_KEY.match(name):
            pairs.setdefault(("linear", match["module"]), {})[f"{match['ab']}.{match['param']}"] = info
        elif match := _EMBEDDING_KEY.match(name):
            pairs.setdefault(("embedding", match["module"]), {})[f"{match['ab']}.weight"] = info
        elif "lora_magnitude_vector" in name:
            unrecognised.append(f"{key}: DoRA magnitude vector (use_dora)")
        elif any(part.startswith("lora_") for part in name.split(".")):
            unrecognised.append(f"{key}: LoRA tensor of a kind rkedge does not merge")
        elif match := _BASE_LAYER_KEY.match(name):
            target = f"{match['module']}.{match['param']}"
            saved.append(SavedTensor(key, target, "base_layer", info.shape, info.dtype))
        else:
            module = name.rsplit(".", 1)[0]
            # peft's _set_trainable matches modules_to_save with a plain endswith
            if any(module.endswith(entry) for entry in modules_to_save):
                origin: Literal["modules_to_save", "bias", "base_layer", "other"] = "modules_to_save"
            elif bias_mode != "none" and name.endswith(".bias"):
                origin = "bias"
            else:
                origin = "other"
            saved.append(SavedTensor(key, name, origin, info.shape, info.dtype))

    modules: list[LoraModule] = []
    for (kind, module), found in sorted(pairs.items(), key=lambda item: item[0][1]):
        a, b = found.get("A.weight"), found.get("B.weight")
        if a is None or b is None:
            missing = "A" if a is None else "B"
            unrecognised.append(f"{prefix}{module}: lora_{missing} is missing (an incomplete LoRA pair)")
            continue
        if len(a.shape) != 2 or len(b.shape) != 2:
            unrecognised.append(f"{a.name}: {len(a.shape)}-D LoRA weights (a convolution LoRA), not merged by rkedge")
            continue
        r, alpha = module_rank_alpha(config, module)
        dtype = a.dtype if a.dtype == b.dtype else f"{a.dtype}/{b.dtype}"
        bias = found.get("B.bias")
        if "A.bias" in found:
            unrecognised.append(f"{found['A.bias'].name}: lora_A has a bias, which peft never creates")
        modules.append(LoraModule(
            name=module, kind=kind,  # type: ignore[arg-type]
            rank=a.shape[0], in_features=a.shape[1], out_features=b.shape[0], b_rank=b.shape[1], dtype=dtype,
            config_rank=r, alpha=alpha, scaling=lora_scaling(r, alpha, use_rslora), a_key=a.name, b_key=b.name,
            bias_key=bias.name if bias is not None else None))
    return tuple(modules), tuple(saved), tuple(unrecognised)


# -- the base checkpoint ---------------------------------------------------------------------------------


def read_base_checkpoint(path: str | Path) -> BaseCheckpoint:
    """A base checkpoint's config and tensor headers (no weights).

    Raises:
        InputError: not a folder with ``config.json`` and safetensors weights, or unreadable files.
    """
    folder = Path(path)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise InputError(f"base {path} is not a folder.",
                         fix="pass the Hugging Face checkpoint folder of the base model")
    if not config_path.is_file():
        raise InputError(f"base {folder} has no config.json.",
                         fix="pass the Hugging Face checkpoint folder of the base model (config.json + *.safetensors)")
    config = read_json(config_path, fix="pass the Hugging Face checkpoint folder of the base model")
    files = checkpoint_files(folder)
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise InputError(f"base {folder} has only pickled weights (*.bin); rkedge reads safetensors only.",
                             fix="re-save the base with safetensors: AutoModelForCausalLM.from_pretrained(DIR)"
                                 ".save_pretrained(NEW_DIR, safe_serialization=True)")
        raise InputError(f"base {folder} has no *.safetensors weights.", fix="pass a complete checkpoint folder")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise InputError(f"base {folder}: the index names {file.name}, which is missing.",
                             fix="re-download the checkpoint")
        found, _ = read_header(file)
        for name in found:
            if name in tensors:
                raise InputError(f"base {folder}: tensor {name} is in both {tensors[name].file.name} and {file.name}.",
                                 fix="remove the stray safetensors file (keep the ones the index names)")
        tensors.update(found)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else None
    embed_key = next((k for k in sorted(tensors) for suffix in _EMBED_SUFFIXES if k.endswith(suffix)), None)
    head_key = next((k for k in _HEAD_KEYS if k in tensors), "lm_head.weight")
    tie = config.get("tie_word_embeddings")
    if tie is None:
        tie = head_key not in tensors  # no explicit flag: tied exactly when there is no separate head tensor
    return BaseCheckpoint(path=folder, config=config, tensors=tensors, files=tuple(files), index=index,
                          embed_key=embed_key, head_key=head_key, tied=bool(tie) and embed_key is not None)


# -- validation ------------------------------------------------------------------------------------------


def _check_config_types(path: Path, config: dict[str, Any]) -> None:
    """Refuses an adapter_config.json whose values peft could not have written ("r": "abc", a number of
    target modules...): the merge would otherwise compute with them or crash halfway."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def rank(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    def names(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    checks: list[tuple[str, Any, str]] = [
        ("r", rank, "a positive integer"),
        ("lora_alpha", number, "a number"),
        ("rank_pattern", lambda v: isinstance(v, dict) and all(rank(x) for x in v.values()),
         "an object of module patterns to positive integers"),
        ("alpha_pattern", lambda v: isinstance(v, dict) and all(number(x) for x in v.values()),
         "an object of module patterns to numbers"),
        ("target_modules", lambda v: isinstance(v, str) or names(v), "a list of module names or a regex"),
        ("modules_to_save", names, "a list of module names"),
        ("peft_type", lambda v: isinstance(v, str), "a name"),
        ("base_model_name_or_path", lambda v: isinstance(v, str), "a model name or path"),
        ("revision", lambda v: isinstance(v, str), "a revision"),
        ("bias", lambda v: isinstance(v, str), "none, all or lora_only"),
        *((flag, lambda v: isinstance(v, bool), "true or false")
          for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias")),
    ]
    problems = [f"{key} is {config[key]!r}, not {expected}" for key, valid, expected in checks
                if config.get(key) is not None and not valid(config[key])]
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems) + ".",
                         fix="restore adapter_config.json as peft saved it (save_pretrained writes it with the weights)")


def validate_adapter(adapter: AdapterInfo, base_dir: str | Path, *,
                     allow_base_mismatch: bool = False) -> list[Finding]:
    """Checks an adapter against a base checkpoint (config.json + safetensors headers only).

    ``allow_base_mismatch``: an adapter that names another base but fits this one's shapes is a warning, not an
    error (the user says the base is the right one, e.g. a renamed copy).

    Raises:
        InputError: when the base folder itself is unreadable (no config.json, no safetensors weights).
    """
    return check_adapter(adapter, read_base_checkpoint(base_dir), allow_base_mismatch=allow_base_mismatch)


def check_adapter(adapter: AdapterInfo, base: BaseCheckpoint, *, allow_base_mismatch: bool = False) -> list[Finding]:
    """``validate_adapter`` for an already read base checkpoint."""
    findings: list[Finding] = []
    add = findings.append
    config = adapter.config

    if adapter.peft_type != "LORA":
        add(Finding("lora.peft-type", "error",
                    f"the adapter's peft_type is {adapter.peft_type!r}; rkedge merges LoRA adapters only.",
                    "merge it with peft (PeftModel.from_pretrained(base, DIR).merge_and_unload()) and convert the "
                    "merged checkpoint, or train a LoRA (peft LoraConfig)", SOURCE_F10))
        return findings  # the rest describes LoRA tensors; for another method it would only add noise
    if adapter.use_dora or any("DoRA" in item for item in adapter.unrecognised):
        add(Finding("lora.dora", "error",
                    "the adapter uses DoRA (use_dora: true): its merge rescales every column of the merged weight "
                    "by a learned magnitude, which rkedge does not implement; it refuses rather than merge it wrongly.",
                    "merge with peft (PeftModel.from_pretrained(base, DIR).merge_and_unload()), save with "
                    "safe_serialization=True and convert that checkpoint; or train without use_dora",
                    f"{SOURCE_PEFT} (DoraLinearVariant)"))
    variants = [name for name in _VARIANT_FIELDS if config.get(name)]
    if variants:
        add(Finding("lora.variant", "error",
                    f"the adapter uses {', '.join(variants)}: a LoRA variant whose merge is not W + scaling * B @ A.",
                    "merge with peft (merge_and_unload) and convert the merged checkpoint", SOURCE_PEFT))
    init = adapter.init_lora_weights
    if not (isinstance(init, bool) or (isinstance(init, str) and init.lower() in _PLAIN_INITS)):
        add(Finding("lora.init", "error",
                    f"init_lora_weights={init!r} rewrites the base weights at initialisation (PiSSA/OLoRA/CorDA/LoftQ/"
                    "LoRA-GA); the adapter only fits that residual model, not the original base.",
                    "convert it to a plain LoRA with peft: save_pretrained(..., "
                    "path_initial_model_for_weight_conversion=INITIAL_ADAPTER), then merge that", SOURCE_PEFT))
    if adapter.bias not in ("none", "all", "lora_only"):
        add(Finding("lora.config", "error", f"bias={adapter.bias!r} is not a LoRA bias mode (none, all, lora_only).",
                    "fix adapter_config.json", SOURCE_PEFT))
    if adapter.unrecognised:
        listed = [u for u in adapter.unrecognised if "DoRA" not in u]
        if listed:
            add(Finding("lora.unsupported-tensor", "error",
                        f"{len(listed)} adapter tensor(s) cannot be merged: {short_list(listed)}.",
                        "merge with peft (merge_and_unload) and convert the merged checkpoint", SOURCE_PEFT))

    quant = base.config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        add(Finding("lora.quantized-base", "error",
                    f"the base is quantized (config.json quantization_config, quant_method {method!r}); merging a "
                    "LoRA into quantized weights loses the update, and rkllm-toolkit cannot read such a checkpoint.",
                    "merge into an fp16/bf16 copy of the base (the unquantized original), then let the toolkit "
                    "quantize the merged model", SOURCE_F9))

    shape_errors = _check_modules(adapter, base, add)
    shape_errors += _check_saved(adapter, base, add)
    _check_targets(adapter, base, add)
    _check_tied(adapter, base, add)
    _check_dtypes(adapter, base, add)
    _check_base_name(adapter, base, shape_errors, add, allow_mismatch=allow_base_mismatch)
    if not adapter.modules and not adapter.saved:
        add(Finding("lora.empty", "warning", "the adapter holds no LoRA weights and no saved modules; merging "
                    "changes nothing.", "check that you passed the right adapter folder", SOURCE_PEFT))
    return findings


#: What to do when a LoRA merge is refused (shown with every error finding).
MERGE_FIX = "fix the findings above; `rkedge lora inspect ADAPTER --base BASE` shows every check"


def short_list(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_modules(adapter: AdapterInfo, base: BaseCheckpoint, add: Any) -> int:
    missing: list[str] = []
    problems: list[str] = []
    for m in adapter.modules:
        shape = base.shape(m.weight_name)
        if shape is None:
            missing.append(m.name)
            continue
        if m.rank != m.b_rank:
            problems.append(f"{m.name}: lora_A has rank {m.rank}, lora_B rank {m.b_rank}")
        if m.config_rank != m.rank:
            problems.append(f"{m.name}: the weights have rank {m.rank}, the config gives r={m.config_rank} "
                            "(after rank_pattern); peft would not load this adapter")
        if m.kind == "embedding":
            expected = (m.in_features, m.out_features)
            what = "[num_embeddings, embedding_dim]"
        elif base.is_conv1d(m.name):
            expected = (m.in_features, m.out_features)
            what = "[in, out] (Conv1D)"
        else:
            expected = (m.out_features, m.in_features)
            what = "[out, in]"
        if tuple(shape) != expected:
            problems.append(f"{m.name}: the LoRA needs a base weight {what} of {list(expected)}, the base has "
                            f"{list(shape)}")
        if m.bias_key is not None:
            bias_shape = base.shape(f"{m.name}.bias")
            if bias_shape is None:
                problems.append(f"{m.name}: the adapter has a LoRA bias (lora_bias=True) but the base module has no "
                                "bias to merge it into")
            elif tuple(bias_shape) != (m.out_features,):
                problems.append(f"{m.name}: LoRA bias of {m.out_features} values, base bias {list(bias_shape)}")
    if missing:
        add(Finding("lora.target-missing", "error",
                    f"{len(missing)} LoRA'd module(s) do not exist in the base checkpoint: {short_list(missing)}.",
                    "pass --base the checkpoint the adapter was trained on (same architecture and tensor names)",
                    SOURCE_F10))
    if problems:
        add(Finding("lora.shape", "error",
                    f"{len(problems)} LoRA'd module(s) do not fit the base: {short_list(problems, 3)}.",
                    "pass --base the checkpoint the adapter was trained on (same size and variant)", SOURCE_F10))
    return len(missing) + len(problems)


def _check_saved(adapter: AdapterInfo, base: BaseCheckpoint, add: Any) -> int:
    missing: list[str] = []
    problems: list[str] = []
    for s in adapter.saved:
        shape = base.shape(s.target)
        if shape is None:
            missing.append(f"{s.target} ({s.origin})")
        elif tuple(shape) != tuple(s.shape):
            hint = " (a resized vocabulary?)" if s.target in (base.embed_key, base.head_key) else ""
            problems.append(f"{s.target}: adapter {list(s.shape)}, base {list(shape)}{hint}")
    if missing:
        add(Finding("lora.target-missing", "error",
                    f"{len(missing)} tensor(s) saved in the adapter (modules_to_save, biases or embeddings) do not "
                    f"exist in the base: {short_list(missing)}.",
                    "pass --base the checkpoint the adapter was trained on", SOURCE_F10))
    if problems:
        add(Finding("lora.shape", "error",
                    f"{len(problems)} tensor(s) saved in the adapter do not match the base shape: "
                    f"{short_list(problems, 3)}.",
                    "pass --base the checkpoint the adapter was trained on; rkedge does not resize vocabularies",
                    SOURCE_F10))
    return len(missing) + len(problems)


def _base_modules(base: BaseCheckpoint) -> set[str]:
    names = {name.rsplit(".", 1)[0] for name in base.tensors if name.endswith(".weight")}
    if base.tied:
        names.add(base.head_key.rsplit(".", 1)[0])
    return names


def _check_targets(adapter: AdapterInfo, base: BaseCheckpoint, add: Any) -> None:
    """target_modules should name modules of this base (F-10); the weights decide what is merged."""
    targets = adapter.target_modules
    if not targets or targets == "all-linear":
        return
    modules = _base_modules(base)
    if isinstance(targets, str):
        try:
            hit = any(re.fullmatch(targets, name) for name in modules)
        except re.error:
            hit = True  # reported as a config problem by peft itself; the weights are what counts here
        unmatched = [] if hit else [targets]
    else:
        unmatched = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in modules)]
    if unmatched:
        # none matching is what peft itself refuses to load ("Target modules ... not found in the base model")
        severity: Severity = "error" if isinstance(targets, str) or len(unmatched) == len(targets) else "warning"
        add(Finding("lora.target-modules", severity,
                    f"target_modules entries match no module of the base: {short_list(unmatched)}.",
                    "check that the base is the model the adapter was trained on", SOURCE_F10))


def _changes(adapter: AdapterInfo, name: str) -> bool:
    module = name.rsplit(".", 1)[0]
    return any(m.name == module for m in adapter.modules) or any(
        s.target == name and s.origin != "base_layer" for s in adapter.saved)


def _check_tied(adapter: AdapterInfo, base: BaseCheckpoint, add: Any) -> None:
    if not base.tied or not base.embed_key:
        return
    head, embed = _changes(adapter, base.head_key), _changes(adapter, base.embed_key)
    if head or embed:
        changed = " and ".join(n for n, hit in ((base.embed_key, embed), (base.head_key, head)) if hit)
        add(Finding("lora.tied-embeddings", "warning",
                    f"the base ties {base.head_key} to {base.embed_key} and the adapter changes {changed}; unless both "
                    "end up identical, the merge unties them (writes both tensors, tie_word_embeddings: false) so the "
                    "merged model computes what the adapter was trained to compute. peft's merge_and_unload would "
                    "instead write the change into the shared tensor and alter the other side too.",
                    "nothing to do; expect the merged checkpoint to be larger by one vocabulary x hidden matrix",
                    SOURCE_PEFT))


def _check_dtypes(adapter: AdapterInfo, base: BaseCheckpoint, add: Any) -> None:
    adapter_dtypes = sorted({d for m in adapter.modules for d in m.dtype.split("/")} | {s.dtype for s in adapter.saved})
    bad_adapter = [d for d in adapter_dtypes if d not in FLOAT_CODES]
    if bad_adapter:
        add(Finding("lora.dtype", "error", f"the adapter holds non-floating tensors ({', '.join(bad_adapter)}).",
                    "save the adapter in float32/float16/bfloat16", SOURCE_PEFT))
    targets = [m.weight_name for m in adapter.modules] + [s.target for s in adapter.saved]
    bad_base = sorted({f"{n} ({base.dtype(n)})" for n in targets if base.dtype(n) not in (None, *FLOAT_CODES)})
    if bad_base:
        add(Finding("lora.dtype", "error",
                    f"{len(bad_base)} targeted base tensor(s) are not floating point: {short_list(bad_base)}.",
                    "merge into an fp16/bf16 copy of the base", SOURCE_F9))
    base_dtypes = sorted({base.dtype(n) or "?" for n in targets if base.dtype(n) in FLOAT_CODES})
    if adapter_dtypes and base_dtypes and not bad_adapter and not bad_base:
        add(Finding("lora.dtype", "info",
                    f"adapter {'/'.join(adapter_dtypes)} on a {'/'.join(base_dtypes)} base: every delta is computed in "
                    "float32 and cast once to the output dtype.", None, SOURCE_PEFT))
    conv = [m.name for m in adapter.linear_loras if base.is_conv1d(m.name)]
    effective = bool(conv)
    if adapter.modules and adapter.fan_in_fan_out != effective:
        add(Finding("lora.fan-in-fan-out", "info",
                    f"the config says fan_in_fan_out={adapter.fan_in_fan_out}, but peft decides it from the module "
                    f"type ({'Conv1D: True' if effective else 'nn.Linear: False'}); the merge does the same.",
                    None, f"{SOURCE_PEFT} (dispatch_default)"))


def _hub_repo_id(folder: Path) -> str | None:
    """``org/name`` for a folder inside a Hugging Face cache (``models--org--name/snapshots/<hash>``)."""
    for part in folder.parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return None


def _check_base_name(adapter: AdapterInfo, base: BaseCheckpoint, shape_errors: int, add: Any, *,
                     allow_mismatch: bool) -> None:
    wanted = adapter.base_model_name_or_path
    if not wanted:
        add(Finding("lora.base-mismatch", "info", "the adapter does not record its base model "
                    "(base_model_name_or_path is empty); only the shapes can be checked.", None, SOURCE_F10))
        return
    folder = base.path.resolve()
    candidates = [str(folder), folder.name, str(base.config.get("_name_or_path") or ""), _hub_repo_id(folder) or ""]

    def norm(text: str) -> str:
        return text.strip().rstrip("/").lower()

    matched = False
    try:
        matched = Path(wanted).expanduser().resolve() == folder
    except (OSError, ValueError):
        pass
    for candidate in filter(None, map(norm, candidates)):
        if matched:
            break
        matched = norm(wanted) == candidate or norm(wanted).split("/")[-1] == candidate.split("/")[-1]
    if matched:
        snapshot = folder.name if _hub_repo_id(folder) else ""
        if adapter.revision and re.fullmatch(r"[0-9a-f]{40}", snapshot) and re.fullmatch(r"[0-9a-f]{40}",
                                                                                         adapter.revision) \
                and snapshot != adapter.revision:
            add(Finding("lora.base-mismatch", "warning",
                        f"the adapter was trained on revision {adapter.revision} of {wanted}; the base is snapshot "
                        f"{snapshot}.", f"download revision {adapter.revision} of {wanted} and merge into that",
                        SOURCE_F10))
        return
    described = f"{base.path}" + (f" (_name_or_path {base.config['_name_or_path']!r})"
                                  if base.config.get("_name_or_path") else "")
    if shape_errors:
        add(Finding("lora.base-mismatch", "error",
                    f"the adapter was trained on {wanted!r}, not on {described}, and its shapes do not fit.",
                    f"pass --base a local copy of {wanted}", SOURCE_F10))
    else:  # same shapes, another name: a wrong model that runs, so refused unless the user vouches for the base
        add(Finding("lora.base-mismatch", "warning" if allow_mismatch else "error",
                    f"the adapter was trained on {wanted!r}; the base is {described}. The shapes fit, but a LoRA "
                    "applied to a different base of the same shape gives wrong outputs.",
                    f"use {wanted}" + (f" at revision {adapter.revision}" if adapter.revision else "")
                    + " as the base" + ("" if allow_mismatch else
                                        ", or pass --allow-base-mismatch if this base is that model (a renamed copy)"),
                    SOURCE_F10))
