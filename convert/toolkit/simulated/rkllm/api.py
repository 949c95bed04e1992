"""``rkllm.api.RKLLM`` of rkedge's SIMULATED toolkit: the vendor API, rules and failure texts, no weights.

Which keyword arguments each method accepts, and which platform/dtype/algorithm combinations pass, come from
``rkedge.convert.rules`` for the simulated version (``$RKEDGE_SIM_TOOLKIT_VERSION``, default 1.3.0); an
argument the version lacks raises ``TypeError`` as Python does for the real function. Failures print the
vendor's own text where the catalogue has one (F-2, F-8, F-9, GGUF types, the max_context INFO line) and
``ERROR: [rkedge simulated toolkit] <id>: ...`` where it has none; the method then returns -1 like the
toolkit. Every such text comes from the failure catalogue (``rkedge.failures``): this module runs in the
interpreter of ``rkedge convert`` itself (``--toolkit mock``: ``convert/toolkit/__init__.py`` puts rkedge on the
worker's path), so it imports rkedge, and reads GGUF headers with rkedge's own reader (gguf-py). ``export_rkllm`` writes an rkedge simulated model (plus ``<stem>_lora.rkllm`` for a LoRA).

Test hooks: ``$RKEDGE_SIM_TOOLKIT_FAIL=step:kind[,step:kind]`` (step: import|load|build|export; kind: F-2,
F-7, F-8, F-9, F-14, fail, crash, hang, segfault, killed) forces a failure; ``$RKEDGE_SIM_TOOLKIT_RECORD=FILE``
appends ``{"method", "kwargs"}`` per call; ``$RKEDGE_SIM_TOOLKIT_PACE`` (seconds per progress tick) slows bars.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rkedge.convert.rules import DEFAULT_MAX_CONTEXT, GGUF_TYPES, MAX_CONTEXT_LIMIT, MAX_CONTEXT_MULTIPLE
from rkedge.failures import plan_rules, simulated_toolkit_text, vendor_text
from rkedge.versions import version_key

DEFAULT_VERSION = "1.3.0"
EXPORT_META = "rkedge_export.json"  # written by the host's export step (rkedge.convert.export)
_REQUIRED = object()
_UNSET = object()

# Parameter order and defaults. UNKNOWN (stand-in choice): the vendor's positional order and defaults are not
# documented beyond the manual's examples; rkedge always passes keywords.
LOAD_HF_PARAMS: tuple[tuple[str, Any], ...] = (
    ("model", _REQUIRED), ("model_lora", None), ("device", "cpu"), ("dtype", "float32"), ("custom_config", None),
    ("load_weight", True))
BUILD_PARAMS: tuple[tuple[str, Any], ...] = (
    ("do_quantization", True), ("optimization_level", 1), ("quantized_dtype", "w8a8"), ("target_platform", "rk3588"),
    ("quantized_algorithm", "normal"), ("num_npu_core", _UNSET), ("extra_qparams", None), ("dataset", None),
    ("hybrid_rate", 0.0), ("max_context", _UNSET))
EXPORT_PARAMS: tuple[tuple[str, Any], ...] = (
    ("export_path", _REQUIRED), ("export_tokenizer", True), ("export_embedding", True))

GGUF_READABLE = GGUF_TYPES  # fp16 and q4_0 only


def simulated_version() -> str:
    return os.environ.get("RKEDGE_SIM_TOOLKIT_VERSION") or DEFAULT_VERSION


def _injections() -> dict[str, str]:
    spec = os.environ.get("RKEDGE_SIM_TOOLKIT_FAIL", "")
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        step, _, kind = item.partition(":")
        out[step.strip()] = kind.strip() or "fail"
    return out


def _say(line: str) -> None:
    """The toolkit prints its INFO/ERROR lines on stdout."""
    print(line, flush=True)


def _fail(id: str, message: str) -> int:
    _say(simulated_toolkit_text(id, message))
    return -1


def _bar(desc: str, total: int) -> None:
    """A tqdm-like bar on stderr, updated with carriage returns as tqdm does."""
    pace = float(os.environ.get("RKEDGE_SIM_TOOLKIT_PACE") or 0)
    total = max(int(total), 1)
    for done in range(total + 1):
        filled = 10 * done // total
        sys.stderr.write(f"\r{desc}: {100 * done // total:3d}%|{'█' * filled}{' ' * (10 - filled)}| {done}/{total} "
                         f"[00:00<00:00, 100.00it/s]")
        sys.stderr.flush()
        if pace:
            time.sleep(pace)
    sys.stderr.write("\n")
    sys.stderr.flush()


def _record(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    path = os.environ.get("RKEDGE_SIM_TOOLKIT_RECORD")
    if not path:
        return
    row: dict[str, Any] = {"method": method, "kwargs": kwargs}
    if args:
        row["args"] = list(args)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, default=repr) + "\n")


def _bind(qualname: str, params: tuple[tuple[str, Any], ...], allowed: tuple[str, ...], args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> dict[str, Any]:
    """Binds arguments to the parameters this version has, raising TypeError with Python's own wording."""
    names = [name for name, _ in params if name in allowed]
    if len(args) > len(names):
        raise TypeError(f"{qualname}() takes {len(names) + 1} positional arguments but {len(args) + 1} were given")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{qualname}() got an unexpected keyword argument '{key}'")
        if key in bound:
            raise TypeError(f"{qualname}() got multiple values for argument '{key}'")
        bound[key] = value
    for name, default in params:
        if name in names and name not in bound:
            if default is _REQUIRED:
                raise TypeError(f"{qualname}() missing 1 required positional argument: '{name}'")
            bound[name] = default
    return bound


