"""bitsandbytes checkpoints through ``rkedge convert`` on the RKLLM path (simulated toolkit), and ``rkedge inspect``.

Tiny Llama and Gemma checkpoints are quantized by transformers + bitsandbytes on CPU (4-bit nf4 with double
quantization, 4-bit fp4, 8-bit LLM.int8 with SCB) and saved as the Hub uploads are, in several shards. rkedge
dequantizes them in its own step, then the unchanged pipeline runs; the checkpoint that reaches the toolkit (the
export in the work folder) must hold exactly bitsandbytes' dequantized weights and give bitsandbytes' dequantized
model's logits (cosine >= 0.9999). The manifest and card record the source quantization and its quality warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from bnb_helpers import bnb_dequantized_weights, bnb_reference_model, cosine, quantize  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from tiny_models import make_checkpoint, train_lora  # noqa: E402

from rkedge.cli import main  # noqa: E402
from rkedge.convert.inspect import inspect_checkpoint  # noqa: E402
from rkedge.convert.pipeline import WORK, convert  # noqa: E402
from rkedge.convert.planner import ConversionRequest  # noqa: E402
from rkedge.manifest import read_manifest  # noqa: E402

#: The dtype each upload's float weights had (so both a float32 and a bfloat16 source are covered).
DTYPES = {"llama": torch.float32, "gemma": torch.bfloat16}
PROMPTS = ("Hello!", "What is an NPU?", "Name a color.", "Bonjour")
DESCRIPTIONS = {"nf4-double": "bitsandbytes 4-bit nf4 with double quantization", "fp4": "bitsandbytes 4-bit fp4",
                "int8": "bitsandbytes 8-bit (LLM.int8)"}


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompts with targets given: the float-model generation is skipped (the calibration step still runs)."""
    path = tmp_path_factory.mktemp("calib") / "calibration.json"
    path.write_text(json.dumps([{"prompt": p, "target": "ok"} for p in PROMPTS]))
    return path


@pytest.fixture(scope="module")
def float_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bnb-float")
    return {kind: make_checkpoint(root / kind, kind) for kind in DTYPES}


