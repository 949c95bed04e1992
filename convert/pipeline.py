"""``rkedge convert``: inspect -> check -> [merge LoRA] -> export -> calibration -> quantize -> manifest + card.

Each step writes into ``OUT/.rkedge-work/<step>`` through a temporary name and records the hash of its inputs;
a rerun with the same inputs skips finished steps. Final files appear in ``OUT`` by rename, the ``.rkllm``
last: an interrupted run (even SIGKILL) leaves no ``.rkllm`` in place, and a manifest without its model is
visibly incomplete. The next run cleans up what an interrupted one left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rkedge import __version__
from rkedge._fs import atomic_write_text, sha256_file
from rkedge.convert import calibration as calib
from rkedge.convert.architectures import find_refused
from rkedge.convert.export import export_checkpoint
from rkedge.convert.findings import Finding, raise_on_errors
from rkedge.convert.inspect import CheckpointInfo, inspect_checkpoint, inspect_gguf
from rkedge.convert.modelcard import render_card, source_card_license
from rkedge.convert.planner import ConversionRequest, Plan, host_description, plan
from rkedge.convert.rules import DEFAULT_MAX_CONTEXT, GGUF_TYPES
from rkedge.errors import CheckFailed, InputError, RkedgeError, ToolkitError
from rkedge.manifest import SCHEMA, SCHEMA_VERSION, manifest_path

WORK = ".rkedge-work"


class Reporter(Protocol):
    def step(self, name: str, detail: str = "") -> None: ...
    def progress(self, done: int, total: int, label: str) -> None: ...
    def log(self, line: str) -> None: ...


class SilentReporter:
    def step(self, name: str, detail: str = "") -> None:
        pass

    def progress(self, done: int, total: int, label: str) -> None:
        pass

    def log(self, line: str) -> None:
        pass


@dataclass
class StepRecord:
    name: str
    status: str  # done | cached | skipped
    seconds: float = 0.0
    detail: str = ""


@dataclass
class ConversionResult:
    plan: Plan
    dry_run: bool
    steps: list[StepRecord] = field(default_factory=list)
    model_file: Path | None = None
    manifest_file: Path | None = None
    card_file: Path | None = None
    lora_file: Path | None = None
    manifest: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.plan.ok,
            "dry_run": self.dry_run,
            "toolkit_version": self.plan.toolkit_version,
            "output": str(self.model_file) if self.model_file else self.plan.output_name,
            "manifest": str(self.manifest_file) if self.manifest_file else None,
            "lora_file": str(self.lora_file) if self.lora_file else None,
            "build_kwargs": self.plan.build_kwargs,
            "findings": [f.to_dict() for f in self.plan.findings],
            "steps": [s.__dict__ for s in self.steps],
        }


def convert(request: ConversionRequest, *, dry_run: bool = False, reporter: Reporter | None = None) -> ConversionResult:
    """Runs (or, with ``dry_run``, only plans and checks) one conversion."""
    from rkedge.convert.toolkit import resolve_toolkit

    reporter = reporter or SilentReporter()
    started = time.monotonic()
    request.normalized()
    if not request.model.exists():
        raise InputError(f"{request.model} does not exist.", fix="pass a Hugging Face checkpoint folder or a .gguf file")
    gguf = request.model.suffix == ".gguf"
    if gguf:
        return _convert_gguf(request, dry_run=dry_run, reporter=reporter)
    info = source_info = inspect_checkpoint(request.model)
    try:
        env = resolve_toolkit(request.toolkit, request.toolkit_version)
    except RkedgeError:
        refused = find_refused(info.architecture, info.model_type)
        if refused is not None and refused.alternatives:
            # No rkllm-toolkit version converts it: the missing toolkit is not what stands in the way.
            raise CheckFailed(f"{info.architecture or info.model_type}: {refused.reason}.", fix=refused.fix) from None
        raise
    simulated = env.kind == "mock"

    adapter = None
    adapter_findings: list[Finding] = []
    if request.lora is not None:
        from rkedge.lora.adapter import inspect_adapter, validate_adapter

        adapter = inspect_adapter(request.lora)
        adapter_findings = validate_adapter(adapter, request.model)

    family, template_parts, renderer = _chat_setup(info)
    items = calib.load_prompts(request.calibration)
    preview = calib.build_calibration(items, renderer, None)
    marker = template_parts[1].strip() if template_parts else None
    calibration_findings = calib.lint([{**d, "target": d["target"] or "x"} for d in preview], marker)

    the_plan = plan(request, info, env.version, toolkit_python=None if simulated else (env.probe or {}).get("python"),
                    adapter_findings=adapter_findings, calibration_findings=calibration_findings,
                    simulated_toolkit=simulated)
    result = ConversionResult(the_plan, dry_run)
    if dry_run:
        return result
    raise_on_errors(the_plan.findings, "this conversion")

    out = request.out
    work = out / WORK
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    _clean_leftovers(out, work)
    source_sig = _files_signature(info)
    source_dir = request.model
    export_dtype = request.load_dtype

    # -- merge ----------------------------------------------------------------------------------------
    merged_key = None
    if adapter is not None and request.lora_mode == "merge":
        merged_key = _digest("merge", source_sig, adapter.weights_sha256, export_dtype)
        merged = work / "merged"

        def run_merge(target: Path) -> None:
            from rkedge.lora.merge import merge_lora, smoke_forward

            reporter.step("merge", f"LoRA {request.lora} into {request.model}")
            merge_lora(request.model, request.lora, target, dtype=export_dtype, progress=reporter.progress)
            reporter.step("smoke", "forward pass of the merged model on the host")
            smoke_forward(target)

        result.steps.append(_cached_step("merge", merged, merged_key, run_merge))
        source_dir = merged
        info = inspect_checkpoint(merged)  # what the toolkit loads; source_info stays the user's checkpoint

    # -- export ---------------------------------------------------------------------------------------
    meta = _export_meta(info, family, template_parts, the_plan, request)
    export_key = _digest("export", merged_key or source_sig, export_dtype, meta)
    exported = work / "export"

    def run_export(target: Path) -> None:
        reporter.step("export", f"{source_dir} -> sharded safetensors ({export_dtype or info.main_dtype})")
        export_checkpoint(info, target, dtype=export_dtype, meta=meta, progress=reporter.progress)

    result.steps.append(_cached_step("export", exported, export_key, run_export))

    # -- calibration ----------------------------------------------------------------------------------
    calibration_file = work / "calibration.json"
    calibration_key = _digest("calibration", export_key, items, family)

    def run_calibration(target: Path) -> None:
        reporter.step("calibration", f"{len(items)} prompts rendered with the chat template; targets from the float model")
        generate = calib.greedy_generator(exported) if any("target" not in i for i in items) else None
        data = calib.build_calibration(items, _hf_renderer(exported) or renderer, generate)
        target.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")

    result.steps.append(_cached_step("calibration", calibration_file, calibration_key, run_calibration))
    calibration_data = json.loads(calibration_file.read_text(encoding="utf-8"))
    known = {f.id for f in the_plan.findings}
    the_plan.findings += [f for f in calib.lint(calibration_data, marker) if f.id not in known]

    # -- quantize (the toolkit) -----------------------------------------------------------------------
    load_kwargs = {**the_plan.load_kwargs, "model": str(exported.resolve())}
    if "model_lora" in load_kwargs:
        load_kwargs["model_lora"] = str(Path(request.lora).resolve())  # type: ignore[arg-type]
    build_kwargs = dict(the_plan.build_kwargs)
    if "dataset" in build_kwargs:
        build_kwargs["dataset"] = str(calibration_file.resolve())
    staging = out / f".rkedge-tmp-{os.getpid()}"
    staging.mkdir()
    export_kwargs = {"export_path": str((staging / the_plan.output_name).resolve())}
    job = {"protocol": 1, "load": {"method": the_plan.load_method, "kwargs": load_kwargs},
           "build": {"kwargs": build_kwargs}, "export": {"kwargs": export_kwargs}}
    reporter.step("quantize", f"rkllm-toolkit {env.version} ({env.label})")
    toolkit_started = time.monotonic()
    try:
        run = _run_toolkit(env, job, reporter)
        model_tmp = staging / the_plan.output_name
        lora_tmp = staging / (Path(the_plan.output_name).stem + "_lora.rkllm")
        _verify_output(model_tmp, simulated)
        expects_lora = request.lora is not None and request.lora_mode == "runtime"
        if expects_lora and not lora_tmp.is_file():
            raise ToolkitError(f"the toolkit did not write {lora_tmp.name} for the runtime LoRA.",
                               fix="check the toolkit log above; the adapter must match the base model (F-10)")
        result.steps.append(StepRecord("quantize", "done", time.monotonic() - toolkit_started))

        # -- manifest, card, then the model (the .rkllm appears last) ---------------------------------
        final_model = out / the_plan.output_name
        final_lora = out / lora_tmp.name if lora_tmp.is_file() else None
        manifest = _manifest(request, the_plan, env, info, source_info, adapter, calibration_file, calibration_data,
                             family, template_parts, model_tmp, lora_tmp if final_lora else None, run, load_kwargs,
                             build_kwargs, {"export_path": str(final_model)}, simulated, started)
        card = render_card(manifest, license_id=source_card_license(request.model))
        if final_lora is not None:
            os.replace(lora_tmp, final_lora)
        atomic_write_text(out / "README.md", card)
        atomic_write_text(manifest_path(final_model), json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        os.replace(model_tmp, final_model)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.model_file, result.lora_file = final_model, final_lora
    result.manifest_file, result.card_file, result.manifest = manifest_path(final_model), out / "README.md", manifest
    return result


# --- steps ------------------------------------------------------------------------------------------------

def _cached_step(name: str, target: Path, key: str, run: Callable[[Path], None]) -> StepRecord:
    """Runs ``run(temp)`` and renames temp onto ``target``, unless ``target`` was made from the same inputs."""
    stamp = target.with_name(target.name + ".done.json")
    if target.exists() and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return StepRecord(name, "cached", 0.0, "same inputs as a finished earlier run")
    started = time.monotonic()
    stamp.unlink(missing_ok=True)
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        run(partial)
        os.replace(partial, target)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        elif partial.exists():
            partial.unlink()
    atomic_write_text(stamp, json.dumps({"key": key, "finished": time.time()}))
    return StepRecord(name, "done", time.monotonic() - started)


def _clean_leftovers(out: Path, work: Path) -> None:
    """Removes what an interrupted run left: staging folders and partial step outputs."""
    for leftover in [*out.glob(".rkedge-tmp-*"), *work.glob("*.partial-*"), *out.glob(".*.part")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _run_toolkit(env: Any, job: dict[str, Any], reporter: Reporter) -> Any:
    from rkedge.convert.toolkit import run_job

    def on_event(event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "log":
            reporter.log(event.get("line", ""))
        elif kind == "progress" and event.get("fraction") is not None:
            reporter.progress(int(event["fraction"] * 100), 100, event.get("step", ""))
        elif kind == "progress":
            reporter.log(f"[{event.get('step')}] {event.get('state')}")

    run = run_job(env, job, on_event=on_event)
    if not run.ok:
        said = [line for line in run.log_lines if "ERROR" in line or "Error" in line or "error:" in line][-3:]
        details = "\n".join(f.render() for f in run.findings)
        if said:
            details += "\n  the toolkit said: " + "\n  the toolkit said: ".join(s.strip() for s in said)
        raise ToolkitError(f"rkllm-toolkit {env.version} failed: {run.error}\n{details}".rstrip(),
                           fix="rerun with -v to see the toolkit's whole log")
    return run


def _verify_output(model_file: Path, simulated: bool) -> None:
    """Post-export checks (recommendation 10): a non-empty file of the kind the toolkit in use writes."""
    from rkedge.runtime.simmodel import is_simulated_model

    if not model_file.is_file() or model_file.stat().st_size == 0:
        raise ToolkitError(f"the toolkit reported success but {model_file.name} is missing or empty.")
    if simulated != is_simulated_model(model_file):
        raise ToolkitError(f"{model_file.name} is {'not ' if simulated else ''}a simulated model, but the toolkit in "
                           f"use is {'simulated' if simulated else 'the real one'}; refusing to publish it.")


# --- metadata -------------------------------------------------------------------------------------------

def _chat_setup(info: CheckpointInfo) -> tuple[str | None, tuple[str, str, str] | None, Callable[[str], str]]:
    from rkedge.convert.chat_family import detect_family
    from rkedge.runtime.templates import get_template

    tokens = info.tokenizer_config
    bos = _token_text(tokens.get("bos_token"))
    eos = _token_text(tokens.get("eos_token"))
    family = None
    if info.chat_template:
        try:
            family = detect_family(info.chat_template, bos_token=bos, eos_token=eos)
        except ImportError:  # no jinja2 on this host: fall back on the registry's family
            family = None
    if family is None and not info.chat_template:
        from rkedge.convert.architectures import find_spec

        spec = find_spec(info.architecture, info.model_type)
        family = spec.chat_family if spec else None
    if family is None:
        return None, None, lambda prompt: prompt
    template = get_template(family)
    return family, template.runtime_parts(), lambda prompt: template.render(
        [{"role": "user", "content": prompt}], True, include_bos=False)


def _hf_renderer(model_dir: Path) -> Callable[[str], str] | None:
    """The official generator's rendering: the tokenizer's own chat template (needs transformers)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if not getattr(tokenizer, "chat_template", None):
            return None
    except Exception:  # noqa: BLE001 - fall back on rkedge's renderer
        return None
    return lambda prompt: tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)


