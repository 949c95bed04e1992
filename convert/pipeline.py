"""``rkedge convert``: inspect -> plan -> [dequantize] -> [merge LoRA] -> export -> calibration -> quantize ->
manifest + card.

The plan (:func:`rkedge.convert.planner.plan`) decides everything: the findings, the steps and the toolkit job
with symbolic inputs. The pipeline then runs the steps once, in order, and binds the job's inputs to the
steps' outputs. Each step writes into ``OUT/.rkedge-work/<step>`` through a temporary name and records the
digest of its inputs (:meth:`Step.key`); a rerun with the same inputs skips finished steps. One conversion at a
time writes into ``OUT`` (a lock in the work folder). Final files are all written in a staging folder, then
renamed into ``OUT``, the ``.rkllm`` last (:func:`_quantize_and_publish`): an interrupted run (even SIGKILL)
leaves no ``.rkllm`` in place, and a manifest without its model is visibly incomplete. The next run cleans up
what an interrupted one left, job files included.

A bitsandbytes checkpoint (4-bit nf4/fp4, 8-bit LLM.int8) is first dequantized into ``OUT/.rkedge-work/dequantized``
(:class:`DequantizeStep`, streaming, equal to bitsandbytes' own dequantization); everything after it sees that
float checkpoint, and the manifest and card record the source quantization and that quality is bounded by it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rkedge import __version__, fit
from rkedge._fs import (
    atomic_dir,
    atomic_path,
    atomic_write_text,
    check_free_space,
    folder_lock,
    folder_size,
    format_size,
    free_space,
    sha256_file,
)
from rkedge.convert import calibration as calib
from rkedge.convert.bnb import SourceQuantization, base_model_name, dequantized_dtype, dequantized_view
from rkedge.convert.chat_family import ChatSetup, special_tokens
from rkedge.convert.export import export_checkpoint
from rkedge.convert.findings import Finding, raise_on_errors
from rkedge.convert.host import host_description
from rkedge.convert.inspect import CheckpointInfo, inspect_checkpoint, inspect_gguf
from rkedge.convert.modelcard import render_card, source_card_license
from rkedge.convert.planner import ConversionRequest, Input, Plan, ToolkitJob, plan, plan_gguf, refusal
from rkedge.convert.rules import DEFAULT_MAX_CONTEXT, LARGE_WEIGHTS_BASE_DOMAIN_ID
from rkedge.convert.safetensors_index import DTYPE_BYTES, DTYPE_CODES
from rkedge.errors import CheckFailed, InputError, RkedgeError, ToolkitError
from rkedge.manifest import ChatTemplateParts, LoraFile, Manifest, manifest_path

if TYPE_CHECKING:
    from rkedge.convert.toolkit import ToolkitEnv, ToolkitResult
    from rkedge.convert.toolkit.runner import Event
    from rkedge.lora.adapter import AdapterInfo

WORK = ".rkedge-work"
#: In ``OUT/.rkedge-work``: held (flock) by the one conversion writing into ``OUT``.
LOCK_FILE = "convert.lock"
#: ``OUT/.rkedge-tmp-<pid>``: where the toolkit, manifest and card write before anything is published.
STAGING_PREFIX = ".rkedge-tmp-"


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
    status: str  # done | cached | planned
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
    manifest: Manifest | None = None
    calls: dict[str, dict[str, Any]] | None = None  # the toolkit calls as made (paths bound)
    extra_findings: list[Finding] = field(default_factory=list)  # found while running (generated calibration)
    work_bytes: int | None = None  # what OUT/.rkedge-work keeps after the run (the finished steps, reused on a rerun)

    @property
    def findings(self) -> list[Finding]:
        return [*self.plan.findings, *self.extra_findings]

    def summary(self) -> dict[str, Any]:
        calls = self.calls or self.plan.job.calls()
        return {
            "ok": self.plan.ok,
            "dry_run": self.dry_run,
            "toolkit_version": self.plan.toolkit_version,
            "output": str(self.model_file) if self.model_file else self.plan.output_name,
            "manifest": str(self.manifest_file) if self.manifest_file else None,
            "lora_file": str(self.lora_file) if self.lora_file else None,
            "build_kwargs": {k: str(v) if isinstance(v, Input) else v for k, v in calls.get("build", {}).items()},
            "findings": [f.to_dict() for f in self.findings],
            "steps": [s.__dict__ for s in self.steps],
            "work_cache_bytes": self.work_bytes,
        }

    def render(self) -> list[str]:
        """What ``rkedge convert`` prints on stdout: the plan (a dry run) or the files written."""
        if self.dry_run:
            return [f"plan: {self.plan.output_name} with rkllm-toolkit {self.plan.toolkit_version}; "
                    f"build({', '.join(f'{k}={v!r}' for k, v in self.plan.build_kwargs.items())})",
                    f"steps: {' -> '.join(s.name for s in self.steps)}",
                    *(f"  {line}" for line in self.plan.job.render().splitlines())]
        lines = [f"wrote {f}" for f in (self.model_file, self.lora_file, self.manifest_file, self.card_file) if f]
        if self.work_bytes and self.model_file:
            # kept on purpose (a rerun with other toolkit settings skips the merge and the export), but a 9B merge
            # is 18.5 GB: say so rather than leave it to be found
            lines.append(f"kept {self.model_file.parent / WORK} ({format_size(self.work_bytes)}: the finished "
                         "steps, reused by a rerun with the same inputs; delete it to free the space)")
        return lines


def convert(request: ConversionRequest, *, dry_run: bool = False, reporter: Reporter | None = None) -> ConversionResult:
    """Runs (or, with ``dry_run``, only plans and checks) one conversion."""
    reporter = reporter or SilentReporter()
    started = time.monotonic()
    if not request.model.exists():
        raise InputError(f"{request.model} does not exist.", fix="pass a Hugging Face checkpoint folder or a .gguf file")
    if request.model.suffix == ".gguf":
        return _convert_gguf(request, dry_run=dry_run)
    _check_out_folder(request)
    info = inspect_checkpoint(request.model)
    env = _toolkit(request, info)
    the_plan = plan(request, info, env.version, simulated_toolkit=env.simulated,
                    toolkit_python=None if env.simulated else (env.probe or {}).get("python"))
    request = the_plan.request
    dequantize, merge, export, calibration = _steps(the_plan, info, request.out / WORK, reporter)
    steps: list[Step] = [s for s in (dequantize, merge, export, calibration) if s is not None]
    result = ConversionResult(the_plan, dry_run)
    if dry_run:
        result.steps = [StepRecord(s.name, "planned", detail=s.describe()) for s in steps]
        result.steps.append(StepRecord("quantize", "planned", detail=f"rkllm-toolkit {env.version} ({env.label})"))
        return result
    raise_on_errors(the_plan.findings, "this conversion")

    out = request.out
    (out / WORK).mkdir(parents=True, exist_ok=True)
    with folder_lock(out / WORK / LOCK_FILE, what=f"the output folder {out}"):
        _clean_leftovers(out, out / WORK)
        need = _disk_needed(the_plan, info, dequantize, merge, export)
        check_free_space(out, need, what="this conversion")
        try:
            for step in steps:
                result.steps.append(step.execute())
            known = {f.id for f in the_plan.findings}
            result.extra_findings = [f for f in calib.check_targets(calibration.data) if f.id not in known]
            _quantize_and_publish(result, env, info, export, calibration, reporter, started)
            result.work_bytes = folder_size(out / WORK)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            folder, free = free_space(out)
            raise InputError(f"the disk filled up writing {exc.filename or out}: this conversion needs about "
                             f"{format_size(need)} in {folder}, which now has {format_size(free)} free.",
                             fix=f"free at least {format_size(need)} there (the finished steps are kept and "
                                 "reused), or choose --out on another disk", code="disk_full") from exc
    return result


def _disk_needed(the_plan: Plan, info: CheckpointInfo, dequantize: DequantizeStep | None, merge: MergeStep | None,
                 export: ExportStep) -> int:
    """Bytes the steps still to run write into ``OUT``: the dequantized checkpoint (at its compute dtype), the
    merged checkpoint, the export (hard links when the dtype stays and the source is on the same disk, else a
    copy or a conversion), the toolkit's model."""
    out = the_plan.request.out
    if dequantize is not None:
        info = dequantize.planned  # sizes of the float checkpoint the dequantization writes
    load_bytes = DTYPE_BYTES.get(DTYPE_CODES.get(the_plan.request.load_dtype or "", ""), 0)
    converted = int(info.param_count * load_bytes) if load_bytes else info.weight_bytes
    need = 64 << 20  # config, tokenizer, manifest, card, calibration: small next to any of the rest
    dequantize_pending = dequantize is not None and not dequantize.is_current()
    if dequantize_pending:
        need += info.weight_bytes
    merge_pending = merge is not None and (dequantize_pending or not merge.is_current())
    if merge_pending:
        need += converted
    if merge_pending or dequantize_pending or not export.is_current():  # (keys read upstream outputs: ask only then)
        upstream = merge.output.parent if merge else dequantize.output.parent if dequantize else info.path
        same_disk = out.stat().st_dev == upstream.stat().st_dev
        if load_bytes or not same_disk:
            need += converted
    need += the_plan.size.weight_bytes if the_plan.size is not None else info.param_count
    return need