@pytest.fixture(scope="module")
def quantized(float_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``quantized(kind, scheme)`` -> (the saved upload's folder, bitsandbytes' quantized model), made once."""
    root = tmp_path_factory.mktemp("bnb-uploads")
    made: dict[tuple[str, str], tuple[Path, Any]] = {}

    def get(kind: str, scheme: str) -> tuple[Path, Any]:
        if (kind, scheme) not in made:
            folder = root / f"{kind}-{scheme}"
            model = quantize(float_models[kind], scheme, folder, dtype=DTYPES[kind], max_shard_size="100KB")
            assert len(list(folder.glob("*.safetensors"))) > 1, "sharded, as the Hub uploads are"
            (folder / "README.md").write_text(f"---\nbase_model: tiny-random/{kind}\nlicense: apache-2.0\n---\n"
                                              f"# {kind} in {scheme}\n")
            made[kind, scheme] = folder, model
        return made[kind, scheme]

    return get


def _logits(model: Any, tokenizer: Any) -> list[Any]:
    with torch.no_grad():
        return [model(**tokenizer(prompt, return_tensors="pt")).logits.float() for prompt in PROMPTS]


def _assert_matches(exported: Path, reference: Any, dtype: Any) -> None:
    """The exported checkpoint's logits equal the reference model's on every prompt (cosine, greedy tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    ours = AutoModelForCausalLM.from_pretrained(exported, dtype=dtype).eval()
    for prompt, got, expected in zip(PROMPTS, _logits(ours, tokenizer), _logits(reference, tokenizer), strict=True):
        assert cosine(got, expected) >= 0.9999, prompt
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), prompt


@pytest.mark.parametrize("scheme", ["nf4-double", "fp4", "int8"])
@pytest.mark.parametrize("kind", list(DTYPES))
def test_a_bitsandbytes_upload_converts_to_what_bitsandbytes_dequantizes(
        kind: str, scheme: str, quantized: Any, float_models: dict[str, Path], calibration_file: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    folder, model = quantized(kind, scheme)
    smoked: list[Path] = []  # the real smoke check (a child process) runs in test_the_cli_... below

    def smoke(path: Path, **_: Any) -> dict[str, Any]:
        smoked.append(Path(path))
        return {"ok": True}

    monkeypatch.setattr("rkedge.lora.merge.smoke_forward_in_child", smoke)
    out = tmp_path / "out"
    result = convert(ConversionRequest(model=folder, out=out, toolkit="mock", calibration=str(calibration_file)))
    assert [(s.name, s.status) for s in result.steps] == [
        ("dequantize", "done"), ("export", "done"), ("calibration", "done"), ("quantize", "done")]
    assert len(smoked) == 1, "the dequantized checkpoint gets the merged checkpoint's smoke check"
    f9 = [f for f in result.findings if f.id == "F-9"]
    assert [f.severity for f in f9] == ["warning"] and "bounded by" in f9[0].message
    assert f"tiny-random/{kind}" in (f9[0].fix or ""), "the fix names the base model from the card"

    # what reached the toolkit: bitsandbytes' own dequantized weights, and its dequantized model's logits
    exported = out / WORK / "export"
    assert result.calls is not None and result.calls["load_huggingface"]["model"] == str(exported.resolve())
    expected = bnb_dequantized_weights(model, int8_dtype=DTYPES[kind])
    ours: dict[str, Any] = {}
    for shard in exported.glob("*.safetensors"):
        ours.update(load_file(str(shard)))
    assert expected and all(torch.equal(ours[name], weight) for name, weight in expected.items())
    assert not any(name.endswith(("absmax", "quant_map", "SCB", "weight_format")) or "quant_state" in name
                   for name in ours), "no bitsandbytes tensor reaches the toolkit"
    config = json.loads((exported / "config.json").read_text())
    assert "quantization_config" not in config
    _assert_matches(exported, bnb_reference_model(float_models[kind], expected, DTYPES[kind]), DTYPES[kind])

    manifest = read_manifest(result.model_file)
    source = manifest["inputs"]["source_quantization"]
    assert source["description"] == DESCRIPTIONS[scheme] and source["method"] == "bitsandbytes"
    assert (source["bits"], source["double_quant"]) == ((8, False) if scheme == "int8" else (4, scheme == "nf4-double"))
    assert "bounded by" in source["warning"] and manifest["inputs"]["base_model"] == f"tiny-random/{kind}"
    assert source["dequantized_dtype"] == str(DTYPES[kind]).removeprefix("torch."), "bitsandbytes' own dtype"
    assert manifest["inputs"]["model"]["parameters"] == inspect_checkpoint(float_models[kind]).param_count
    card = (out / "README.md").read_text()
    assert source["warning"] in card and DESCRIPTIONS[scheme] in card
    assert f"base_model: tiny-random/{kind}" in card and "license: apache-2.0" in card


def test_the_cli_plans_converts_reuses_and_inspects_a_bitsandbytes_upload(
        quantized: Any, float_models: dict[str, Path], calibration_file: Path, tmp_path: Path) -> None:
    folder, _ = quantized("llama", "nf4-double")
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["convert", str(folder), "--out", str(out), "--toolkit", "mock", "--calibration", str(calibration_file)]

    dry = runner.invoke(main, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "steps: dequantize -> export -> calibration -> quantize" in dry.output
    assert "F-9" in dry.output and not out.exists(), "a dry run lists the step and writes nothing"
    planned = json.loads(runner.invoke(main, [*args, "--dry-run", "--json"]).stdout)
    assert planned["steps"][0]["name"] == "dequantize" and DESCRIPTIONS["nf4-double"] in planned["steps"][0]["detail"]

    done = runner.invoke(main, args)  # the real smoke check, in its child process
    assert done.exit_code == 0, done.output
    assert "[ok] dequantize: done" in done.stderr
    again = runner.invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "[ok] dequantize: cached" in again.stderr, "same inputs: the dequantized checkpoint is reused"

    shown = runner.invoke(main, ["inspect", str(folder)])
    assert shown.exit_code == 0, shown.output
    line = next(li for li in shown.stdout.splitlines() if "source_quantization" in li)
    assert DESCRIPTIONS["nf4-double"] in line and "rkedge convert dequantizes it" in line
    assert "warning: converted from a bitsandbytes" in shown.stdout
    as_json = json.loads(runner.invoke(main, ["inspect", str(folder), "--json"]).stdout)["source_quantization"]
    assert (as_json["quant_type"], as_json["double_quant"], as_json["compute_dtype"]) == ("nf4", True, "bfloat16")
    assert as_json["dequantized"]["parameters"] == inspect_checkpoint(float_models["llama"]).param_count
    assert as_json["dequantized"]["dtype"] == "float32", "the weights' recorded dtype (the compute dtype is bf16)"
    assert "bounded by" in as_json["warning"]


def test_a_lora_is_merged_into_the_dequantized_weights(quantized: Any, float_models: dict[str, Path],
                                                       calibration_file: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA trained on the float model (a QLoRA's usual base) merges into the dequantized upload: the result is
    peft's merge into bitsandbytes' dequantized model."""
    from peft import PeftModel

    folder, model = quantized("llama", "int8")
    lora = train_lora(float_models["llama"], tmp_path / "lora", steps=2)
    monkeypatch.setattr("rkedge.lora.merge.smoke_forward_in_child", lambda path, **_: {"ok": True})
    out = tmp_path / "out"
    result = convert(ConversionRequest(model=folder, out=out, toolkit="mock", calibration=str(calibration_file),
                                       lora=lora, allow_base_mismatch=True))  # trained on the float copy
    assert [s.name for s in result.steps] == ["dequantize", "merge", "export", "calibration", "quantize"]
    assert not [f for f in result.findings if f.id.startswith("lora.") and f.severity == "error"]
    reference = bnb_reference_model(float_models["llama"], bnb_dequantized_weights(model, int8_dtype=torch.float32),
                                    torch.float32)
    merged = PeftModel.from_pretrained(reference, lora).merge_and_unload().eval()
    _assert_matches(out / WORK / "export", merged, torch.float32)
    assert read_manifest(result.model_file)["inputs"]["source_quantization"]["quant_type"] == "int8"


def test_other_quantization_stays_refused_and_a_config_without_quantized_weights_too(
        float_models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    runner = CliRunner()
    for name, qc, expected in (
            ("gptq4", {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}, "F-2"),
            ("awq", {"quant_method": "awq", "bits": 4}, "F-9"),
            ("claims-bnb", {"quant_method": "bitsandbytes", "load_in_4bit": True}, "F-9")):
        folder = tmp_path / name
        shutil.copytree(float_models["llama"], folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
        result = runner.invoke(main, ["convert", str(folder), "--out", str(tmp_path / f"{name}-out"), "--toolkit",
                                      "mock", "--dry-run", "--json"])
        assert result.exit_code == 2, (name, result.output)
        summary = json.loads(result.stdout)
        errors = {f["id"]: f for f in summary["findings"] if f["severity"] == "error"}
        assert expected in errors, name
        assert "dequantize" not in [s["name"] for s in summary["steps"]]
    assert "hold none of bitsandbytes' quantized tensors" in errors["F-9"]["message"]


def test_the_disk_check_counts_the_dequantized_checkpoint(quantized: Any, calibration_file: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any work, the free-space check asks for the float checkpoint the dequantization writes (bigger than
    the 4-bit upload), and once that step is done and current, no longer."""
    from rkedge.convert import pipeline
    from rkedge.convert.bnb import dequantized_view

    folder, _ = quantized("gemma", "nf4-double")
    plain = dequantized_view(inspect_checkpoint(folder))
    asked: list[int] = []
    monkeypatch.setattr(pipeline, "check_free_space", lambda path, need, **_: asked.append(need))
    monkeypatch.setattr("rkedge.lora.merge.smoke_forward_in_child", lambda path, **_: {"ok": True})
    request = ConversionRequest(model=folder, out=tmp_path / "out", toolkit="mock", calibration=str(calibration_file))
    convert(request)
    convert(request)
    first, rerun = asked
    assert plain.weight_bytes > 2 * inspect_checkpoint(folder).weight_bytes, "4-bit: the float copy is far bigger"
    assert first - rerun == plain.weight_bytes, "the dequantized checkpoint, counted only while it is to be written"


@pytest.mark.parametrize("scheme", ["nf4-double", "int8"])
def test_rkedge_plan_sizes_a_bitsandbytes_upload_as_the_float_checkpoint_it_becomes(
        quantized: Any, float_models: dict[str, Path], scheme: str) -> None:
    from rkedge.convert.plan import shape_of

    upload, _ = quantized("llama", scheme)
    planned, _ = shape_of(upload)
    original, _ = shape_of(float_models["llama"])
    assert (planned.linear_params, planned.embedding_params, planned.lm_head_params) == \
        (original.linear_params, original.embedding_params, original.lm_head_params)