def _token_text(token: Any) -> str:
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return str(token or "")


def _export_meta(info: CheckpointInfo, family: str | None, parts: tuple[str, str, str] | None, the_plan: Plan,
                 request: ConversionRequest) -> dict[str, Any]:
    return {
        "name": Path(the_plan.output_name).stem,
        "chat_family": family,
        "chat_template": dict(zip(("system_prompt", "prompt_prefix", "prompt_postfix"), parts)) if parts else None,
        "bos_token_id": info.token_id("bos"),
        "eos_token_id": info.token_id("eos"),
        "source": info.source_name,
        "source_sha256": _digest("source", _files_signature(info)),
        "rkedge_version": __version__,
    }


def _files_signature(info: CheckpointInfo) -> list[Any]:
    files = [info.path / "config.json", *info.weight_files]
    files += [info.path / name for name in info.tokenizer_files]
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _weights_digest(info: CheckpointInfo, cache: Path) -> dict[str, str]:
    """sha256 of every weight file, cached by (name, size, mtime) so reruns do not rehash gigabytes."""
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    hashes = {}
    for file in [info.path / "config.json", *info.weight_files]:
        stat = file.stat()
        key = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        hashes[file.name] = known.get(key) or sha256_file(file)
        known[key] = hashes[file.name]
    atomic_write_text(cache, json.dumps(known))
    return hashes


