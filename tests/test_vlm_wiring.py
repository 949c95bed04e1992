"""The VLM path where users reach it: the architecture table's rows, `rkedge convert` on a VLM checkpoint,
`rkedge doctor --model` on its output and `rkedge plan` on the checkpoint (the encoder in the memory estimate)."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_helpers import run_cli
from tiny_vlms import make_qwen2_vl

from rkedge.convert.architectures import REGISTRY, find_spec
from rkedge.convert.vlm import FAMILIES


def test_the_architecture_table_mirrors_the_vlm_families():
    for family in FAMILIES:
        if family.key == "gemma3":  # the toolkit fails on the multimodal class (rknn-llm#240): no row, refused
            assert find_spec("Gemma3ForConditionalGeneration", None) is None
            assert find_spec(family.llm_architecture, None) is not None
            continue
        spec = find_spec(family.architectures[0], None)
        assert spec is not None and spec.vlm == family.key, family.key
        assert spec.since == family.min_toolkit, family.key
        assert set(family.architectures) <= set(spec.architectures)
        assert spec.source and "rknn-toolkit2" in spec.notes
    assert {s.vlm for s in REGISTRY if s.vlm} == {f.key for f in FAMILIES} - {"gemma3"}


def test_convert_refuses_options_the_vlm_path_does_not_take(tmp_path):
    folder = tmp_path / "vlm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    run = run_cli("convert", str(folder), "--out", str(tmp_path / "out"), "--toolkit", "mock",
                  "--platform", "rk3576", "--max-context", "2048")
    assert run.returncode == 2, run.stderr
    assert "--platform, --max-context: not taken by the vision-language path" in run.stderr
    assert not (tmp_path / "out").exists()


def test_a_dry_run_on_a_vlm_says_the_toolkit_step_takes_only_the_language_model(tmp_path):
    model = make_qwen2_vl(tmp_path / "qwen2-vl")
    run = run_cli("convert", str(model), "--out", str(tmp_path / "out"), "--toolkit", "mock", "--dry-run", "--json")
    findings = {f["id"]: f for f in json.loads(run.stdout)["findings"]}
    assert "vlm.llm-only" in findings, run.stdout[-2000:]
    assert findings["vlm.llm-only"]["severity"] == "warning" and "without --dry-run" in findings["vlm.llm-only"]["fix"]


def test_plan_on_a_vlm_checkpoint_counts_the_encoder(tmp_path):
    pytest.importorskip("transformers")
    from rkedge.convert.inspect import inspect_checkpoint
    from rkedge.convert.plan import plan_model

    source = make_qwen2_vl(tmp_path / "qwen2-vl")
    tensors = inspect_checkpoint(source).tensors
    vision = sum(t.numel for name, t in tensors.items() if name.startswith(("visual.", "model.visual.")))
    assert vision > 0
    report = plan_model(source, ram_gb=8, images=2)
    assert report.vision is not None
    assert report.vision["params"] == vision and report.vision["weights_bytes"] == 2 * vision  # fp16
    assert report.vision["image_tokens"] == 16 and report.vision["embedding_bytes_per_image"] == 16 * 128 * 4
    assert report.vision["total_bytes"] == 2 * vision + 2 * 16 * 128 * 4
    # The language model's shape leaves the tower out; the verdict counts both.
    assert report.shape["total_params"] == sum(t.numel for t in tensors.values()) - vision
    text_only = plan_model(source, ram_gb=8, images=0)
    assert text_only.vision is not None and text_only.vision["total_bytes"] == 2 * vision
    need = report.prediction["total_bytes"] + report.vision["total_bytes"]
    assert f"~{need / 2**30:.1f} GiB" in report.fits[0].reasons[0]
    run = run_cli("plan", str(source))
    assert run.returncode == 0, run.stderr
    assert "vision " in run.stdout and "fp16 encoder" in run.stdout and "16 tokens at 112 px" in run.stdout


def test_convert_through_the_cli_then_doctor_checks_the_vision_side(tmp_path):
    pytest.importorskip("rknn.api")
    source = make_qwen2_vl(tmp_path / "qwen2-vl")
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps([{"prompt": p, "target": "ok"} for p in ("Hello!", "What is an NPU?")]))
    out = tmp_path / "out"
    run = run_cli("convert", str(source), "--out", str(out), "--toolkit", "mock", "--calibration", str(calibration))
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "vlm.json").read_text())
    assert (out / manifest["llm_file"]).is_file() and manifest["llm_file"].endswith(".rkllm")
    for dtype in ("fp16", "w8a8"):
        assert (out / manifest["encoders"][dtype]["rknn"]).is_file()
    assert f"wrote {out / 'vlm.json'}" in run.stdout and "vision fp16: cosine min" in run.stdout

    doctor = run_cli("doctor", "--mock", "--model", str(out), "--json")
    report = json.loads(doctor.stdout)
    checks = {c["id"]: c for c in report["checks"]}
    assert checks["vision"]["status"] == "ok" and "qwen2_vl" in checks["vision"]["detail"]
    assert [c["status"] for c in report["checks"] if c["id"] == "vision.encoder"] == ["ok", "ok"]
    assert checks["vision.library"]["status"] == "ok" and "simulator" in checks["vision.library"]["detail"]
    assert checks["model.platform"]["status"] == "ok"  # the .rkllm the folder names was checked as a model
    assert report["facts"]["vision"]["image_tokens"] == 16
    assert report["facts"]["model"]["path"] == str(out / manifest["llm_file"])

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    rknn = copy / manifest["encoders"]["w8a8"]["rknn"]
    rknn.write_bytes(rknn.read_bytes()[:-1] + b"\0")
    doctor = run_cli("doctor", "--mock", "--model", str(copy), "--json")
    assert doctor.returncode == 1
    bad = [c for c in json.loads(doctor.stdout)["checks"] if c["id"] == "vision.encoder" and c["status"] == "fail"]
    assert len(bad) == 1 and "changed since conversion" in bad[0]["detail"] and bad[0]["fix"]
