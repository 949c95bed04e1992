"""The planner: a conversion request checked against everything known to fail, before any heavy work.

``plan()`` reads the rules tables (``rules``), the architecture registry, the known-failure table, the
checkpoint's headers, the adapter, the calibration prompts and the board profile, and returns every finding
plus the exact toolkit job (:class:`ToolkitJob`). The job's paths are symbolic (:class:`Input`) until the
pipeline binds them once, so what ``--dry-run`` shows is what runs. The output file name and the manifest are
derived from the job's arguments, so a parameter can only appear in a name if it reached ``build()``.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rkedge import failures, fit
from rkedge.convert import architectures, host
from rkedge.convert import calibration as calib
from rkedge.convert.bnb import (
    SourceQuantization,
    base_model_name,
    dequantized_dtype,
    dequantized_view,
    quality_warning,
    quantization_from_config,
    quantized_weights,
)
from rkedge.convert.chat_family import ChatSetup, chat_setup
from rkedge.convert.estimate import GIB
from rkedge.convert.findings import Finding, Severity
from rkedge.convert.inspect import CheckpointInfo
from rkedge.convert.rules import (
    DEFAULT_MAX_CONTEXT,
    GGUF_TYPES,
    GPTQ,
    HOST_BYTES_PER_PARAM,
    HOST_BYTES_PER_PARAM_BEFORE,
    HOST_MEMORY_MARGIN,
    MAX_CONTEXT_LIMIT,
    MAX_CONTEXT_MULTIPLE,
    OPTIMIZATION_LEVELS,
    OPTIMIZATION_SPEED_WARNING_SINCE,
    RUNTIME_LORA_WEAK_VERSIONS,
    TOOLKIT_VERSIONS,
    ToolkitRules,
    algorithm_stem,
    group_size,
    rules_for,
    version_key,
)
from rkedge.errors import InputError

if TYPE_CHECKING:
    from rkedge.convert.perf_model import Prediction
    from rkedge.lora.adapter import AdapterInfo

S3 = "converter-anchors-and-failure-modes.md section 3"


@dataclass
class ConversionRequest:
    """What the user asked for (``rkedge convert`` options)."""

    model: Path
    out: Path
    platform: str = "rk3588"
    dtype: str = "w8a8"
    toolkit_version: str | None = None
    max_context: int | None = None
    npu_cores: int | None = None
    algorithm: str = "normal"
    hybrid_rate: float = 0.0
    optimization_level: int = 0
    calibration: str | None = "auto"
    lora: Path | None = None
    lora_mode: Literal["merge", "runtime"] = "merge"
    board: str | None = None
    toolkit: str | None = None
    load_dtype: str | None = None
    device: str = "cpu"
    allow_known_failure: bool = False
    allow_base_mismatch: bool = False  # an adapter naming another base whose shapes fit: a warning, not an error
    name: str | None = None
    cuda_available: bool | None = None

    def normalized(self) -> ConversionRequest:
        """A copy with the case-insensitive options lower-cased (the request itself is left alone)."""
        return dataclasses.replace(self, platform=self.platform.lower(), dtype=self.dtype.lower(),
                                   algorithm=self.algorithm.lower())


class Input(enum.Enum):
    """A path the toolkit job needs that exists only once the pipeline's steps have run."""

    EXPORTED = "exported"  # the exported checkpoint folder (load_huggingface model=)
    ADAPTER = "adapter"  # the LoRA adapter folder, converted for the runtime (model_lora=)
    CALIBRATION = "calibration"  # the calibration dataset file (build dataset=)
    OUTPUT = "output"  # the .rkllm the toolkit writes (export_rkllm export_path=)

    def __repr__(self) -> str:
        return f"<{self.value}>"

    __str__ = __repr__


@dataclass(frozen=True)
class ToolkitJob:
    """load -> build -> export_rkllm with the keyword arguments the toolkit receives; paths may be :class:`Input`."""

    load_method: str
    load_kwargs: Mapping[str, Any]
    build_kwargs: Mapping[str, Any]
    export_kwargs: Mapping[str, Any]

    @property
    def inputs(self) -> set[Input]:
        return {v for kwargs in self._sections() for v in kwargs.values() if isinstance(v, Input)}

    def bind(self, paths: Mapping[Input, str | Path]) -> ToolkitJob:
        """The same job with every :class:`Input` replaced by its path (as given: resolve them first if needed)."""
        missing = self.inputs - set(paths)
        if missing:
            raise KeyError(f"the toolkit job needs {', '.join(sorted(str(m) for m in missing))}")

        def bound(kwargs: Mapping[str, Any]) -> dict[str, Any]:
            return {k: str(paths[v]) if isinstance(v, Input) else v for k, v in kwargs.items()}

        return ToolkitJob(self.load_method, *(bound(kwargs) for kwargs in self._sections()))

    def calls(self) -> dict[str, dict[str, Any]]:
        """``{method: kwargs}`` in call order, as the manifest records them."""
        return {self.load_method: dict(self.load_kwargs), "build": dict(self.build_kwargs),
                "export_rkllm": dict(self.export_kwargs)}

    def worker_job(self) -> dict[str, Any]:
        """The job file of the toolkit worker (a bound job only)."""
        from rkedge.convert.toolkit import build_job

        if self.inputs:
            raise ValueError("bind the job's inputs first")
        return build_job(load_method=self.load_method, load_kwargs=self.load_kwargs, build_kwargs=self.build_kwargs,
                         export_kwargs=self.export_kwargs)

    def render(self) -> str:
        """One line per toolkit call, inputs shown symbolically (``--dry-run``)."""
        return "\n".join(f"{method}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
                         for method, kwargs in self.calls().items())

    def _sections(self) -> tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]:
        return self.load_kwargs, self.build_kwargs, self.export_kwargs