def _quantize_and_publish(result: ConversionResult, env: ToolkitEnv, info: CheckpointInfo, export: ExportStep,
                          calibration: CalibrationStep, reporter: Reporter, started: float) -> None:
    """The toolkit writes into a staging folder, where the manifest and card are written too; only then do they
    move into ``OUT``: any earlier model of the same name first (so no old ``.rkllm`` ever sits beside a new
    manifest), the ``.rkllm`` last. Every byte is written before the first rename, so a full disk or a crash
    leaves ``OUT`` as it was, and a SIGKILL between renames leaves no ``.rkllm`` (a manifest without its model is
    visibly incomplete; ``rkedge.modelfile.check_model_file`` refuses a model that does not match its manifest).
    One folder rename is not used because ``OUT`` also holds the step cache and the user's other files."""
    the_plan = result.plan
    request = the_plan.request
    out = request.out
    final_model = out / the_plan.output_name
    paths: dict[Input, str | Path] = {Input.EXPORTED: export.output.resolve(),
                                      Input.CALIBRATION: calibration.output.resolve()}
    if request.lora is not None:
        paths[Input.ADAPTER] = request.lora.resolve()
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir()
    try:
        model_tmp = staging / the_plan.output_name
        lora_tmp = staging / (Path(the_plan.output_name).stem + "_lora.rkllm")
        reporter.step("quantize", f"rkllm-toolkit {env.version} ({env.label})")
        toolkit_started = time.monotonic()
        run = _run_toolkit(env, the_plan.job.bind({**paths, Input.OUTPUT: model_tmp.resolve()}), reporter,
                           job_dir=out / WORK)
        _verify_output(model_tmp, env.simulated)
        if request.lora is not None and request.lora_mode == "runtime" and not lora_tmp.is_file():
            raise ToolkitError(f"the toolkit did not write {lora_tmp.name} for the runtime LoRA.",
                               fix="check the toolkit log above; the adapter must match the base model (F-10)")
        result.steps.append(StepRecord("quantize", "done", time.monotonic() - toolkit_started))

        final_lora = out / lora_tmp.name if lora_tmp.is_file() else None
        result.calls = the_plan.job.bind({**paths, Input.OUTPUT: final_model}).calls()
        manifest = _manifest(the_plan, env, run, source=info, exported=export.checkpoint, calibration=calibration,
                             model_tmp=model_tmp, lora_tmp=lora_tmp if final_lora else None, calls=result.calls,
                             findings=result.findings, started=started)
        card = render_card(manifest, license_id=source_card_license(request.model))
        card_tmp = staging / "README.md"
        manifest_tmp = manifest_path(model_tmp)
        atomic_write_text(card_tmp, card)
        atomic_write_text(manifest_tmp, manifest.to_json())
        _fsync(model_tmp, *([lora_tmp] if final_lora else []))
        # publish: the old model goes first, the new one comes last
        final_model.unlink(missing_ok=True)
        if final_lora is not None:
            os.replace(lora_tmp, final_lora)
        os.replace(card_tmp, out / "README.md")
        os.replace(manifest_tmp, manifest_path(final_model))
        os.replace(model_tmp, final_model)
        _fsync_folder(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.model_file, result.lora_file = final_model, final_lora
    result.manifest_file, result.card_file, result.manifest = manifest_path(final_model), out / "README.md", manifest


def _check_out_folder(request: ConversionRequest) -> None:
    """``--out`` must not be an input's folder: the card (README.md), the manifest and the work folder would
    overwrite or litter the source. A folder inside the checkpoint is allowed (no source file has an output's
    name there; only top-level files are weights)."""
    out = request.out.resolve()
    inputs = [("the model folder", request.model)] + ([("the LoRA folder", request.lora)] if request.lora else [])
    for what, folder in inputs:
        if out == folder.resolve():
            raise InputError(f"--out {request.out} is {what}; the model card (README.md) and the manifest would "
                             "overwrite the source's files.", fix="choose a new folder for --out")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {request.out} exists and is not a folder.", fix="choose a folder for --out")


def _fsync(*files: Path) -> None:
    """The model bytes on disk before its name is published (a power loss must not leave a truncated .rkllm)."""
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _toolkit(request: ConversionRequest, info: CheckpointInfo) -> ToolkitEnv:
    """The toolkit environment; a model no toolkit version converts is refused before a missing toolkit."""
    from rkedge.convert.toolkit import resolve_toolkit

    refused = refusal(info)
    try:
        return resolve_toolkit(request.toolkit, request.toolkit_version)
    except RkedgeError:
        if refused is None:
            raise
        raise CheckFailed(refused.message, fix=refused.fix) from None


# --- steps ------------------------------------------------------------------------------------------------

class Step(ABC):
    """One cached step: :meth:`run` writes :attr:`output` from :meth:`inputs`, whose digest is :meth:`key`;
    :meth:`execute` skips the run when the output was made from the same inputs."""

    name: str
    output: Path
    makes_folder = True

    @abstractmethod
    def inputs(self) -> tuple[object, ...]:
        """Everything the output depends on (files by name, size and mtime; upstream steps by their key)."""

    def key(self) -> str:
        return _digest(self.name, *self.inputs())

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def run(self, target: Path) -> None:
        """Writes the output at ``target`` (a new empty folder, or a file path): renamed onto ``output`` after."""

    def is_current(self) -> bool:
        """The output exists and was made from the same inputs (the step will be skipped)."""
        stamp = self.output.with_name(self.output.name + ".done.json")
        try:
            return self.output.exists() and json.loads(stamp.read_text()).get("key") == self.key()
        except (OSError, ValueError):
            return False

    def execute(self) -> StepRecord:
        key = self.key()
        stamp = self.output.with_name(self.output.name + ".done.json")
        if self.is_current():
            return StepRecord(self.name, "cached", 0.0, "same inputs as a finished earlier run")
        started = time.monotonic()
        stamp.unlink(missing_ok=True)
        if self.output.is_dir():  # stale: made from other inputs (no point holding the disk space meanwhile)
            shutil.rmtree(self.output)
        elif self.output.exists():
            self.output.unlink()
        writer: Callable[[Path], contextlib.AbstractContextManager[Path]] = \
            atomic_dir if self.makes_folder else atomic_path
        with writer(self.output) as target:
            self.run(target)
        atomic_write_text(stamp, json.dumps({"key": key, "finished": time.time()}))
        return StepRecord(self.name, "done", time.monotonic() - started)


#: Bumped when the dequantization's output changes for the same input (a cached result is then remade).
DEQUANTIZE_FORMAT = 1


@dataclass
class DequantizeStep(Step):
    """A bitsandbytes checkpoint dequantized (``bnb.dequantize_into``: tensor by tensor, bit-exact with
    bitsandbytes) into a plain checkpoint at the dtype it records; then, when no LoRA merge follows (the merge
    checks its own output), the same smoke check as a merged checkpoint."""

    source: CheckpointInfo
    quantization: SourceQuantization
    output: Path
    reporter: Reporter
    smoke: bool = True
    name: str = "dequantize"

    @cached_property
    def planned(self) -> CheckpointInfo:
        """The checkpoint this step writes, as the planner sees it (shapes, dtypes and sizes; nothing read)."""
        return dequantized_view(self.source)

    def inputs(self) -> tuple[object, ...]:
        return _files_signature(self.source), self.quantization.to_dict(), DEQUANTIZE_FORMAT, self.smoke

    @cached_property
    def dtype(self) -> str | None:
        """What the quantized weights become (bitsandbytes' own dequantized dtype)."""
        return dequantized_dtype(self.source)

    def describe(self) -> str:
        return f"{self.quantization.describe()} in {self.source.path} -> {self.dtype} safetensors, tensor by tensor"

    def run(self, target: Path) -> None:
        from rkedge.convert.bnb import dequantize_into

        self.reporter.step("dequantize", self.describe())
        dequantize_into(self.source.path, target, progress=self.reporter.log)
        if self.smoke:
            from rkedge.lora.merge import smoke_forward_in_child

            self.reporter.step("smoke", "the dequantized checkpoint checked tensor by tensor, then a forward pass "
                                        "of its first layers (in a child process)")
            smoke_forward_in_child(target)


@dataclass
class MergeStep(Step):
    """The LoRA merged into the base weights (``--lora-mode merge``), then a forward pass on the host."""

    base: CheckpointInfo | DequantizeStep  # the user's checkpoint, or its dequantized copy
    adapter_dir: Path
    adapter: AdapterInfo
    dtype: str | None
    output: Path
    reporter: Reporter
    allow_base_mismatch: bool = False
    name: str = "merge"

    @property
    def base_dir(self) -> Path:
        return self.base.output if isinstance(self.base, DequantizeStep) else self.base.path

    def inputs(self) -> tuple[object, ...]:
        upstream = self.base.key() if isinstance(self.base, DequantizeStep) else _files_signature(self.base)
        return upstream, self.adapter.weights_sha256, self.dtype

    def describe(self) -> str:
        return f"LoRA {self.adapter_dir} into {self.base_dir}"

    def run(self, target: Path) -> None:
        from rkedge.lora.merge import merge_lora, smoke_forward_in_child

        self.reporter.step("merge", self.describe())
        # The planner checked the adapter's base name against the user's checkpoint (with the user's
        # --allow-base-mismatch); the dequantized copy sits in the work folder under another name by construction,
        # so only the merge's shape checks apply to it.
        merge_lora(self.base_dir, self.adapter_dir, target, dtype=self.dtype, progress=self.reporter.progress,
                   allow_base_mismatch=self.allow_base_mismatch or isinstance(self.base, DequantizeStep))
        self.reporter.step("smoke", "the merged checkpoint checked tensor by tensor, then a forward pass of its "
                                    "first layers (in a child process)")
        smoke_forward_in_child(target)


@dataclass
class ExportStep(Step):
    """The checkpoint the toolkit loads: sharded safetensors in the load dtype, with ``rkedge_export.json``."""

    source: CheckpointInfo | MergeStep | DequantizeStep  # the user's checkpoint, or an earlier step's output
    dtype: str | None
    chat: ChatSetup
    model_name: str
    output: Path
    reporter: Reporter
    name: str = "export"

    @cached_property
    def checkpoint(self) -> CheckpointInfo:
        """What is exported: the user's checkpoint, or the merged / dequantized one (read once that step ran)."""
        if isinstance(self.source, Step):
            return inspect_checkpoint(self.source.output)
        return self.source

    @property
    def source_dir(self) -> Path:
        return self.source.output if isinstance(self.source, Step) else self.source.path

    def upstream(self) -> object:
        return self.source.key() if isinstance(self.source, Step) else _files_signature(self.source)

    def meta(self) -> dict[str, Any]:
        info = self.checkpoint
        return {"name": self.model_name, "chat_family": self.chat.family, "chat_template": self.chat.parts_dict(),
                "jinja_chat_template": info.chat_template, "special_tokens": special_tokens(info.tokenizer_config),
                "bos_token_id": info.token_id("bos"), "eos_token_id": info.token_id("eos"),
                "source": info.source_name, "source_sha256": _digest("source", _files_signature(info)),
                "rkedge_version": __version__}

    def inputs(self) -> tuple[object, ...]:
        return self.upstream(), self.dtype, self.meta()

    def describe(self) -> str:
        return f"{self.source_dir} -> sharded safetensors ({self.dtype or 'as stored'})"

    def run(self, target: Path) -> None:
        info = self.checkpoint
        self.reporter.step("export", f"{self.source_dir} -> sharded safetensors ({self.dtype or info.main_dtype})")
        export_checkpoint(info, target, dtype=self.dtype, meta=self.meta(), progress=self.reporter.progress)


@dataclass
class CalibrationStep(Step):
    """The calibration set: prompts rendered with the chat template, targets generated by the float model."""

    export: ExportStep
    items: list[dict[str, Any]]
    chat: ChatSetup
    output: Path
    reporter: Reporter
    name: str = "calibration"
    makes_folder = False

    def inputs(self) -> tuple[object, ...]:
        return self.export.key(), self.items, self.chat.family

    def describe(self) -> str:
        targets = "targets from the float model" if calib.needs_generation(self.items) else "targets as given"
        return f"{len(self.items)} prompts rendered with the chat template; {targets}"

    def run(self, target: Path) -> None:
        self.reporter.step("calibration", self.describe())
        exported = self.export.output
        generate = calib.greedy_generator(exported, work_dir=self.output.parent) \
            if calib.needs_generation(self.items) else None
        data = calib.build_calibration(self.items, _hf_renderer(exported) or self.chat.render, generate)
        target.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")

    @cached_property
    def data(self) -> list[dict[str, str]]:
        loaded: list[dict[str, str]] = json.loads(self.output.read_text(encoding="utf-8"))
        return loaded


def _steps(the_plan: Plan, info: CheckpointInfo, work: Path, reporter: Reporter
           ) -> tuple[DequantizeStep | None, MergeStep | None, ExportStep, CalibrationStep]:
    """The plan's steps as objects (nothing runs or is written here)."""
    request = the_plan.request
    chat = the_plan.chat
    assert chat is not None  # plan() sets it for every checkpoint it accepts
    dequantize = None
    if the_plan.source_quantization is not None:
        dequantize = DequantizeStep(info, the_plan.source_quantization, work / "dequantized", reporter,
                                    smoke=not the_plan.merges_adapter)
    merge = None
    if the_plan.merges_adapter:
        assert the_plan.adapter is not None and request.lora is not None
        merge = MergeStep(dequantize or info, request.lora, the_plan.adapter, request.load_dtype, work / "merged",
                          reporter, request.allow_base_mismatch)
    export = ExportStep(merge or dequantize or info, request.load_dtype, chat, Path(the_plan.output_name).stem,
                        work / "export", reporter)
    calibration = CalibrationStep(export, the_plan.calibration, chat, work / "calibration.json", reporter)
    assert [s.name for s in (dequantize, merge, export, calibration) if s] == the_plan.steps[:-1]
    return dequantize, merge, export, calibration


def _clean_leftovers(out: Path, work: Path) -> None:
    """Removes what an interrupted run left: staging folders, partial step outputs and job files (called with
    the folder's lock held, so none of them belongs to a live run)."""
    from rkedge.convert.toolkit.runner import JOB_FILE_GLOB

    for leftover in [*out.glob(f"{STAGING_PREFIX}*"), *work.glob("*.partial-*"), *out.glob(".*.part"),
                     *work.glob(".*.part"), *work.glob(JOB_FILE_GLOB)]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _run_toolkit(env: ToolkitEnv, job: ToolkitJob, reporter: Reporter, *, job_dir: Path) -> ToolkitResult:
    from rkedge.convert.toolkit import run_job

    def on_event(event: Event) -> None:
        kind = event.get("type")
        if kind == "log":
            reporter.log(event.get("line", ""))
        elif kind == "progress" and event.get("fraction") is not None:
            reporter.progress(int(event["fraction"] * 100), 100, event.get("step", ""))
        elif kind == "progress":
            reporter.log(f"[{event.get('step')}] {event.get('state')}")

    run = run_job(env, job.worker_job(), on_event=on_event, job_dir=job_dir)
    run.raise_for_error(what=f"rkllm-toolkit {env.version}")
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

def _hf_renderer(model_dir: Path) -> Callable[[str], str] | None:
    """The official generator's rendering: the tokenizer's own chat template (needs transformers)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if not getattr(tokenizer, "chat_template", None):
            return None
    except Exception:  # no transformers, or a tokenizer it cannot load: fall back on rkedge's renderer
        return None

    def render(prompt: str) -> str:
        return str(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True))

    return render


def _files_signature(info: CheckpointInfo) -> list[tuple[str, int, int]]:
    files = [info.path / "config.json", *info.weight_files]
    files += [info.path / name for name in info.tokenizer_files]
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]


def _digest(*parts: object) -> str:
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


def _recommended(the_plan: Plan, max_context: int, runtime_version: str) -> dict[str, Any]:
    """The runtime settings the manifest recommends to the board (F-1: rkedge.fit's driver gate)."""
    recommended: dict[str, Any] = {"max_context_len": max_context, "runtime_version": runtime_version,
                                   "min_rknpu_driver": fit.DRIVER_GATE_FIXED_IN}
    if the_plan.size is not None and fit.needs_driver_gate(the_plan.size.weight_bytes):
        recommended["base_domain_id"] = LARGE_WEIGHTS_BASE_DOMAIN_ID
    return recommended


def _file_entry(path: Path) -> LoraFile:
    return {"file": path.name, "sha256": sha256_file(path), "size": path.stat().st_size}


def _template_parts(chat: ChatSetup | None) -> ChatTemplateParts | None:
    if chat is None or chat.parts is None:
        return None
    system, prefix, postfix = chat.parts
    return {"system_prompt": system, "prompt_prefix": prefix, "prompt_postfix": postfix}


def _manifest(the_plan: Plan, env: ToolkitEnv, run: ToolkitResult, *, source: CheckpointInfo,
              exported: CheckpointInfo, calibration: CalibrationStep, model_tmp: Path, lora_tmp: Path | None,
              calls: Mapping[str, Mapping[str, Any]], findings: list[Finding], started: float) -> Manifest:
    """``source``: the user's checkpoint; ``exported``: what the toolkit loaded (the merged one with a LoRA);
    ``calls``: as passed to the toolkit, with the final model path (the toolkit wrote a temporary name)."""
    request = the_plan.request
    adapter = the_plan.adapter
    chat = the_plan.chat
    build = dict(calls["build"])
    max_context = int(build.get("max_context", DEFAULT_MAX_CONTEXT))
    data = calibration.data
    simulated = env.simulated
    quantized = the_plan.source_quantization
    return Manifest(
        backend="rkllm",
        simulated=simulated,
        name=Path(the_plan.output_name).stem,
        model_file=the_plan.output_name,
        sha256=sha256_file(model_tmp),
        size=model_tmp.stat().st_size,
        lora_file=_file_entry(lora_tmp) if lora_tmp else None,
        architecture=exported.architecture,
        model_type=exported.model_type,
        platform=build.get("target_platform", request.platform),
        dtype=build.get("quantized_dtype", request.dtype),
        max_context_limit=max_context,
        npu_cores=build.get("num_npu_core"),
        chat_family=chat.family if chat else None,
        chat_template=exported.chat_template,
        chat_template_parts=_template_parts(chat),
        special_tokens=special_tokens(exported.tokenizer_config) or None,
        bos_token_id=exported.token_id("bos"),
        eos_token_id=exported.token_id("eos"),
        toolkit={"kind": env.kind, "version": env.version, "label": env.label,
                 "python": (env.probe or {}).get("python") or (host_description()["python"] if simulated else None),
                 "reported_version": run.toolkit_version},
        rkedge_version=__version__,
        inputs={
            "model": {"path": str(request.model.resolve()), "source": source.source_name,
                      "revision": source.source_revision,
                      "sha256": _weights_digest(source, request.out / WORK / "hashes.json"),
                      "parameters": dequantized_view(source).param_count},
            **({"source_quantization": {**quantized.to_dict(), "dequantized_dtype": dequantized_dtype(source)},
                "base_model": base_model_name(source.path)} if quantized is not None else {}),
            "adapter": ({"path": str(request.lora.resolve()), "mode": request.lora_mode, "name": request.lora.name,
                         "base_model_name_or_path": adapter.base_model_name_or_path,
                         "sha256": adapter.weights_sha256}
                        if adapter is not None and request.lora is not None else None),
            "calibration": {"path": str(calibration.output), "sha256": calib.digest(data), "items": len(data),
                            "generator": "chat template + greedy float-model targets",
                            "languages": dict(calib.language_mix(data))},
        },
        toolkit_calls={method: dict(kwargs) for method, kwargs in calls.items()},
        request={"algorithm": request.algorithm, "hybrid_rate": request.hybrid_rate,
                 "optimization_level": request.optimization_level, "board": request.board,
                 "allow_known_failure": request.allow_known_failure},
        findings=[f.to_dict() for f in findings],
        estimate=the_plan.size.to_dict() if the_plan.size is not None else None,
        runtime={"recommended": _recommended(the_plan, max_context, env.version),
                 "prompt_renderer": chat.prompt_renderer if chat else "toolkit"},
        host=host_description(),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        wall_time_s=round(time.monotonic() - started, 3),
    )


def _convert_gguf(request: ConversionRequest, *, dry_run: bool) -> ConversionResult:
    """GGUF input: planned and checked (``planner.plan_gguf``); converting it is not implemented yet."""
    the_plan = plan_gguf(request, inspect_gguf(request.model))
    if dry_run or the_plan.findings:
        if not dry_run:
            raise_on_errors(the_plan.findings, "this conversion")
        return ConversionResult(the_plan, dry_run)
    raise InputError("GGUF conversion (fp16 GGUF) is planned and checked, but converting it is not implemented yet.",
                     fix="convert from the Hugging Face checkpoint (the same weights) instead")

