"""The model card (``README.md``) beside a converted model, with Hugging Face front matter
(``huggingface_hub.ModelCard``), for both backends."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def source_card_license(model_dir: Path) -> str | None:
    """The ``license:`` of the source model card's front matter, carried to ours."""
    from huggingface_hub import ModelCard

    card = model_dir / "README.md"
    if not card.is_file():
        return None
    try:
        license_id = ModelCard.load(card, ignore_metadata_errors=True).data.license
    except Exception:  # an unreadable card just has no licence to carry
        return None
    return str(license_id).strip() if license_id else None


def with_front_matter(body: Sequence[str], *, tags: Sequence[str], base_model: str | None = None,
                      license_id: str | None = None) -> str:
    """``body`` (lines) under Hugging Face front matter: base model, licence, pipeline tag and tags."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=base_model, license=license_id, pipeline_tag="text-generation", tags=list(tags))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(["", *body])))


def render_card(manifest: Mapping[str, Any], *, license_id: str | None) -> str:
    build = manifest["toolkit_calls"]["build"]
    source = manifest["inputs"]["model"]
    adapter = manifest["inputs"].get("adapter")
    quantized = manifest["inputs"].get("source_quantization")  # a bitsandbytes source rkedge dequantized
    base_model = (manifest["inputs"].get("base_model") if quantized else None) or source.get("source")
    simulated = manifest.get("simulated", False)
    tags = ["rkllm", "rockchip", "npu", manifest["platform"], manifest["dtype"]]
    if simulated:
        tags.append("rkedge-simulated")
    name = manifest["name"]
    lines = [f"# {name} for {manifest['platform'].upper()} ({manifest['dtype']})", ""]
    if simulated:
        lines += ["> **Simulated model.** This file was written by rkedge's simulated toolkit, not by Rockchip's",
                  "> rkllm-toolkit. It holds no weights and only runs on rkedge's simulated NPU (`--mock`); a board's",
                  "> librkllmrt refuses it. Convert with the real toolkit (`--toolkit PYTHON`) for a board.", ""]
    if quantized:
        lines += [f"> **Warning**: {quantized['warning']}.", ""]
    lines += [f"`{manifest['model_file']}` was converted by rkedge "
              f"{manifest['rkedge_version']} with rkllm-toolkit {manifest['toolkit']['version']}.", "",
              "| | |", "|---|---|",
              f"| base model | {base_model or source.get('path')} |"]
    if quantized:
        lines.append(f"| source | {source.get('source') or source.get('path')}: {quantized['description']}, "
                     f"dequantized by rkedge to {quantized.get('dequantized_dtype') or 'float'} before the toolkit |")
    lines += [f"| revision | {source.get('revision') or 'not recorded'} |",
              f"| platform | {manifest['platform']} ({build.get('num_npu_core', '?')} NPU cores) |",
              f"| quantization | {manifest['dtype']}, algorithm {build.get('quantized_algorithm', 'normal')}, "
              f"hybrid_rate {build.get('hybrid_rate', 0)}, optimization_level {build.get('optimization_level')} |",
              f"| context | {manifest['max_context_limit']} tokens (max_context_limit) |",
              f"| toolkit | rkllm-toolkit {manifest['toolkit']['version']} |",
              f"| chat template | {manifest.get('chat_family') or 'embedded by the toolkit'} |",
              f"| sha256 | `{manifest['sha256']}` |"]
    if adapter:
        how = "merged into the weights" if adapter["mode"] == "merge" else "a separate runtime adapter"
        lines.append(f"| LoRA | {adapter['name']} ({how}; weights sha256 `{str(adapter['sha256'])[:16]}...`) |")
    recommended = manifest.get("runtime", {}).get("recommended", {})
    abi = recommended.get("runtime_version", manifest["toolkit"]["version"])
    lines += ["", "## Run it", "", "On the board, with a runtime of the same generation as the toolkit "
              f"(librkllmrt {abi}; older runtimes cannot read newer models, F-3):", "", "```sh",
              f"rkedge doctor --model {manifest['model_file']}",
              f"rkedge chat {manifest['model_file']} --abi {abi}"
              + (f" --base-domain-id {recommended['base_domain_id']}" if recommended.get("base_domain_id") else "")]
    if manifest.get("lora_file"):
        lines.append(f"rkedge chat {manifest['model_file']} --abi {abi} --lora {manifest['lora_file']['file']}")
    lines += [f"rkedge serve {manifest['model_file']} --abi {abi}", "```", "",
              "The manifest beside the model (`" + manifest["model_file"] + ".json`) records every argument passed to "
              "the toolkit, the inputs' hashes and the checks that ran.", ""]
    findings = [f for f in manifest.get("findings", []) if f["severity"] in ("warning", "error")]
    if findings:
        lines += ["## Notes from the checks", ""]
        lines += [f"- {f['id']}: {f['message']}" for f in findings]
        lines.append("")
    return with_front_matter(lines, tags=tags, base_model=base_model, license_id=license_id)