@dataclass
class Plan:
    request: ConversionRequest  # normalized
    toolkit_version: str
    findings: list[Finding]
    job: ToolkitJob
    output_name: str
    arch: architectures.ArchSpec | None
    size: Prediction | None = None
    chat: ChatSetup | None = None
    adapter: AdapterInfo | None = None
    calibration: list[dict[str, Any]] = field(default_factory=list)  # the prompts / items, as loaded
    notes: list[str] = field(default_factory=list)
    #: A bitsandbytes source rkedge dequantizes before anything else (None for a float checkpoint).
    source_quantization: SourceQuantization | None = None

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def merges_adapter(self) -> bool:
        return self.adapter is not None and self.request.lora_mode == "merge"

    @property
    def dequantizes(self) -> bool:
        return self.source_quantization is not None

    @property
    def steps(self) -> list[str]:
        """The pipeline's steps for this plan, in order."""
        return [*(["dequantize"] if self.dequantizes else []), *(["merge"] if self.merges_adapter else []),
                "export", "calibration", "quantize"]

    @property
    def load_method(self) -> str:
        return self.job.load_method

    @property
    def load_kwargs(self) -> Mapping[str, Any]:
        return self.job.load_kwargs

    @property
    def build_kwargs(self) -> Mapping[str, Any]:
        return self.job.build_kwargs

    @property
    def export_kwargs(self) -> Mapping[str, Any]:
        return self.job.export_kwargs


def output_name(base: str, build_kwargs: dict[str, Any]) -> str:
    """``<name>_<dtype>_<platform>.rkllm`` from the arguments build() actually receives."""
    dtype = str(build_kwargs.get("quantized_dtype", "w8a8")).lower()
    platform = str(build_kwargs.get("target_platform", "rk3588")).lower()
    return f"{base}_{dtype}_{platform}.rkllm"


def default_name(request: ConversionRequest, info: CheckpointInfo | None) -> str:
    """``--name``, else the model's name; a merged LoRA adds the adapter's folder name, so a LoRA convert into
    the folder of a plain one writes beside the base model instead of replacing it (a runtime LoRA keeps the
    base's name: its .rkllm is the plain base model, and the adapter is the separate ``_lora`` file)."""
    if request.name:
        return request.name
    source = (info.source_name if info else None) or request.model.name
    name = Path(source.rstrip("/")).name.replace(" ", "-") or "model"
    if request.lora is not None and request.lora_mode == "merge":
        name += "-" + request.lora.resolve().name.replace(" ", "-")
    return name


def refusal(info: CheckpointInfo) -> Finding | None:
    """An architecture no rkllm-toolkit version converts (with somewhere else to go): it stands in the way before
    any missing toolkit does."""
    refused = architectures.find_refused(info.architecture, info.model_type)
    if refused is None or not refused.alternatives:
        return None
    return Finding("architecture.refused", "error", f"{info.architecture or info.model_type}: {refused.reason}.",
                   refused.fix, "rkedge.failures (refused architectures)")


