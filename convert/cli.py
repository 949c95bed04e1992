"""Host-side commands: ``inspect``, ``convert``, ``toolkit install|list`` (and ``plan``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from rkedge.errors import CheckFailed

if TYPE_CHECKING:
    from rkedge.convert.findings import Finding


class StderrReporter:
    """Step lines and progress bars on stderr; stdout stays for the summary (or --json)."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self._bar: Any = None

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.render_finish()
            self._bar = None

    def step(self, name: str, detail: str = "") -> None:
        self._close_bar()
        click.echo(f"[..] {name}: {detail}", err=True)

    def progress(self, done: int, total: int, label: str) -> None:
        if self._bar is None or total != self._bar.length:
            self._close_bar()
            self._bar = click.progressbar(length=max(total, 1), label="     progress", file=sys.stderr, show_pos=True)
        self._bar.pos = min(done, self._bar.length)
        self._bar.current_item = label
        self._bar.render_progress()

    def log(self, line: str) -> None:
        if self.verbose and line.strip():
            self._close_bar()
            click.echo(f"     {line}", err=True)

    def done(self) -> None:
        self._close_bar()


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_command(path: Path, as_json: bool) -> None:
    """Show what a checkpoint folder, config.json, adapter, .gguf or .rkllm holds (no weights are loaded)."""
    from rkedge.convert.inspect import inspect_path

    info = inspect_path(path)
    if as_json:
        click.echo(json.dumps(info, indent=1, default=str, ensure_ascii=False))
        return
    for key, value in info.items():
        if key == "source_quantization" and isinstance(value, dict):  # what it is, what rkedge does with it
            click.echo(f"{key:>24}: {value['description']}; {value['rkedge']}")
            if value.get("warning"):
                click.echo(f"{'':>24}  warning: {value['warning']}")
            continue
        if isinstance(value, (dict, list)) and value:
            value = json.dumps(value, default=str, ensure_ascii=False)
            value = value if len(value) < 160 else value[:157] + "..."
        click.echo(f"{key:>24}: {value}")


@click.command("convert")
@click.argument("model_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for the .rkllm, its manifest and model card.")
@click.option("--platform", default="rk3588", show_default=True, help="Target SoC (rk3588, rk3576, rk3562, rv1126b).")
@click.option("--dtype", default="w8a8", show_default=True,
              help="quantized_dtype (rk3588: w8a8, w8a8_g128, w8a8_g256, w8a8_g512).")
@click.option("--toolkit-version", default=None,
              help="rkllm-toolkit version to plan for (default: the toolkit environment in use; 1.3.0 for mock).")
@click.option("--max-context", type=int, default=None, help="max_context baked into the model (<= 16384, multiple of 32).")
@click.option("--npu-cores", type=int, default=None, help="num_npu_core (rk3588: 1-3; default: all).")
@click.option("--algorithm", default="normal", show_default=True, help="quantized_algorithm (normal, grq, gdq, normal_rN...).")
@click.option("--hybrid-rate", type=float, default=0.0, show_default=True, help="hybrid_rate in [0, 1).")
@click.option("--optimization-level", type=int, default=0, show_default=True, help="0 (fast runtime) or 1.")
@click.option("--calibration", default="auto", show_default=True,
              help="auto (built-in multilingual prompts) or a JSON file of prompts / {input, target} items; rknn "
                   "also takes plain text (FILE.txt, split at blank lines) and holds a fifth of it out for the "
                   "quality report.")
