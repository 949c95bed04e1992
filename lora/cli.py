"""``rkedge lora inspect`` and ``rkedge lora merge``: thin commands over ``rkedge.lora.adapter`` / ``.merge``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from rkedge.convert.findings import Finding, errors

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@click.group("lora")
def lora() -> None:
    """LoRA adapters: inspect one, check it against a base, merge it (streaming) into a new checkpoint."""


#: Shared by `lora inspect`, `lora merge` and `convert --lora`.
ALLOW_BASE_MISMATCH_HELP = ("Accept an adapter trained on another base name whose shapes fit this base (a renamed "
                            "copy of the same model); without it such an adapter is refused.")


@lora.command("inspect")
@click.argument("adapter", type=_DIR)
@click.option("--base", "base", type=_DIR, default=None, help="Check the adapter against this base checkpoint.")
@click.option("--allow-base-mismatch", is_flag=True, help=ALLOW_BASE_MISMATCH_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@click.pass_context
def inspect_command(ctx: click.Context, adapter: Path, base: Path | None, allow_base_mismatch: bool,
                    as_json: bool) -> None:
    """Show what ADAPTER holds (from headers; no weights are loaded). Exit code 2 if --base finds an error."""
    from rkedge.lora.adapter import inspect_adapter, validate_adapter

    info = inspect_adapter(adapter)
    findings = validate_adapter(info, base, allow_base_mismatch=allow_base_mismatch) if base is not None else []
    if as_json:
        payload: dict[str, Any] = {"adapter": info.to_dict()}
        if base is not None:
            payload["base"] = str(base)
            payload["findings"] = [f.to_dict() for f in findings]
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(render_adapter(info.to_dict()))
        if base is not None:
            click.echo(f"\nchecked against {base}:")
            click.echo("\n".join(f.render() for f in findings) if findings else "  no findings")
    if errors(findings):
        ctx.exit(2)


@lora.command("merge")
@click.option("--base", "base", type=_DIR, required=True, help="Base checkpoint folder (config.json + safetensors).")
@click.option("--adapter", "adapter", type=_DIR, required=True, help="peft adapter folder.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="New folder for the merged model.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Convert every floating tensor (default: keep the base's dtypes).")
@click.option("--no-smoke", is_flag=True, help="Skip the forward pass of the merged model with transformers.")
@click.option("--allow-base-mismatch", is_flag=True, help=ALLOW_BASE_MISMATCH_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the merge report (and smoke result) as JSON on stdout.")
def merge_command(base: Path, adapter: Path, out: Path, dtype: str | None, no_smoke: bool, allow_base_mismatch: bool,
                  as_json: bool) -> None:
    """Merge ADAPTER into BASE, streaming shard by shard, and write a new checkpoint to OUT."""
    from rkedge.convert.findings import raise_on_errors
    from rkedge.lora.adapter import MERGE_FIX, inspect_adapter, validate_adapter
    from rkedge.lora.merge import merge_lora, smoke_forward

    findings = validate_adapter(inspect_adapter(adapter), base, allow_base_mismatch=allow_base_mismatch)
    _echo_findings(findings)  # warnings now; errors come once, in the CheckFailed message
    raise_on_errors(findings, "the LoRA merge", fix=MERGE_FIX)

    bar: Any = None
    shown = 0

    def progress(done: int, total: int, label: str) -> None:
        nonlocal bar, shown
        if bar is None:
            bar = click.progressbar(length=total, label="merging", file=sys.stderr, show_pos=False)
            bar.__enter__()
        bar.update(done - shown)
        shown = done

    try:
        report = merge_lora(base, adapter, out, dtype=dtype, progress=progress,
                            allow_base_mismatch=allow_base_mismatch)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    smoke = None if no_smoke else smoke_forward(out)
    if as_json:
        click.echo(json.dumps({"report": report.to_dict(), "smoke": smoke}, indent=2))
        return
    tied = report.tied_embeddings
    click.echo(f"merged {len(report.modules_merged)} LoRA tensor(s), replaced {len(report.tensors_replaced)} from the "
               f"adapter, {report.tensors_written} tensors in {len(report.files)} shard(s) -> {report.out_dir}")
    click.echo(f"  dtype {report.dtype}; {report.bytes_written / 1e6:.1f} MB; {report.seconds:.1f} s; "
               f"peak RSS {report.peak_rss_bytes / 1e6:.0f} MB")
    click.echo(f"  tolerance vs peft merge_and_unload: atol {report.tolerance['atol']:g} + rtol "
               f"{report.tolerance['rtol']:.3g} (computed in float32)")
    if tied["base_tied"]:
        click.echo(f"  tied embeddings: {'UNTIED' if tied['untied'] else 'kept tied'} ({tied['reason']})")
    if smoke is not None:
        click.echo(f"  smoke forward: ok, loss {smoke['loss']:.3f}, logits finite ({smoke['seconds']:.1f} s)")


def _echo_findings(findings: list[Finding]) -> None:
    for finding in findings:
        if finding.severity == "warning":
            click.echo(finding.render(), err=True)


def render_adapter(info: dict[str, Any], limit: int = 12) -> str:
    """Human summary of ``AdapterInfo.to_dict()``."""
    modules = info["modules"]
    lines = [
        f"adapter {info['path']}",
        f"  peft_type {info['peft_type']}, r {info['r']}, lora_alpha {info['lora_alpha']}, "
        f"rsLoRA {'yes' if info['use_rslora'] else 'no'}, DoRA {'yes' if info['use_dora'] else 'no'}, "
        f"bias {info['bias']}{', lora_bias' if info['lora_bias'] else ''}",
        f"  base {info['base_model_name_or_path']}" + (f" @ {info['revision']}" if info["revision"] else ""),
        f"  target_modules {info['target_modules']}; modules_to_save {info['modules_to_save']}",
    ]
    if info["rank_pattern"] or info["alpha_pattern"]:
        lines.append(f"  rank_pattern {info['rank_pattern']}; alpha_pattern {info['alpha_pattern']}")
    ranks = sorted({m["rank"] for m in modules})
    lines.append(f"  {len(modules)} LoRA module(s) ({len(info['embedding_loras'])} embedding), ranks {ranks}, "
                 f"dtypes {sorted({m['dtype'] for m in modules})}")
    for m in modules[:limit]:
        lines.append(f"    {m['name']:<48} {m['kind']:<9} r={m['rank']:<3} in={m['in_features']:<6} "
                     f"out={m['out_features']:<6} {m['dtype']:<5} scaling={m['scaling']:g}")
    if len(modules) > limit:
        lines.append(f"    ... and {len(modules) - limit} more (--json lists all)")
    for s in info["saved"][:limit]:
        lines.append(f"  saved {s['target']} {s['shape']} {s['dtype']} ({s['origin']})")
    if len(info["saved"]) > limit:
        lines.append(f"  ... and {len(info['saved']) - limit} more saved tensors")
    for item in info["unrecognised"]:
        lines.append(f"  cannot merge: {item}")
    lines.append(f"  weights {info['weights_file']} ({info['total_bytes'] / 1e6:.2f} MB, "
                 f"sha256 {info['weights_sha256']})")
    return "\n".join(lines)


def register(group: click.Group) -> None:
    group.add_command(lora)