def plan(request: ConversionRequest, info: CheckpointInfo, toolkit_version: str, *,
         toolkit_python: str | None = None, host_memory: tuple[int, int] | None = None,
         simulated_toolkit: bool = False) -> Plan:
    """Checks ``request`` for ``info`` on ``toolkit_version``; returns findings and the toolkit job.

    ``host_memory``: (available, swap) bytes, default this host's. Raises InputError for inputs that cannot be
    read at all (a missing calibration file, an adapter folder without adapter_config.json). A bitsandbytes
    checkpoint is planned as the float checkpoint its dequantization writes (``bnb.dequantized_view``).
    """
    request = request.normalized()
    stored, info = info, dequantized_view(info)
    dequantized = quantization_from_config(info.config) if info is not stored else None
    findings: list[Finding] = []
    try:
        rules = rules_for(toolkit_version)
    except Exception as exc:  # InputError: unknown version
        findings.append(Finding("toolkit.version", "error", str(exc), getattr(exc, "fix", None), S3))
        return Plan(request, toolkit_version, findings, ToolkitJob("load_huggingface", {}, {}, {}), "", None)

    spec, arch_findings = architectures.check_architecture(info.config, toolkit_version)
    findings += arch_findings
    findings += _check_vision_language(info)
    findings += _check_platform_dtype(request, rules, toolkit_version)
    findings += _check_algorithm(request, rules, toolkit_version)
    findings += _check_cores_context_hybrid(request, rules, toolkit_version)
    findings += _check_quantization_config(stored, request, toolkit_version)
    findings += _check_weights(info)
    findings += _check_name(request)
    findings += _check_group_sizes(info, request)
    findings += _check_known_failures(info, request, toolkit_version)
    findings += _check_python(rules, spec, toolkit_python, toolkit_version)
    findings += _check_lora_mode(request, rules, toolkit_version)
    if not info.tokenizer_files:
        findings.append(Finding("tokenizer.missing", "warning",
                                f"{info.path} has no tokenizer files; the toolkit embeds the tokenizer in the .rkllm.",
                                "copy tokenizer.json / tokenizer_config.json from the base model", S3))
    elif not info.chat_template:
        findings.append(Finding("tokenizer.no-chat-template", "warning",
                                "the tokenizer has no chat template; the .rkllm gets none and chat output may be "
                                "garbage (F-16, rknn-llm#240)", "add the base model's chat template", "F-16"))
    adapter, adapter_findings = _check_adapter(request, info if dequantized else None)
    findings += adapter_findings
    chat = chat_setup(info)
    if chat.own_template:
        from rkedge.runtime.templates import TEMPLATES

        findings.append(Finding("chat.unknown-template", "warning",
                                f"the chat template matches none of rkedge's families ({', '.join(TEMPLATES)}); the "
                                "manifest records it and the runtime renders it with Jinja, as transformers does "
                                "(system prompt and history included). A runtime older than rkedge's Jinja renderer "
                                "would fall back on the template embedded in the .rkllm.",
                                "nothing to do with this rkedge; check a reply with `rkedge chat` after converting",
                                "issue 11 item 12"))
    items = calib.load_prompts(request.calibration)
    findings += calib.lint(calib.preview(items, chat.render), chat.turn_marker)

    job = ToolkitJob("load_huggingface", _load_kwargs(request, rules), _build_kwargs(request, rules),
                     {"export_path": Input.OUTPUT})
    name = output_name(default_name(request, info), dict(job.build_kwargs))
    size = None
    if info.tensors and spec is not None:
        from rkedge.convert.perf_model import ModelShape, predict

        context = job.build_kwargs.get("max_context", DEFAULT_MAX_CONTEXT)
        dtype = request.dtype if request.dtype.split("_")[0] in ("w8a8", "w4a16", "w4a8") else "w8a8"
        size = predict(ModelShape.from_tensors(info.config, info.tensors), dtype, context)
        findings += _check_board_fit(request, size)
        if not simulated_toolkit:
            request, memory_findings = _fit_load_dtype(info, request, rules, toolkit_version, host_memory)
            findings += memory_findings
            job = ToolkitJob("load_huggingface", _load_kwargs(request, rules), _build_kwargs(request, rules),
                             {"export_path": Input.OUTPUT})
    return Plan(request, toolkit_version, findings, job, name, spec, size, chat=chat, adapter=adapter,
                calibration=items, source_quantization=dequantized)


def plan_gguf(request: ConversionRequest, gguf: Mapping[str, Any]) -> Plan:
    """A GGUF input: only q4_0 (= w4a16_g32) and fp16 are readable (manual 3.2; rknn-llm#312)."""
    request = request.normalized()
    version = request.toolkit_version or TOOLKIT_VERSIONS[-1]
    file_type = gguf.get("file_type")
    findings: list[Finding] = []
    if file_type not in GGUF_TYPES:
        findings.append(Finding("gguf.type", "error",
                                f"GGUF type {file_type} is not readable by rkllm-toolkit (only q4_0 and fp16; e.g. "
                                f"'Not support GGMLQuantizationType: {file_type}!').",
                                "convert from the Hugging Face checkpoint instead", "section 3.2; rknn-llm#312"))
    implied = GGUF_TYPES.get(str(file_type))
    try:
        allowed = rules_for(version).dtypes.get(request.platform, ())
    except InputError:
        allowed = ()
    if implied is not None and implied not in allowed:
        findings.append(Finding("F-2", "error", f"a {file_type} GGUF is {implied}, which {request.platform.upper()} "
                                "does not run.", "convert the Hugging Face checkpoint with --dtype w8a8", "F-2"))
    job = ToolkitJob("load_gguf", {"model": str(request.model)}, {}, {"export_path": Input.OUTPUT})
    return Plan(request, request.toolkit_version or "?", findings, job,
                f"{request.model.stem}_{request.dtype}_{request.platform}.rkllm", None)


def _check_adapter(request: ConversionRequest,
                   dequantized: CheckpointInfo | None = None) -> tuple[AdapterInfo | None, list[Finding]]:
    """The adapter and what stands between it and the base model (rank, targets, shapes, base name).
    ``dequantized``: the planner's view of a bitsandbytes base, whose dequantized weights the LoRA is merged into
    (so it is checked against those shapes, and the base counts as not quantized)."""
    if request.lora is None:
        return None, []
    from rkedge.lora.adapter import check_adapter, inspect_adapter, read_base_checkpoint

    adapter = inspect_adapter(request.lora)
    base = read_base_checkpoint(request.model)
    if dequantized is not None:
        base = dataclasses.replace(base, tensors=dequantized.tensors, config={
            k: v for k, v in base.config.items() if k != "quantization_config"})
    return adapter, check_adapter(adapter, base, allow_base_mismatch=request.allow_base_mismatch)


# --- individual checks --------------------------------------------------------------------------------------