@click.option("--lora", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A PEFT LoRA adapter folder.")
@click.option("--lora-mode", type=click.Choice(["merge", "runtime"]), default="merge", show_default=True,
              help="merge: into the weights before converting; runtime: a separate <name>_lora.rkllm.")
@click.option("--board", default=None, help="Board profile id (boards/*.json) for the fit check.")
@click.option("--toolkit", default=None,
              help="mock (the simulated toolkit) or the python of an rkllm-toolkit environment "
                   "(default: the newest one installed with `rkedge toolkit install`).")
@click.option("--load-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="dtype the checkpoint is exported and loaded in (toolkit 1.2.0+; float16 halves host memory).")
@click.option("--name", default=None, help="Base name of the output (default: the model's name).")
@click.option("--allow-known-failure", is_flag=True,
              help="Convert even when the combination is known to fail on the board (e.g. to reproduce it).")
@click.option("--allow-base-mismatch", is_flag=True,
              help="With --lora: accept an adapter trained on another base name whose shapes fit this model (a "
                   "renamed copy of the same model); without it such an adapter is refused.")
@click.option("--backend", type=click.Choice(["rkllm", "rknn"]), default="rkllm", show_default=True,
              help="rkllm: rkllm-toolkit -> .rkllm; rknn: RecurrentGemma as rknn-toolkit2 decode-step graphs.")
@click.option("--no-hybrid", is_flag=True, help="rknn w8a8: quantize the RG-LRU path and states too (plain w8a8).")
@click.option("--graph-params", type=int, default=None,
              help="rknn: most parameters per layer graph (default: ~1 GB of weights, within the host's RAM).")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="rknn: held-out text for the quality report (default: a built-in paragraph).")
@click.option("--eval-steps", type=click.IntRange(1, 100_000), default=None,
              help="rknn: teacher-forced steps of the quality report (default 256, fewer for models the simulator "
                   "runs slowly: about a minute per step at 2.7B).")
@click.option("--quality-target", default=None,
              help="rknn w8a8: what the fp16 parts are chosen to reach against the float model, and what every "
                   "build is checked against (default top1=0.95,nll=1.0: top-1 >= 95%, |NLL delta| <= 1%).")
@click.option("--prefill-chunk", type=click.IntRange(0, 1024), default=None,
              help="rknn: tokens per chunked-prefill graph run (default: chosen per model, 16-64; 0: no prefill "
                   "graphs, the prompt runs token by token).")
@click.option("--dry-run", is_flag=True, help="Plan and check only; exit 2 on any error finding.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show the toolkit's log lines.")
def convert_command(model_dir: Path, out_dir: Path, platform: str, dtype: str, toolkit_version: str | None,
                    max_context: int | None, npu_cores: int | None, algorithm: str, hybrid_rate: float,
                    optimization_level: int, calibration: str, lora: Path | None, lora_mode: str, board: str | None,
                    toolkit: str | None, load_dtype: str | None, name: str | None, allow_known_failure: bool,
                    allow_base_mismatch: bool, backend: str, no_hybrid: bool, graph_params: int | None, eval_text: Path | None,
                    eval_steps: int | None, prefill_chunk: int | None, quality_target: str | None,
                    dry_run: bool, as_json: bool, verbose: bool) -> None:
    """Convert MODEL_DIR (a Hugging Face checkpoint) into a .rkllm for the NPU, checking it first.

    With --backend rknn, a RecurrentGemma checkpoint becomes an RKNN bundle instead (rknn-toolkit2)."""
    if backend == "rknn":
        _convert_rknn(model_dir, out_dir, platform=platform, dtype=dtype, calibration=calibration, lora=lora,
                      name=name, hybrid=not no_hybrid, graph_params=graph_params, eval_text=eval_text,
                      eval_steps=eval_steps, prefill_chunk=prefill_chunk, quality_target=quality_target,
                      dry_run=dry_run, as_json=as_json,
                      verbose=verbose, ignored=_explicit(click.get_current_context(), RKLLM_ONLY))
        return
    from rkedge.convert.vlm import is_vlm_checkpoint

    if is_vlm_checkpoint(model_dir) and not dry_run:
        # A vision-language checkpoint: its language model through the pipeline below (saved alone), its vision
        # tower through rknn-toolkit2, one vlm.json naming both (rkedge.convert.vlm).
        from rkedge.convert.vlm import VlmRequest, convert_vlm
        from rkedge.errors import InputError

        taken = ("toolkit", "toolkit_version", "dtype", "calibration", "name", "verbose", "as_json", "backend", "model_dir",
                 "out_dir")
        ctx = click.get_current_context()
        if ignored := _explicit(ctx, {p.name: p.opts[0] for p in ctx.command.params if p.name and p.name not in taken}):
            raise InputError(f"{', '.join(ignored)}: not taken by the vision-language path (yet).",
                             fix="drop them; a VLM converts with --toolkit, --toolkit-version, --dtype, "
                                 "--calibration and --name")
        reporter = StderrReporter(verbose)
        try:
            vlm = convert_vlm(VlmRequest(model=model_dir, out=out_dir, toolkit=toolkit, toolkit_version=toolkit_version,
                                         llm_dtype=dtype, calibration=calibration, name=name),
                              log=lambda line: reporter.step("vlm", line))
        finally:
            reporter.done()
        lines = [json.dumps(vlm.manifest.to_dict(), indent=1, default=str)] if as_json else vlm.render()
        for line in lines:
            click.echo(line)
        return
    from rkedge.convert.pipeline import convert
    from rkedge.convert.planner import ConversionRequest

    request = ConversionRequest(
        model=model_dir, out=out_dir, platform=platform, dtype=dtype, toolkit_version=toolkit_version,
        max_context=max_context, npu_cores=npu_cores, algorithm=algorithm, hybrid_rate=hybrid_rate,
        optimization_level=optimization_level, calibration=calibration, lora=lora,
        lora_mode="runtime" if lora_mode == "runtime" else "merge", board=board, toolkit=toolkit,
        load_dtype=load_dtype, name=name, allow_known_failure=allow_known_failure,
        allow_base_mismatch=allow_base_mismatch)
    reporter = StderrReporter(verbose)
    try:
        result = convert(request, dry_run=dry_run, reporter=reporter)
    finally:
        reporter.done()
    if not dry_run:
        for step in result.steps:
            click.echo(f"[ok] {step.name}: {step.status} ({step.seconds:.1f} s)", err=True)
    _echo_result(result.summary(), result.findings, as_json=as_json, dry_run=dry_run, lines=result.render())


#: Options of the RKLLM backend (parameter name -> how the user spells it); --backend rknn refuses them when given.
RKLLM_ONLY = {"toolkit_version": "--toolkit-version", "max_context": "--max-context", "npu_cores": "--npu-cores",
              "algorithm": "--algorithm", "hybrid_rate": "--hybrid-rate", "optimization_level": "--optimization-level",
              "lora_mode": "--lora-mode", "board": "--board", "toolkit": "--toolkit", "load_dtype": "--load-dtype",
              "allow_known_failure": "--allow-known-failure", "allow_base_mismatch": "--allow-base-mismatch"}


def _explicit(ctx: click.Context, options: dict[str, str]) -> list[str]:
    """The ``options`` given on the command line (or by environment), even when equal to their defaults."""
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return [spelled for param, spelled in options.items() if ctx.get_parameter_source(param) in given]


def _echo_result(summary: dict[str, Any], findings: Sequence[Finding], *, as_json: bool, dry_run: bool,
                 lines: list[str]) -> None:
    """The summary as JSON, or the findings and ``lines``; a dry run with error findings then exits 2."""
    if as_json:
        click.echo(json.dumps(summary, indent=1, default=str, ensure_ascii=False))
    else:
        for finding in findings:
            click.echo(finding.render(), err=not dry_run)
        for line in lines:
            click.echo(line)
    errors = [f for f in findings if f.severity == "error"]
    if dry_run and errors:
        raise CheckFailed(f"{len(errors)} error finding(s): " + "; ".join(f.id for f in errors),
                          fix="see the findings above")


def _convert_rknn(model_dir: Path, out_dir: Path, *, platform: str, dtype: str, calibration: str, lora: Path | None,
                  name: str | None, hybrid: bool, graph_params: int | None, eval_text: Path | None,
                  eval_steps: int | None, prefill_chunk: int | None, quality_target: str | None,
                  dry_run: bool, as_json: bool, verbose: bool, ignored: list[str]) -> None:
    from rkedge.convert.rknn.pipeline import RknnRequest, convert_rknn
    from rkedge.errors import InputError

    if ignored:
        raise InputError(f"{', '.join(ignored)} belong(s) to the RKLLM backend; --backend rknn does not take them.",
                         fix="drop them (see rkedge convert --help for the rknn options)")
    request = RknnRequest(model=model_dir, out=out_dir, dtype=dtype, platform=platform, hybrid=hybrid,
                          calibration=calibration, eval_text=eval_text, eval_steps=eval_steps,
                          graph_params=graph_params, name=name, lora=lora, prefill_chunk=prefill_chunk,
                          quality_target=quality_target)
    reporter = StderrReporter(verbose)
    try:
        result = convert_rknn(request, dry_run=dry_run, progress=reporter.step, log=reporter.log)
    finally:
        reporter.done()
    _echo_result(result.summary(), result.findings, as_json=as_json, dry_run=dry_run, lines=result.render())


@click.command("plan")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--dtype", default="w8a8", show_default=True)
@click.option("--max-context", type=int, default=4096, show_default=True, help="Context the KV cache is sized for.")
@click.option("--board", default=None, help="Board profile id (boards/*.json): its RAM options.")
@click.option("--ram", "ram_gb", type=float, default=None, help="Board RAM in GB (instead of --board).")
@click.option("--prompt-tokens", type=int, default=128, show_default=True, help="Prompt length for TTFT.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan_command(model: Path, dtype: str, max_context: int, board: str | None, ram_gb: float | None,
                 prompt_tokens: int, as_json: bool) -> None:
    """Predict memory, TTFT and tokens/s of MODEL (checkpoint folder or config.json) on an RK3588 board."""
    from rkedge.convert.plan import plan_model, report_json

    if board and ram_gb:
        raise click.BadParameter("use --board or --ram, not both", param_hint="--board/--ram")
    report = plan_model(model, dtype=dtype.lower(), max_context=max_context, board=board, ram_gb=ram_gb,
                        prompt_tokens=prompt_tokens)
    click.echo(report_json(report) if as_json else report.render())


@click.group("toolkit")
def toolkit_group() -> None:
    """rkllm-toolkit environments (one virtual environment per toolkit version)."""


#: The CPU build of torch: the toolkit's normal quantization runs on the CPU, and the default (CUDA) build of a
#: pinned torch is several GB. grq/gdq need CUDA (--torch cuda).
CPU_TORCH_INDEX = ("--extra-index-url", "https://download.pytorch.org/whl/cpu")


@toolkit_group.command("install")
@click.argument("wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--python", "python", default=None, help="Python interpreter for the venv (must match the wheel's cp tag).")
@click.option("--torch", "torch_build", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Which build of the pinned torch to install (cuda is needed for grq/gdq).")
@click.option("--force", is_flag=True, help="Replace an existing environment of the same version.")
def toolkit_install(wheel: Path, python: str | None, torch_build: str, force: bool) -> None:
    """Make a virtual environment for a downloaded rkllm_toolkit WHEEL, with that version's pins."""
    from rkedge.convert.toolkit.environments import install_toolkit

    record = install_toolkit(wheel, python=python, force=force, pip_args=CPU_TORCH_INDEX if torch_build == "cpu" else (),
                             log=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(_record_dict(record), indent=1, default=str))


@toolkit_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def toolkit_list(as_json: bool) -> None:
    """List the toolkit environments rkedge installed."""
    from rkedge.convert.toolkit.environments import list_toolkits

    records = [_record_dict(r) for r in list_toolkits()]
    if as_json:
        click.echo(json.dumps(records, indent=1, default=str))
    elif not records:
        click.echo("no toolkit environments; install one with `rkedge toolkit install WHEEL`, or use --toolkit mock")
    else:
        for record in records:
            click.echo(f"{record.get('version'):8} {record.get('python')}")


def _record_dict(record: Any) -> dict[str, Any]:
    return record.to_dict() if hasattr(record, "to_dict") else dict(record)


def register(group: click.Group) -> None:
    group.add_command(inspect_command)
    group.add_command(convert_command)
    group.add_command(plan_command)
    group.add_command(toolkit_group)