def _inject(step: str, context: dict[str, Any]) -> int | None:
    """Acts on ``$RKEDGE_SIM_TOOLKIT_FAIL`` for this step: returns -1, raises, hangs or dies."""
    kind = _injections().get(step)
    if kind is None:
        return None
    if kind == "F-2":
        return _dtype_refusal(context.get("platform", "rk3588"), context.get("dtype", "w4a16"), context["version"])
    if kind == "F-7":
        return _fail("F-7", f"max_context {context.get('max_context', 20000)} is out of range: at most "
                            f"{MAX_CONTEXT_LIMIT} and a multiple of {MAX_CONTEXT_MULTIPLE} (injected)")
    if kind == "F-8":
        _say(vendor_text("toolkit.F-8.not-support", arch=context.get("architecture") or "Gemma3ForCausalLM"))
        return -1
    if kind == "F-9":
        return _bitsandbytes_refusal()
    if kind == "F-14":
        raise NameError(vendor_text("toolkit.F-14.exit").partition("NameError: ")[2])
    if kind == "crash":
        raise RuntimeError(f"[rkedge simulated toolkit] injected crash in step {step}")
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind in ("segfault", "killed"):
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the output folder
        except (ImportError, ValueError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGSEGV if kind == "segfault" else signal.SIGKILL)
        time.sleep(10)
    return _fail("toolkit.injected", f"injected failure '{kind}' in step {step}")


def _dtype_refusal(platform: str, dtype: str, version: str) -> int:
    """F-2 in the vendor's words: 1.3.0 (rknn-llm#535), earlier (rknn-llm#186)."""
    if version_key(version) >= version_key("1.3.0"):
        _say(vendor_text("toolkit.F-2.1.3", platform=platform, dtype=dtype))
    else:
        if version_key(version) < version_key("1.2.0"):
            _say(simulated_toolkit_text("F-2", f"whether toolkit {version} refused {dtype} for {platform} at build "
                                               "time is not documented; the 1.2.x text follows"))
        _say(vendor_text("toolkit.F-2.1.2", platform=platform, dtype=dtype))
    return -1


def _bitsandbytes_refusal() -> int:
    """F-9 in the vendor's words (rknn-llm#212): the specific line, then the generic one."""
    _say(vendor_text("toolkit.F-9.bitsandbytes"))
    _say(vendor_text("toolkit.load-failed"))
    return -1


if "import" in _injections():  # F-14 and friends happen while importing rkllm.api
    _inject("import", {"version": simulated_version()})