def _check_vision_language(info: CheckpointInfo) -> list[Finding]:
    """A vision-language checkpoint planned as a plain LLM (a dry run, or a direct caller of the pipeline): say
    that the toolkit step takes only its language model and that `rkedge convert` runs the VLM path."""
    from rkedge.convert.vlm.families import vlm_family

    family = vlm_family(info.config)
    if family is None:
        return []
    return [Finding("vlm.llm-only", "warning",
                    f"{info.path} is a vision-language model ({family.key}): the toolkit step converts only its "
                    f"language model (saved alone as {family.llm_architecture}); the vision encoder is built "
                    "with rknn-toolkit2.",
                    "run `rkedge convert` without --dry-run to convert both (the .rkllm, the vision .rknn and "
                    "vlm.json)", "convert/vlm/families.py")]


def _check_platform_dtype(request: ConversionRequest, rules: ToolkitRules, version: str) -> list[Finding]:
    platform, dtype = request.platform, request.dtype
    if platform not in rules.dtypes:
        return [Finding("platform.unknown", "error",
                        f"target platform {platform!r} is not supported by rkllm-toolkit {version} "
                        f"(supported: {', '.join(rules.dtypes)}).", "use --platform rk3588 for RK3588/RK3588S boards",
                        S3 + ".1")]
    allowed = rules.dtypes[platform]
    if dtype in allowed:
        note = rules.notes.get(platform)
        return [Finding("platform.dtype-list", "warning", note, None, S3 + ".1")] if note else []
    if dtype.startswith("w4a16") and platform == "rk3588":
        return [Finding("F-2", "error",
                        f"{dtype} is not supported on RK3588 by any rkllm-toolkit version (toolkit 1.3.0 refuses it: "
                        f"'ERROR: target_platform: rk3588 not support quantized_dtype: {dtype.split('_')[0]}!').",
                        f"use --dtype w8a8 (or a grouped w8a8: {', '.join(allowed[1:])}); w4a16 exists on RK3576",
                        "F-2: manuals 1.0.0-1.3.0; rknn-llm#107, #186, #535")]
    return [Finding("dtype.platform", "error",
                    f"quantized_dtype {dtype!r} is not available for {platform} in rkllm-toolkit {version}.",
                    f"use one of: {', '.join(allowed)}", S3 + ".1")]


def _check_algorithm(request: ConversionRequest, rules: ToolkitRules, version: str) -> list[Finding]:
    stem, rank = algorithm_stem(request.algorithm)
    if not rules.algorithms:
        if request.algorithm != "normal":
            return [Finding("algorithm.version", "error",
                            f"rkllm-toolkit {version} has no quantized_algorithm argument.",
                            "drop --algorithm, or use toolkit 1.1.0+", S3 + ".2")]
        return []
    if rank is not None and stem not in rules.accuracy_lora:
        return [Finding("algorithm.unknown", "error",
                        f"quantized_algorithm {request.algorithm!r} does not exist in rkllm-toolkit {version}"
                        f" (accuracy-LoRA variants: {', '.join(s + '_rN' for s in rules.accuracy_lora) or 'none'}).",
                        "use --algorithm normal", S3 + ".2")]
    if rank is not None and not 1 <= rank <= 64:
        return [Finding("algorithm.rank", "error", f"{request.algorithm}: the rank N of _rN must be 1..64.",
                        "use e.g. normal_r16", S3 + ".2")]
    rule = rules.algorithms.get(stem)
    if rule is None:
        return [Finding("algorithm.unknown", "error",
                        f"quantized_algorithm {stem!r} does not exist in rkllm-toolkit {version} "
                        f"(available: {', '.join(rules.algorithms)}).", "use --algorithm normal", S3 + ".2")]
    findings: list[Finding] = []
    if rule.dtypes is not None and request.dtype not in rule.dtypes:
        findings.append(Finding("algorithm.dtype", "error",
                                f"{stem} quantization only works with the w4a16 family, not {request.dtype}.",
                                "use --algorithm normal", S3 + ".2"))
    if rule.needs_cuda:
        cuda = request.cuda_available if request.cuda_available is not None else host.cuda_present()
        if not cuda:
            findings.append(Finding("algorithm.cuda", "error", f"{stem} quantization needs a CUDA GPU on the host.",
                                    "use --algorithm normal, or run the conversion on a machine with an NVIDIA GPU",
                                    S3 + ".2"))
    if rank is not None:
        findings.append(Finding("algorithm.accuracy-lora", "info",
                                f"{request.algorithm} also exports an accuracy LoRA (<name>_lora.rkllm) that the runtime "
                                "must load with the model", None, S3 + ".2"))
    return findings