def _manifest(request: ConversionRequest, the_plan: Plan, env: Any, info: CheckpointInfo, source_info: CheckpointInfo,
              adapter: Any, calibration_file: Path, calibration_data: list[dict[str, str]], family: str | None,
              parts: tuple[str, str, str] | None, model_tmp: Path, lora_tmp: Path | None, run: Any,
              load_kwargs: dict[str, Any], build_kwargs: dict[str, Any], export_kwargs: dict[str, Any],
              simulated: bool, started: float) -> dict[str, Any]:
    """``export_kwargs``: as passed to ``export_rkllm``, with the final path (the toolkit wrote a temporary name)."""
    weight_hashes = _weights_digest(source_info, request.out / WORK / "hashes.json")
    max_context = build_kwargs.get("max_context", DEFAULT_MAX_CONTEXT)
    size = the_plan.size
    recommended: dict[str, Any] = {
        "max_context_len": max_context,
        "runtime_version": env.version,
        "min_rknpu_driver": "0.9.8",
    }
    if size is not None and size.weight_bytes > 2 * (1 << 30):
        recommended["base_domain_id"] = 1  # maintainers' standard advice for large weight blobs (F-1)
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "simulated": simulated,
        "name": Path(the_plan.output_name).stem,
        "model_file": the_plan.output_name,
        "sha256": sha256_file(model_tmp),
        "size": model_tmp.stat().st_size,
        "lora_file": ({"file": lora_tmp.name, "sha256": sha256_file(lora_tmp), "size": lora_tmp.stat().st_size}
                      if lora_tmp else None),
        "architecture": info.architecture,
        "model_type": info.model_type,
        "platform": build_kwargs.get("target_platform", request.platform),
        "dtype": build_kwargs.get("quantized_dtype", request.dtype),
        "max_context_limit": max_context,
        "npu_cores": build_kwargs.get("num_npu_core"),
        "chat_family": family,
        "chat_template": info.chat_template,
        "chat_template_parts": dict(zip(("system_prompt", "prompt_prefix", "prompt_postfix"), parts)) if parts else None,
        "bos_token_id": info.token_id("bos"),
        "eos_token_id": info.token_id("eos"),
        "toolkit": {"kind": env.kind, "version": env.version, "label": env.label,
                    "python": (env.probe or {}).get("python") or (host_description()["python"] if simulated else None),
                    "reported_version": run.toolkit_version},
        "rkedge_version": __version__,
        "inputs": {
            "model": {"path": str(request.model.resolve()), "source": source_info.source_name,
                      "revision": source_info.source_revision, "sha256": weight_hashes,
                      "parameters": source_info.param_count},
            "adapter": ({"path": str(Path(request.lora).resolve()), "mode": request.lora_mode,  # type: ignore[arg-type]
                         "name": Path(request.lora).name,  # type: ignore[arg-type]
                         "base_model_name_or_path": adapter.base_model_name_or_path,
                         "sha256": adapter.weights_sha256}
                        if adapter is not None else None),
            "calibration": {"path": str(calibration_file), "sha256": calib.digest(calibration_data),
                            "items": len(calibration_data), "generator": "chat template + greedy float-model targets",
                            "languages": dict(calib.language_mix(calibration_data))},
        },
        "toolkit_calls": {the_plan.load_method: load_kwargs, "build": build_kwargs, "export_rkllm": export_kwargs},
        "request": {"algorithm": request.algorithm, "hybrid_rate": request.hybrid_rate,
                    "optimization_level": request.optimization_level, "board": request.board,
                    "allow_known_failure": request.allow_known_failure},
        "findings": [f.to_dict() for f in the_plan.findings],
        "estimate": size.to_dict() if size is not None else None,
        "runtime": {"recommended": recommended},
        "host": host_description(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": round(time.monotonic() - started, 3),
    }
    return manifest