def _sub_config(config: dict[str, Any], key: str) -> Any:
    value = config.get(key)
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get(key)
    return value


class RKLLM:
    """The simulated ``rkllm.api.RKLLM``: load_huggingface / load_gguf, build, export_rkllm."""

    def __init__(self) -> None:
        from rkedge.convert.rules import rules_for
        from rkedge.errors import InputError

        self.version = simulated_version()
        try:
            self.rules = rules_for(self.version)
        except InputError as exc:
            raise ValueError(f"[rkedge simulated toolkit] {exc.message}") from None
        self._model: dict[str, Any] | None = None
        self._build: dict[str, Any] | None = None
        _say(f"INFO: [rkedge simulated toolkit] rkllm-toolkit {self.version} (simulated: writes rkedge simulated "
             "models, no weights)")

    # -- load ------------------------------------------------------------------------------------------------

    def load_huggingface(self, *args: Any, **kwargs: Any) -> int:
        _record("load_huggingface", args, kwargs)
        bound = _bind("RKLLM.load_huggingface", LOAD_HF_PARAMS, self.rules.load_args, args, kwargs)
        self._model = self._build = None
        folder = Path(str(bound["model"]))
        config = self._read_json(folder / "config.json")
        if config is None:
            return _fail("toolkit.model", f"{folder} has no readable config.json (pass the Hugging Face model folder)")
        arch = (_sub_config(config, "architectures") or [None])[0]
        injected = _inject("load", {"version": self.version, "architecture": arch})
        if injected is not None:
            return injected
        for check in (self._check_arguments(bound), self._check_quantization(config),
                      self._check_architecture(config, arch)):
            if check is not None:
                return check
        lora: dict[str, Any] | None = None
        if bound.get("model_lora"):
            lora_dir = Path(str(bound["model_lora"]))
            adapter = self._read_json(lora_dir / "adapter_config.json")
            if adapter is None:
                return _fail("toolkit.lora", f"model_lora {lora_dir} has no readable adapter_config.json")
            lora = {"path": str(lora_dir), "name": lora_dir.name,
                    "base_model_name_or_path": adapter.get("base_model_name_or_path"), "r": adapter.get("r")}
        meta = self._read_json(folder / EXPORT_META) or {}
        shards = len(list(folder.glob("*.safetensors"))) or 1
        _bar("Loading checkpoint shards", shards)
        self._model = {"method": "load_huggingface", "kwargs": kwargs, "bound": bound, "path": str(folder),
                       "config": config, "architecture": arch, "meta": meta, "lora": lora, "gguf_type": None}
        return 0

    def load_gguf(self, *args: Any, **kwargs: Any) -> int:
        from rkedge.convert.architectures import find_spec
        from rkedge.convert.inspect import gguf_file_type_name, read_gguf_metadata
        from rkedge.errors import InputError

        _record("load_gguf", args, kwargs)
        if version_key(self.version) < version_key("1.1.0"):
            raise AttributeError("'RKLLM' object has no attribute 'load_gguf'")
        bound = _bind("RKLLM.load_gguf", (("model", _REQUIRED),), ("model",), args, kwargs)
        self._model = self._build = None
        injected = _inject("load", {"version": self.version})
        if injected is not None:
            return injected
        path = Path(str(bound["model"]))
        if not path.is_file():
            return _fail("toolkit.model", f"load_gguf needs a .gguf file path; {path} is not a file")
        try:
            metadata = read_gguf_metadata(path)
        except InputError as exc:
            return _fail("toolkit.model", f"{path} is not a readable GGUF file ({exc.message})")
        file_type = metadata.get("general.file_type")
        type_name = (gguf_file_type_name(file_type) or str(file_type)) if isinstance(file_type, int) else None
        if type_name is None:
            return _fail("toolkit.model", f"{path} has no general.file_type; the GGUF type cannot be checked")
        if type_name not in GGUF_READABLE:
            _say(vendor_text("toolkit.gguf.type", type=type_name))
            return -1
        gguf_arch = metadata.get("general.architecture")
        spec = find_spec(None, gguf_arch) if isinstance(gguf_arch, str) else None
        architecture = spec.architectures[0] if spec else gguf_arch
        config = {
            "architectures": [architecture], "model_type": gguf_arch,
            "hidden_size": metadata.get(f"{gguf_arch}.embedding_length"),
            "vocab_size": (metadata.get("tokenizer.ggml.tokens") or {}).get("array_length"),
            "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
            "num_hidden_layers": metadata.get(f"{gguf_arch}.block_count"),
        }
        self._model = {"method": "load_gguf", "kwargs": kwargs, "bound": bound, "path": str(path), "config": config,
                       "architecture": architecture, "meta": {}, "lora": None, "gguf_type": type_name}
        return 0

    # -- build -----------------------------------------------------------------------------------------------

    def build(self, *args: Any, **kwargs: Any) -> int:
        from rkedge.convert.rules import algorithm_stem

        _record("build", args, kwargs)
        bound = _bind("RKLLM.build", BUILD_PARAMS, self.rules.build_args, args, kwargs)
        self._build = None
        platform = str(bound["target_platform"]).lower()
        dtype = str(bound["quantized_dtype"]).lower()
        injected = _inject("build", {"version": self.version, "platform": platform, "dtype": dtype,
                                     "max_context": bound.get("max_context")})
        if injected is not None:
            return injected
        if self._model is None:
            return _fail("toolkit.sequence", "build() called before a successful load_huggingface()/load_gguf()")
        rules = self.rules
        gguf_type = self._model["gguf_type"]
        if gguf_type == "MOSTLY_F16" and bound["do_quantization"]:
            _say(vendor_text("toolkit.gguf.fp16-quantization"))
            return -1
        if gguf_type == "MOSTLY_Q4_0":
            dtype = GGUF_READABLE[gguf_type] or dtype  # a q4_0 GGUF is w4a16_g32 (manual section 3.1)
        if platform not in rules.dtypes:
            return _fail("toolkit.platform", f"target_platform {bound['target_platform']!r} is not supported by "
                                             f"rkllm-toolkit {self.version} (supported: {', '.join(rules.dtypes)})")
        if bound["do_quantization"] and dtype not in rules.dtypes[platform]:
            known = {d for dtypes in rules.dtypes.values() for d in dtypes}
            if dtype in known:
                return _dtype_refusal(platform, dtype, self.version)
            return _fail("toolkit.argument", f"quantized_dtype {bound['quantized_dtype']!r} is unknown to "
                                             f"rkllm-toolkit {self.version}")
        cores = bound.get("num_npu_core", _UNSET)
        if cores is _UNSET:
            cores = max(rules.npu_cores.get(platform) or {"rk3588": (3,), "rk3576": (2,)}.get(platform, (1,)))
        elif cores not in rules.npu_cores.get(platform, ()):
            return _fail("toolkit.argument", f"num_npu_core {cores!r} is not valid for {platform} (valid: "
                                             f"{', '.join(map(str, rules.npu_cores.get(platform, ())))})")
        if bound["optimization_level"] not in (0, 1) or isinstance(bound["optimization_level"], bool):
            return _fail("toolkit.argument", f"optimization_level must be 0 or 1, not {bound['optimization_level']!r}")
        hybrid = bound.get("hybrid_rate", 0.0)
        if not isinstance(hybrid, (int, float)) or isinstance(hybrid, bool) or not 0 <= hybrid < 1:
            return _fail("toolkit.argument", f"hybrid_rate must be in [0, 1), not {hybrid!r}")
        algorithm = str(bound.get("quantized_algorithm") or "normal")
        accuracy_rank: int | None = None
        if "quantized_algorithm" in rules.build_args:
            stem, accuracy_rank = algorithm_stem(algorithm)
            if accuracy_rank is not None and (stem not in rules.accuracy_lora or not 1 <= accuracy_rank <= 64):
                return _fail("toolkit.algorithm", f"quantized_algorithm {algorithm!r} is not supported by "
                                                  f"rkllm-toolkit {self.version} (_r1.._r64 variants: "
                                                  f"{', '.join(rules.accuracy_lora) or 'none before 1.2.1'})")
            spec = rules.algorithms.get(stem)
            if spec is None:
                return _fail("toolkit.algorithm", f"quantized_algorithm {algorithm!r} is not supported by "
                                                  f"rkllm-toolkit {self.version} ({', '.join(rules.algorithms)})")
            if spec.dtypes is not None and dtype not in spec.dtypes:
                return _fail("toolkit.algorithm", f"quantized_algorithm {stem} works with {', '.join(spec.dtypes)} "
                                                  f"only, not {dtype}")
            if spec.needs_cuda and self._model["bound"].get("device") != "cuda":
                return _fail("toolkit.algorithm", f"quantized_algorithm {stem} needs a GPU: load with device='cuda'")
            if accuracy_rank is not None and self._model["lora"] is not None:
                return _fail("toolkit.lora", f"{algorithm} writes its own _lora.rkllm; rkedge does not combine it "
                                             "with model_lora (the vendor's behaviour for both is not documented)")
        max_context = bound.get("max_context", _UNSET)
        if "max_context" in rules.build_args:
            if max_context is _UNSET or max_context is None:
                max_context = DEFAULT_MAX_CONTEXT  # the toolkit's default (rknn-llm#220)
                _say(vendor_text("toolkit.F-7.default-limit", limit=max_context))
            elif not isinstance(max_context, int) or isinstance(max_context, bool) \
                    or not 0 < max_context <= MAX_CONTEXT_LIMIT or max_context % MAX_CONTEXT_MULTIPLE:
                return _fail("F-7", f"max_context {max_context!r} must be at most {MAX_CONTEXT_LIMIT} and a multiple "
                                    f"of {MAX_CONTEXT_MULTIPLE} (manual: \"最大支持到 16384 且必须按 32 对齐\")")
        else:
            max_context = DEFAULT_MAX_CONTEXT  # 1.0.x/1.1.x models always report 4096 (rknn-llm#290)
        if bound.get("dataset") is not None:
            problem = _check_dataset(bound["dataset"])
            if problem:
                return _fail("calibration", problem)
        layers = _sub_config(self._model["config"], "num_hidden_layers") or 12
        if bound["optimization_level"] == 1:
            _bar("Optimizing model", layers)
        _bar("Building model", layers)
        self._build = {"kwargs": kwargs, "bound": bound, "platform": platform,
                       "dtype": dtype if bound["do_quantization"] else "fp16", "npu_cores": cores,
                       "max_context": max_context, "hybrid_rate": hybrid, "algorithm": algorithm,
                       "accuracy_rank": accuracy_rank, "old_context": version_key(self.version) < version_key("1.2.0")}
        return 0

    # -- export ----------------------------------------------------------------------------------------------

    def export_rkllm(self, *args: Any, **kwargs: Any) -> int:
        from rkedge.runtime.simmodel import simulated_manifest, write_simulated_lora, write_simulated_model

        _record("export_rkllm", args, kwargs)
        bound = _bind("RKLLM.export_rkllm", EXPORT_PARAMS, self.rules.export_args, args, kwargs)
        injected = _inject("export", {"version": self.version})
        if injected is not None:
            return injected
        if self._model is None or self._build is None:
            return _fail("toolkit.sequence", "export_rkllm() called before a successful build()")
        target = Path(str(bound["export_path"]))
        if target.is_dir():
            return _fail("toolkit.argument", f"export_path {target} is a folder; pass a file path")
        model, build = self._model, self._build
        config, meta = model["config"], model["meta"]
        stem = target.stem
        lora_path = target.with_name(f"{stem}_lora.rkllm")
        fields = self._manifest_fields(stem)
        extra: dict[str, Any] = {
            "simulated_toolkit": {"version": self.version, "note": "written by rkedge's simulated rkllm-toolkit"},
            # The checkpoint's own Jinja template and special-token texts, so LLM renders a family-less template
            # as on hardware, where the manifest carries them. UNKNOWN: whether the vendor file embeds the raw
            # Jinja; rkedge's runtime does not rely on it (it reads the manifest).
            "jinja_chat_template": meta.get("jinja_chat_template"),
            "special_tokens": meta.get("special_tokens") or None,
            "source_name": meta.get("name") or model["path"],
            "source_sha256": meta.get("source_sha256"),
            "load_method": model["method"], "load_kwargs": model["kwargs"],
            "build_kwargs": build["kwargs"], "export_kwargs": kwargs,
            "hybrid_rate": build["hybrid_rate"], "algorithm": build["algorithm"],
            "optimization_level": build["bound"]["optimization_level"],
            "do_quantization": build["bound"]["do_quantization"],
        }
        for option in ("export_tokenizer", "export_embedding"):  # 1.3.0+ only
            if option in bound:
                extra[option] = bound[option]
        eos = _sub_config(config, "eos_token_id")
        if isinstance(meta.get("eos_token_id"), list) or isinstance(eos, list):
            extra["eos_token_ids"] = meta.get("eos_token_id") if "eos_token_id" in meta else eos
        failures = self._known_failures(fields["architecture"])
        if failures:
            fields["faults"] = {k: v for f in failures for k, v in f.board_fault.items()}
            extra["known_failures"] = [f.id for f in failures]
        if model["lora"] is not None:
            extra["lora"] = {"file": lora_path.name, "kind": "adapter", **model["lora"]}
        elif build["accuracy_rank"] is not None:
            extra["lora"] = {"file": lora_path.name, "kind": "accuracy-lora", "algorithm": build["algorithm"],
                             "rank": build["accuracy_rank"]}
        manifest = simulated_manifest(extra=extra, **fields)
        if "lora" in extra:
            lora = extra["lora"]
            write_simulated_lora(lora_path, model_id=manifest["model_id"],
                                 name=lora.get("name") or f"{stem}_lora",
                                 extra={"kind": lora["kind"], "toolkit_version": self.version,
                                        "platform": build["platform"], "dtype": build["dtype"]})
        _bar("Exporting model", 4)
        write_simulated_model(target, manifest)  # last: the model file existing means the export finished
        _say(f"INFO: [rkedge simulated toolkit] exported {target}" + (f" and {lora_path.name}" if "lora" in extra
                                                                       else ""))
        return 0

    # -- helpers ---------------------------------------------------------------------------------------------

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _check_arguments(self, bound: dict[str, Any]) -> int | None:
        if "device" in bound and bound["device"] not in ("cpu", "cuda"):
            return _fail("toolkit.argument", f"device must be 'cpu' or 'cuda', not {bound['device']!r}")
        if "dtype" in bound and bound["dtype"] not in ("float32", "float16", "bfloat16"):
            return _fail("toolkit.argument", f"dtype must be float32, float16 or bfloat16, not {bound['dtype']!r}")
        custom = bound.get("custom_config")
        if custom is not None and not (isinstance(custom, str) and Path(custom).is_file()):
            # CNC passed a dict and had to switch to a JSON file path (manual section 3.1.6).
            return _fail("toolkit.argument", f"custom_config must be the path of a JSON file, not {custom!r}")
        return None

    def _check_quantization(self, config: dict[str, Any]) -> int | None:
        from rkedge.convert.rules import GPTQ

        quant = config.get("quantization_config")
        if not isinstance(quant, dict):
            return None
        method = str(quant.get("quant_method", "")).lower()
        if method == "bitsandbytes" or quant.get("load_in_4bit") or quant.get("load_in_8bit"):
            return _bitsandbytes_refusal()
        if method == "gptq":
            bits = quant.get("bits")
            rule = GPTQ.get(bits) if isinstance(bits, int) else None
            if rule is None or version_key(self.version) < version_key(str(rule["since"])) \
                    or quant.get("group_size") not in rule["group_sizes"] or quant.get("sym") is False \
                    or quant.get("desc_act"):
                settings = {k: quant.get(k) for k in ("bits", "group_size", "sym", "desc_act")}
                return _fail("F-9", f"GPTQ settings {settings} are not readable by rkllm-toolkit {self.version} "
                                    "(manual section 3.1.5: sym, no desc_act, 4-bit 32/64/128 from 1.1.4, 8-bit "
                                    "128/256/512 from 1.2.0)")
            return None
        return _fail("F-9", f"quantization_config quant_method {method or '?'!r} cannot be read (only GPTQ is)")

    def _check_architecture(self, config: dict[str, Any], arch: str | None) -> int | None:
        from rkedge.convert.architectures import find_refused, find_spec

        model_type = _sub_config(config, "model_type")
        if arch == "Gemma3ForConditionalGeneration" and version_key(self.version) >= version_key("1.2.0"):
            _say(vendor_text("toolkit.F-8.gemma3-multimodal"))
            return -1
        spec = find_spec(arch, model_type)
        if spec is None or find_refused(arch, model_type) is not None:
            # Custom models (1.2.0+, RMSNorm decoders with custom_config, manual 3.1.6) are not simulated.
            return _fail("F-8", f"architecture {arch or model_type or '?'} is in no rkllm-toolkit model list")
        if version_key(self.version) < version_key(spec.since):
            if spec.family == "Gemma4" and version_key(self.version) == version_key("1.2.3"):
                # UNKNOWN: the sizes are those of the report (rknn-llm#495/#496), not computed from the model.
                _say(vendor_text("toolkit.F-8.tensor-size", a=2048, b=4096))
                return -1
            _say(vendor_text("toolkit.F-8.not-support", arch=arch))  # Gemma3ForCausalLM on 1.1.4: rknn-llm#220
            return -1
        if plan_rules("config", toolkit_version=self.version, config=config):  # Llama 3 rope_scaling on 1.0.x
            _say(vendor_text("toolkit.F-8.rope-scaling", rope=config.get("rope_scaling")))
            return -1
        return None

    def _manifest_fields(self, stem: str) -> dict[str, Any]:
        model, build = self._model, self._build
        assert model is not None and build is not None
        config, meta = model["config"], model["meta"]
        family = meta.get("chat_family")
        template = meta.get("chat_template")
        if not isinstance(template, dict) and family:
            try:
                from rkedge.runtime.templates import get_template

                template = dict(zip(("system_prompt", "prompt_prefix", "prompt_postfix"),
                                    get_template(family).runtime_parts()))
            except Exception:
                template = None

        def first(*values: Any) -> Any:
            for value in values:
                if value is not None:
                    return value[0] if isinstance(value, list) and value else value
            return None

        return {
            "name": stem,
            "architecture": model["architecture"] or "unknown",
            "toolkit_version": self.version,
            "platform": build["platform"],
            "dtype": build["dtype"],
            "npu_cores": build["npu_cores"],
            "max_context_limit": DEFAULT_MAX_CONTEXT if build["old_context"] else build["max_context"],
            "vocab_size": first(_sub_config(config, "vocab_size"), 32000),
            "hidden_size": first(_sub_config(config, "hidden_size"), 64),
            "chat_family": family,
            "chat_template": template if isinstance(template, dict) else None,
            "bos_token_id": first(meta.get("bos_token_id"), _sub_config(config, "bos_token_id")),
            "eos_token_id": first(meta.get("eos_token_id"), _sub_config(config, "eos_token_id")),
        }

    def _known_failures(self, architecture: str) -> list[Any]:
        from rkedge.failures import plan_rules

        build = self._build
        assert build is not None
        return plan_rules("board-failure", architecture=architecture, platform=build["platform"],
                          toolkit_version=self.version, dtype=build["dtype"], hybrid_rate=build["hybrid_rate"])


def _check_dataset(dataset: Any) -> str | None:
    """What is wrong with a calibration file (a JSON list of {"input", "target"} objects), or None."""
    path = Path(str(dataset))
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return f"dataset {path} cannot be read ({exc.strerror or exc})"
    except ValueError as exc:
        return f"dataset {path} is not valid JSON ({exc})"
    if not isinstance(items, list) or not items:
        return f"dataset {path} must be a non-empty JSON list of {{\"input\": ..., \"target\": ...}} objects"
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("input"), str) \
                or not isinstance(item.get("target"), str):
            return f"dataset {path} item {index} is not an object with string \"input\" and \"target\""
    return None