def _check_cores_context_hybrid(request: ConversionRequest, rules: ToolkitRules, version: str) -> list[Finding]:
    findings: list[Finding] = []
    if request.npu_cores is not None:
        if "num_npu_core" not in rules.build_args:
            findings.append(Finding("npu_cores.version", "error",
                                    f"num_npu_core is a runtime setting in toolkit {version}, not a build argument.",
                                    "drop --npu-cores", S3 + ".2"))
        elif request.npu_cores not in rules.npu_cores.get(request.platform, ()):
            findings.append(Finding("npu_cores.range", "error",
                                    f"{request.platform} takes num_npu_core in {rules.npu_cores.get(request.platform)}, "
                                    f"not {request.npu_cores}.", "RK3588 has 3 NPU cores: use --npu-cores 3", S3 + ".2"))
    if request.max_context is not None:
        if not rules.max_context_settable:
            findings.append(Finding("F-7", "error",
                                    f"toolkit {version} cannot set max_context: its models carry max_context_limit "
                                    f"4096, and a runtime asked for more fails with 'max_context[N] must be less than "
                                    "the model's max_context_limit[4096]'.",
                                    "drop --max-context (4096), or use toolkit 1.2.0+", "F-7; rkllama#60, #64"))
        elif request.max_context > MAX_CONTEXT_LIMIT or request.max_context % MAX_CONTEXT_MULTIPLE or \
                request.max_context <= 0:
            nearest = min(MAX_CONTEXT_LIMIT, max(MAX_CONTEXT_MULTIPLE, -(-request.max_context // 32) * 32))
            findings.append(Finding("F-7", "error",
                                    f"max_context {request.max_context} is invalid: the toolkit allows at most "
                                    f"{MAX_CONTEXT_LIMIT}, in multiples of {MAX_CONTEXT_MULTIPLE} (manual 1.2.0+).",
                                    f"use --max-context {nearest}", "F-7; manual 1.2.0 section 3.1"))
    if request.hybrid_rate:
        if "hybrid_rate" not in rules.build_args:
            findings.append(Finding("hybrid.version", "error", f"toolkit {version} has no hybrid_rate.",
                                    "drop --hybrid-rate", S3 + ".2"))
        elif not 0 <= request.hybrid_rate < 1:
            findings.append(Finding("hybrid.range", "error",
                                    f"hybrid_rate must be in [0, 1), not {request.hybrid_rate} (some converters accept "
                                    "1.0 and drop it silently).", "use a value such as 0.25", S3 + ".2"))
    elif request.hybrid_rate < 0:
        findings.append(Finding("hybrid.range", "error", "hybrid_rate must be in [0, 1).", None, S3 + ".2"))
    if request.optimization_level not in OPTIMIZATION_LEVELS:
        findings.append(Finding("optimization.range", "error",
                                f"optimization_level must be 0 or 1, not {request.optimization_level}.", None, S3 + ".2"))
    elif request.optimization_level == 1 and version_key(version) >= version_key(OPTIMIZATION_SPEED_WARNING_SINCE):
        findings.append(Finding("optimization.speed", "warning",
                                "optimization_level 1 trades runtime speed for accuracy; Rockchip's benchmarks "
                                "convert with 0 ('to enable optimized runtime performance').",
                                "use --optimization-level 0 unless accuracy needs it", "benchmark.md (v1.2.1+)"))
    return findings


def _check_quantization_config(info: CheckpointInfo, request: ConversionRequest, version: str) -> list[Finding]:
    qc = info.quantization_config
    if not qc:
        return []
    method = str(qc.get("quant_method", "")).lower()
    if method == "bitsandbytes" or qc.get("load_in_4bit") or qc.get("load_in_8bit") or "_load_in_4bit" in qc:
        return _check_bitsandbytes(info)
    if method != "gptq":
        return [Finding("F-9", "error", f"quantization method {method or '?'} is not readable by rkllm-toolkit "
                        "(only GPTQ with the documented settings).", "convert from the fp16/bf16 checkpoint", "F-9")]
    bits = int(qc.get("bits", 0))
    rule = GPTQ.get(bits)
    findings: list[Finding] = []
    if rule is None or version_key(version) < version_key(str(rule["since"])):
        findings.append(Finding("gptq.version", "error",
                                f"GPTQ int{bits} needs toolkit {rule['since'] if rule else 'n/a'}+ (manual 3.1.5).",
                                "use the fp16/bf16 checkpoint or a newer toolkit", S3 + ".1"))
    else:
        if int(qc.get("group_size", -1)) not in rule["group_sizes"] or not qc.get("sym", False) or qc.get("desc_act"):
            findings.append(Finding("gptq.settings", "error",
                                    f"GPTQ int{bits} must use sym=true, desc_act=false and group_size in "
                                    f"{rule['group_sizes']} (found {qc.get('group_size')}, sym={qc.get('sym')}, "
                                    f"desc_act={qc.get('desc_act')}).", "requantize with those settings", S3 + ".1"))
    if bits == 4 and request.platform == "rk3588":
        findings.append(Finding("F-2", "error", "GPTQ-Int4 means w4a16, which RK3588 does not run.",
                                "use GPTQ-Int8 or the fp16 checkpoint on RK3588", "F-2"))
    return findings


def _check_bitsandbytes(info: CheckpointInfo) -> list[Finding]:
    """rkllm-toolkit cannot load bitsandbytes weights (F-9); rkedge dequantizes 4-bit and 8-bit ones first, and
    the result is only as good as the 4/8-bit source."""
    source = quantization_from_config(info.config) or SourceQuantization("bitsandbytes")
    toolkit_refusal = ("rkllm-toolkit cannot load bitsandbytes weights ('ERROR: Catch exception when loading "
                       "model: bitsandbytes' / 'Load model failed!')")
    if source.dequantizable and quantized_weights(info.tensors):
        base = base_model_name(info.path)
        return [Finding("F-9", "warning", f"{quality_warning(source)}. {toolkit_refusal}: rkedge dequantizes it "
                        f"first, tensor by tensor, to {dequantized_dtype(info)} (as bitsandbytes does).",
                        f"convert the original checkpoint ({base or 'the float model it was quantized from'}) when "
                        "you have it", "F-9: rknn-llm#212, ez-er#4; convert/bnb.py")]
    if source.dequantizable:
        return [Finding("F-9", "error",
                        f"config.json declares {source.describe()}, but the weights hold none of bitsandbytes' "
                        "quantized tensors (a .weight with its quant_state, or with SCB); there is nothing to "
                        "dequantize, and the toolkit would refuse the config.",
                        "if the model was saved after model.dequantize(), delete quantization_config from "
                        "config.json; otherwise re-download the checkpoint (its quantized weights are missing)",
                        "F-9: rknn-llm#212, ez-er#4")]
    return [Finding("F-9", "error",
                    f"the checkpoint is quantized with bitsandbytes in a form rkedge does not dequantize (only "
                    f"4-bit nf4/fp4 and 8-bit LLM.int8); {toolkit_refusal}.",
                    "convert from the original fp16/bf16 checkpoint, or dequantize first: load it with "
                    "transformers, call model.dequantize(), save_pretrained() in float16 without "
                    "quantization_config", "F-9: rknn-llm#212, ez-er#4")]


#: safetensors codes of floating weights (the only ones an unquantized checkpoint may hold in its matrices).
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
_DAMAGED = "re-download the checkpoint (or save it again from the original with save_pretrained)"


def _check_weights(info: CheckpointInfo) -> list[Finding]:
    """What the toolkit would turn into a garbage model without a word: integer weight matrices in a checkpoint
    that declares no quantization, layers missing (the toolkit would leave them at their random initialisation),
    an embedding whose shape is not [vocab_size, hidden_size]."""
    if not info.tensors:
        return []
    findings: list[Finding] = []
    if not info.quantization_config:
        ints = sorted(t.name for t in info.tensors.values()
                      if t.dtype not in _FLOAT_DTYPES and len(t.shape) >= 2 and t.name.endswith(".weight"))
        if ints:
            dtypes = sorted({info.tensors[n].dtype for n in ints})
            findings.append(Finding("weights.dtype", "error",
                                    f"{len(ints)} weight matri(ces) are stored as {'/'.join(dtypes)} (e.g. {ints[0]}), "
                                    "but config.json declares no quantization: the values would be read as "
                                    "garbage numbers.", _DAMAGED + " in float16/bfloat16/float32", "safetensors"))
    config = info.text_config
    layers = config.get("num_hidden_layers")
    found: dict[int, set[str]] = {}
    for name in info.tensors:
        match = _LAYER.search(name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(name[match.end():])
    if isinstance(layers, int) and found:
        missing = [i for i in range(layers) if i not in found]
        # A layer is cut short when it holds a strict subset of another layer's tensors. Comparing against the
        # union of all layers instead would refuse models whose layers differ by design (RecurrentGemma's
        # recurrent and attention blocks, dense and MoE layers).
        fuller = {i: other for i, names in found.items() if i < layers
                  for other in [next((o for o in found.values() if names < o), None)] if other is not None}
        partial = sorted(fuller)
        if missing or partial:
            detail = (f"layers {_ranges(missing)} have no tensors" if missing else
                      f"layer {partial[0]} lacks {sorted(fuller[partial[0]] - found[partial[0]])[0]}")
            findings.append(Finding("weights.incomplete", "error",
                                    f"the checkpoint is incomplete: config.json says {layers} layers, but {detail} "
                                    "(a shard missing from the index or the folder?).", _DAMAGED, "safetensors"))
    if not any("embed" in name or "wte" in name for name in info.tensors):
        findings.append(Finding("weights.incomplete", "error", "the checkpoint has no token embedding tensor (a "
                                "shard missing from the index or the folder?).", _DAMAGED, "safetensors"))
    vocab, hidden = config.get("vocab_size"), config.get("hidden_size")
    embed = next((t for t in info.tensors.values() if t.name.endswith(("embed_tokens.weight", "wte.weight"))), None)
    if embed is not None and isinstance(vocab, int) and isinstance(hidden, int) and len(embed.shape) == 2 \
            and (embed.shape[1] != hidden or embed.shape[0] < vocab):
        findings.append(Finding("weights.shape", "error",
                                f"{embed.name} has shape {list(embed.shape)}, but config.json says vocab_size {vocab} "
                                f"and hidden_size {hidden}.", _DAMAGED, "safetensors"))
    return findings


def _ranges(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:8])) + (" ..." if len(numbers) > 8 else "")


def _check_name(request: ConversionRequest) -> list[Finding]:
    """``--name`` becomes a file name in --out: no folder parts, nothing hidden."""
    name = request.name
    if name is None:
        return []
    if not name.strip() or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        return [Finding("name.invalid", "error", f"--name {name!r} is not a plain file name.",
                        "pass a name without '/' and not starting with '.', e.g. --name my-model", "rkedge")]
    return []


def _check_group_sizes(info: CheckpointInfo, request: ConversionRequest) -> list[Finding]:
    """The group size must divide the linear layers' input dimension (fail) and should divide the output one."""
    group = group_size(request.dtype)
    reason = f"dtype {request.dtype}"
    if group is None and request.hybrid_rate > 0 and request.dtype == "w8a8":
        group, reason = 512, "hybrid_rate > 0 with w8a8 (hybrid mixes in w8a8_g512)"
    if group is None or not info.tensors:
        return []
    bad_in = sorted({(t.shape[1], t.name.split(".")[-2]) for t in info.linear_weights() if t.shape[1] % group})
    bad_out = sorted({(t.shape[0], t.name.split(".")[-2]) for t in info.linear_weights() if t.shape[0] % group})
    source = "converter-anchors section 3.1 (group size vs K dimension, inferred from Rockchip's benchmark picks)"
    findings = []
    if bad_in:
        dims = ", ".join(f"{name} in={dim}" for dim, name in bad_in[:6])
        findings.append(Finding("group-size.input", "error",
                                f"group size {group} ({reason}) does not divide the input dimension of: {dims}; "
                                "quantization fails.", "use a smaller group (or plain w8a8)", source))
    if bad_out:
        dims = ", ".join(f"{name} out={dim}" for dim, name in bad_out[:6])
        findings.append(Finding("group-size.output", "warning",
                                f"group size {group} ({reason}) does not divide the output dimension of: {dims}. The "
                                "manual words the rule on the output dimension, Rockchip's own benchmarks show the "
                                "input dimension is what matters.", None, source))
    return findings


def _check_known_failures(info: CheckpointInfo, request: ConversionRequest, version: str) -> list[Finding]:
    found = []
    for failure in failures.plan_rules("board-failure", architecture=info.architecture, platform=request.platform,
                                       toolkit_version=version, dtype=request.dtype,
                                       hybrid_rate=request.hybrid_rate):
        severity: Severity = "warning" if request.allow_known_failure else "error"
        fix = (failure.fix or "") + ("" if request.allow_known_failure else
                                     " (to convert anyway, e.g. to reproduce the failure, pass --allow-known-failure)")
        found.append(Finding(failure.id, severity, failure.message + ".", fix, failure.source))
    return found


def _check_python(rules: ToolkitRules, spec: architectures.ArchSpec | None, python: str | None,
                  version: str) -> list[Finding]:
    if python is None:
        return []
    short = ".".join(python.split(".")[:2])
    findings = []
    if short not in rules.python:
        findings.append(Finding("F-14", "error",
                                f"rkllm-toolkit {version} ships wheels for Python {', '.join(rules.python)}, not {short}.",
                                f"make the toolkit environment with Python {rules.python[-1]} "
                                "(rkedge toolkit install WHEEL --python python3.X)", "F-14; section 3.4"))
    if spec is not None and spec.python_only and short not in spec.python_only:
        findings.append(Finding("F-14", "error", f"{spec.family} converts only on Python {', '.join(spec.python_only)}.",
                                "use a Python 3.12 toolkit environment with requirements_rwkv7.txt", "section 3.4"))
    return findings


def _check_lora_mode(request: ConversionRequest, rules: ToolkitRules, version: str) -> list[Finding]:
    if request.lora is None or request.lora_mode != "runtime":
        return []
    if "model_lora" not in rules.load_args:
        return [Finding("F-10", "error", f"toolkit {version} cannot convert a LoRA for the runtime (no model_lora).",
                        "use --lora-mode merge, or toolkit 1.1.0+", "F-10; section 3.2")]
    if version in RUNTIME_LORA_WEAK_VERSIONS:
        return [Finding("F-10", "warning", f"LoRA conversion errors on {version} were answered with 'use 1.2.1' (#357).",
                        "prefer toolkit 1.2.1+ for runtime LoRAs", "F-10; rknn-llm#357")]
    return []


def _check_board_fit(request: ConversionRequest, size: Prediction) -> list[Finding]:
    """The same estimate and verdict as ``rkedge plan`` (``convert/perf_model.py``, ``convert/plan.py``)."""
    from rkedge.convert.plan import ram_verdict

    findings: list[Finding] = []
    if fit.spans_iommu_domains(size.weight_bytes):
        findings.append(Finding(
            "F-1.domains", "warning",
            f"the quantized weights (~{size.weight_bytes / GIB:.1f} GiB) span more than one 4 GiB NPU IOMMU domain; "
            "large models have failed to load with 'failed to malloc npu memory'.",
            "on the board use base_domain_id=1 and rknpu driver 0.9.8 (rkedge doctor checks it); prefer plain w8a8",
            "F-1: rknpu_iommu.c dma_limit 1<<32; rknn-llm#139, #195, #232"))
    if request.board:
        from rkedge.boards import get_board

        board = get_board(request.board)
        verdicts = [ram_verdict(size, gb) for gb in (board.ram_gb or ())]
        fitting = [v.ram_gb for v in verdicts if v.verdict != "does not fit"]
        need = f"~{size.total_bytes / GIB:.1f} GiB (weights, embedding, KV cache at {size.max_context} tokens, runtime)"
        if verdicts and not fitting:
            findings.append(Finding("board.ram", "error",
                                    f"{need} does not fit any {board.name} "
                                    f"({', '.join(f'{v.ram_gb:g} GB' for v in verdicts)}).",
                                    "use a smaller model or a smaller --max-context (rkedge plan shows the options)",
                                    "boards/" + board.id + ".json; rkedge plan"))
        elif verdicts and fitting[0] != verdicts[0].ram_gb:
            findings.append(Finding("board.ram", "warning",
                                    f"{need}: fits the {fitting[0]:g} GB and larger variants of {board.name}, not the "
                                    f"{verdicts[0].ram_gb:g} GB one.", None, "boards/" + board.id + ".json; rkedge plan"))
        if board.npu_platform != request.platform:
            findings.append(Finding("F-6", "error",
                                    f"{board.name} runs {board.npu_platform} models, not {request.platform}.",
                                    f"use --platform {board.npu_platform}", "F-6"))
    return findings


def toolkit_host_bytes(param_count: int, toolkit_version: str, load_dtype: str | None) -> int:
    """F-11: what the toolkit itself holds while converting: the model at its load dtype plus calibration state
    (~4.2 bytes/param at float32, BEG's 8B measurement; half at a 16-bit load dtype), more on versions before
    the 1.0.1 memory fix, with a 10% margin."""
    per_param = HOST_BYTES_PER_PARAM.get(load_dtype or "float32", HOST_BYTES_PER_PARAM["float32"])
    for before, heavier in HOST_BYTES_PER_PARAM_BEFORE.items():
        if version_key(toolkit_version) < version_key(before):
            per_param = max(per_param, heavier)
    return int(param_count * per_param * HOST_MEMORY_MARGIN)


def _fit_load_dtype(info: CheckpointInfo, request: ConversionRequest, rules: ToolkitRules, version: str,
                    memory: tuple[int, int] | None) -> tuple[ConversionRequest, list[Finding]]:
    """With no ``--load-dtype``, a toolkit that takes one (1.2.0+) and a float32 load that does not fit RAM +
    swap: the request loads in the checkpoint's 16-bit dtype instead (bfloat16 for a bf16 checkpoint, whose
    range float16 would overflow; float16 otherwise), with a finding. Then the F-11 check on what was chosen."""
    available, swap = memory if memory else host.host_memory()
    if request.load_dtype is None and available and "dtype" in rules.load_args \
            and toolkit_host_bytes(info.param_count, version, None) > available + swap:
        half = "bfloat16" if info.main_dtype == "BF16" else "float16"
        need = toolkit_host_bytes(info.param_count, version, half)
        if need <= available + swap:
            full = toolkit_host_bytes(info.param_count, version, None)
            chosen = dataclasses.replace(request, load_dtype=half)
            return chosen, [Finding(
                "F-11.load-dtype", "warning",
                f"loading in float32 would need ~{full / GIB:.0f} GiB of host memory (RAM + swap: "
                f"{(available + swap) / GIB:.0f} GiB); loading in {half} instead (~{need / GIB:.0f} GiB). The toolkit "
                "then quantizes from 16-bit weights, which can cost a little precision.",
                "add memory or swap and pass --load-dtype float32 to quantize from float32", "F-11"),
                *_check_host_memory(info, chosen, memory, version)]
    return request, _check_host_memory(info, request, memory, version)


def _check_host_memory(info: CheckpointInfo, request: ConversionRequest,
                       memory: tuple[int, int] | None, toolkit_version: str = "1.2.0") -> list[Finding]:
    """F-11: the toolkit holds the model at its load dtype plus calibration state (~4.2 bytes/param at fp32)."""
    available, swap = memory if memory else host.host_memory()
    if not available:
        return []
    need = toolkit_host_bytes(info.param_count, toolkit_version, request.load_dtype)
    if need > available + swap:
        return [Finding("F-11", "error",
                        f"converting needs ~{need / GIB:.0f} GiB of host memory (RAM + swap: "
                        f"{(available + swap) / GIB:.0f} GiB available); the toolkit would be OOM-killed after hours.",
                        "add swap, use a bigger machine, or --load-dtype float16 (toolkit 1.2.0+, costs precision)",
                        "F-11: rknn-llm#30, ez-er#2, BEG measurements")]
    if need > available:
        return [Finding("F-11", "warning",
                        f"converting needs ~{need / GIB:.0f} GiB; only {available / GIB:.0f} GiB RAM is available, the "
                        "rest would come from swap (slow).", "--load-dtype float16 halves it (1.2.0+)", "F-11")]
    return []


def _load_kwargs(request: ConversionRequest, rules: ToolkitRules) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model": Input.EXPORTED}
    if "device" in rules.load_args:
        kwargs["device"] = request.device
    if request.load_dtype and "dtype" in rules.load_args:
        kwargs["dtype"] = request.load_dtype
    if request.lora is not None and request.lora_mode == "runtime" and "model_lora" in rules.load_args:
        kwargs["model_lora"] = Input.ADAPTER
    return kwargs


def _build_kwargs(request: ConversionRequest, rules: ToolkitRules) -> dict[str, Any]:
    wanted: dict[str, Any] = {
        "do_quantization": True,
        "optimization_level": request.optimization_level,
        "quantized_dtype": request.dtype,
        "target_platform": request.platform,
        "quantized_algorithm": request.algorithm,
        "num_npu_core": request.npu_cores if request.npu_cores is not None else
        max(rules.npu_cores.get(request.platform, (1,))),
        "extra_qparams": None,
        "dataset": Input.CALIBRATION,
        "hybrid_rate": request.hybrid_rate,
        "max_context": request.max_context if request.max_context is not None else DEFAULT_MAX_CONTEXT,
    }
    return {key: value for key, value in wanted.items() if key in rules.build_args}