def _convert_gguf(request: ConversionRequest, *, dry_run: bool, reporter: Reporter) -> ConversionResult:
    """GGUF input: only q4_0 (= w4a16_g32, never RK3588) and fp16 are readable (manual 3.2; rknn-llm#312)."""
    info = inspect_gguf(request.model)
    file_type = info.get("file_type")
    findings: list[Finding] = []
    if file_type not in GGUF_TYPES:
        findings.append(Finding("gguf.type", "error",
                                f"GGUF type {file_type} is not readable by rkllm-toolkit (only q4_0 and fp16; e.g. "
                                f"'Not support GGMLQuantizationType: {file_type}!').",
                                "convert from the Hugging Face checkpoint instead", "section 3.2; rknn-llm#312"))
    if file_type == "MOSTLY_Q4_0" and request.platform == "rk3588":
        findings.append(Finding("F-2", "error", "a q4_0 GGUF is w4a16_g32, which RK3588 does not run.",
                                "convert the Hugging Face checkpoint with --dtype w8a8", "F-2"))
    empty = Plan(request, request.toolkit_version or "?", findings, "load_gguf", {"model": str(request.model)}, {}, {},
                 f"{request.model.stem}_{request.dtype}_{request.platform}.rkllm", None)
    if dry_run or findings:
        if not dry_run:
            raise_on_errors(findings, "this conversion")
        return ConversionResult(empty, dry_run)
    raise InputError("GGUF conversion (fp16 GGUF) is planned and checked, but converting it is not implemented yet.",
                     fix="convert from the Hugging Face checkpoint (the same weights) instead")
