"""`rkedge convert` end to end through the real worker and the simulated toolkit, then chat on the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli

pytest.importorskip("transformers")
from click.testing import CliRunner
from tiny_models import make_checkpoint, train_lora

from rkedge.cli import main
from rkedge.convert.pipeline import convert
from rkedge.convert.planner import ConversionRequest
from rkedge.errors import InputError
from rkedge.manifest import read_manifest
from rkedge.runtime import LLM
from rkedge.runtime.chat_template import JinjaChatTemplate
from rkedge.runtime.simmodel import read_simulated_model

KINDS = ("gemma", "gemma2", "gemma3", "llama", "qwen2")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline-models")
    models = {kind: make_checkpoint(root / kind, kind) for kind in (*KINDS, "recurrent_gemma")}
    (models["llama"] / "README.md").write_text("---\nlicense: llama3\n---\n# tiny llama\n")
    return models


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory) -> Path:
    """Prompts with targets given: the float-model generation step is skipped (tests stay fast)."""
    path = tmp_path_factory.mktemp("calib") / "calibration.json"
    path.write_text(json.dumps([{"prompt": p, "target": "ok"} for p in
                                ("Hello!", "What is an NPU?", "你好", "Bonjour", "Why is the sky blue?",
                                 "Name a color.", "2+2?", "Write a haiku.")]))
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_convert_with_a_lora_then_chat(tiny, calibration_file, tmp_path, kind, monkeypatch):
    record = tmp_path / "toolkit-calls.jsonl"
    monkeypatch.setenv("RKEDGE_SIM_TOOLKIT_RECORD", str(record))
    out = tmp_path / "out"
    version = "1.3.0"
    lora = train_lora(tiny[kind], tmp_path / f"{kind}-lora", steps=2)
    result = convert(ConversionRequest(model=tiny[kind], out=out, toolkit="mock", toolkit_version=version,
                                       calibration=str(calibration_file), lora=lora))
    assert [s.name for s in result.steps] == ["merge", "export", "calibration", "quantize"]
    model = out / f"{kind}-{lora.name}_w8a8_rk3588.rkllm"  # a merged LoRA is named apart from the base
    assert result.model_file == model and model.is_file()
    manifest = read_manifest(model)
    assert manifest["simulated"] is True and manifest["toolkit"]["version"] == version
    assert manifest["chat_family"] == ("llama3" if kind == "llama" else "qwen2" if kind == "qwen2" else "gemma")
    calls = {c["method"]: c["kwargs"] for c in map(json.loads, record.read_text().splitlines())}
    assert calls["build"] == manifest["toolkit_calls"]["build"], "the manifest records what reached build()"
    assert read_simulated_model(model)["build_kwargs"] == calls["build"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "Simulated model" in card and f"| LoRA | {lora.name} (merged into the weights" in card
    if kind == "llama":
        assert "license: llama3" in card
    with LLM(model, library="mock", abi=version) as llm:
        # the model's own template, as on hardware where the manifest carries it (the family is the fallback)
        assert isinstance(llm.template, JinjaChatTemplate) and llm.template.source == manifest["chat_template"]
        reply = llm.chat_session().send("Hello!", stream=False)
    assert reply.text and reply.finish_reason == "stop"


def test_every_parameter_in_the_name_and_manifest_reached_build(tiny, calibration_file, tmp_path, monkeypatch):
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RKEDGE_SIM_TOOLKIT_RECORD", str(record))
    result = convert(ConversionRequest(model=tiny["llama"], out=tmp_path / "o", toolkit="mock", toolkit_version="1.2.3",
                                       dtype="w8a8_g128", hybrid_rate=0.25, max_context=8192, npu_cores=2,
                                       optimization_level=1, calibration=str(calibration_file)))
    build = next(json.loads(l)["kwargs"] for l in record.read_text().splitlines() if '"build"' in l)
    assert build["quantized_dtype"] == "w8a8_g128" and build["target_platform"] == "rk3588"
    assert (build["hybrid_rate"], build["max_context"], build["num_npu_core"], build["optimization_level"]) == \
        (0.25, 8192, 2, 1)
    assert build["dataset"].endswith("calibration.json")
    assert result.model_file.name == f"llama_{build['quantized_dtype']}_{build['target_platform']}.rkllm"
    manifest = result.manifest
    assert manifest["toolkit_calls"]["build"] == build
    assert manifest["dtype"] == build["quantized_dtype"] and manifest["max_context_limit"] == 8192
    assert read_simulated_model(result.model_file)["max_context_limit"] == 8192


def test_no_lora_no_lora_line_in_the_card(tiny, calibration_file, tmp_path):
    convert(ConversionRequest(model=tiny["qwen2"], out=tmp_path / "o", toolkit="mock", calibration=str(calibration_file)))
    assert "LoRA" not in (tmp_path / "o" / "README.md").read_text()


def test_export_in_the_load_dtype(tiny, calibration_file, tmp_path, monkeypatch):
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RKEDGE_SIM_TOOLKIT_RECORD", str(record))
    convert(ConversionRequest(model=tiny["llama"], out=tmp_path / "o", toolkit="mock", toolkit_version="1.2.0",
                              load_dtype="float16", calibration=str(calibration_file)))
    from rkedge.convert.inspect import inspect_checkpoint

    exported = inspect_checkpoint(tmp_path / "o" / ".rkedge-work" / "export")
    assert set(exported.dtypes) == {"F16"} and exported.config["torch_dtype"] == "float16"
    load = next(json.loads(l)["kwargs"] for l in record.read_text().splitlines() if "load_huggingface" in l)
    assert load["dtype"] == "float16"


def test_rerun_skips_finished_steps(tiny, calibration_file, tmp_path):
    request = dict(model=tiny["qwen2"], out=tmp_path / "o", toolkit="mock", calibration=str(calibration_file))
    first = convert(ConversionRequest(**request))
    assert [s.status for s in first.steps] == ["done", "done", "done"]
    second = convert(ConversionRequest(**request))
    assert [s.status for s in second.steps if s.name != "quantize"] == ["cached", "cached"]
    assert second.manifest["sha256"] == first.manifest["sha256"]


def test_the_result_says_what_the_work_cache_keeps(tiny, calibration_file, tmp_path):
    """The finished steps stay for reruns; at 9B the merge alone is 18.5 GB, so the size is printed (hard links to
    the merged checkpoint counted once)."""
    result = convert(ConversionRequest(model=tiny["llama"], out=tmp_path / "o", toolkit="mock",
                                       calibration=str(calibration_file), load_dtype="float16"))
    work = tmp_path / "o" / ".rkedge-work"
    inodes = {(f.stat().st_dev, f.stat().st_ino): f.stat().st_size for f in work.rglob("*") if f.is_file()}
    assert result.work_bytes == sum(inodes.values()) > 0
    assert result.summary()["work_cache_bytes"] == result.work_bytes
    kept = [line for line in result.render() if line.startswith("kept ")]
    assert kept and str(work) in kept[0] and "delete it" in kept[0]


def test_known_failure_reproduced_on_the_simulated_board_when_forced(tiny, calibration_file, tmp_path):
    result = convert(ConversionRequest(model=tiny["gemma2"], out=tmp_path / "o", toolkit="mock", toolkit_version="1.1.1",
                                       dtype="w8a8_g128", allow_known_failure=True, calibration=str(calibration_file)))
    assert any(f["id"] == "F-1.gemma2-rk3588-1.1" and f["severity"] == "warning" for f in result.manifest["findings"])
    from rkedge.errors import RuntimeInitError

    with pytest.raises(RuntimeInitError) as caught:
        LLM(result.model_file, library="mock", abi="1.1")
    assert caught.value.failure == "F-1" and "232128512" in str(caught.value)


@pytest.mark.parametrize(("kind", "args", "finding"), [
    ("gemma2", ["--dtype", "w8a8_g128", "--toolkit-version", "1.1.1"], "F-1.gemma2-rk3588-1.1"),
    ("llama", ["--dtype", "w4a16"], "F-2"),
    ("llama", ["--max-context", "5000"], "F-7"),
    ("recurrent_gemma", [], "F-8"),
    ("bnb", [], "F-9"),
    ("gemma3", ["--toolkit-version", "1.1.4"], "F-8"),
])
def test_dry_run_exits_2_with_a_clear_finding(tiny, tmp_path, kind, args, finding):
    model = tiny.get(kind)
    if kind == "bnb":
        import shutil

        model = tmp_path / "bnb"
        shutil.copytree(tiny["llama"], model)
        config = json.loads((model / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        (model / "config.json").write_text(json.dumps(config))
    result = run_cli("convert", str(model), "--out", str(tmp_path / "o"), "--toolkit", "mock", "--dry-run", "--json",
                     *args)
    assert result.returncode == 2, result.stderr
    summary = json.loads(result.stdout)
    errors = [f for f in summary["findings"] if f["severity"] == "error"]
    assert finding in {f["id"] for f in errors}
    assert all(f["message"] and f["fix"] and f["source"] for f in errors)
    assert not (tmp_path / "o").exists(), "a dry run writes nothing"


def test_a_valid_dry_run_passes(tiny, tmp_path):
    result = run_cli("convert", str(tiny["gemma2"]), "--out", str(tmp_path / "o"), "--toolkit", "mock", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "plan: gemma2_w8a8_rk3588.rkllm" in result.stdout and "[x]" not in result.stdout


def test_a_toolkit_failure_becomes_a_finding(tiny, calibration_file, tmp_path):
    result = run_cli("convert", str(tiny["llama"]), "--out", str(tmp_path / "o"), "--toolkit", "mock",
                     "--calibration", str(calibration_file), env={"RKEDGE_SIM_TOOLKIT_FAIL": "build:F-2"})
    assert result.returncode == 1
    assert "not support quantized_dtype" in result.stderr and "F-2" in result.stderr
    assert not list((tmp_path / "o").glob("*.rkllm")) and not list((tmp_path / "o").glob("*.json"))


def test_sigkill_mid_conversion_leaves_nothing_that_looks_finished(tiny, calibration_file, tmp_path):
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "rkedge", "convert", str(tiny["gemma"]), "--out", str(out), "--toolkit", "mock",
            "--calibration", str(calibration_file)]
    proc = subprocess.Popen(argv, env={**os.environ, "RKEDGE_SIM_TOOLKIT_FAIL": "build:hang"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".rkedge-tmp-*")) and time.monotonic() < deadline:  # the toolkit step has begun
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(out.glob("*.rkllm")) and not list(out.glob("*.rkllm.json")) and not (out / "README.md").exists()
    time.sleep(2)  # the orphaned worker notices its parent is gone
    leftover = subprocess.run(["pgrep", "-f", "worker.py --job"], capture_output=True, text=True).stdout.split()
    assert not leftover, "no orphaned toolkit worker keeps running"
    rerun = run_cli(*argv[3:])
    assert rerun.returncode == 0, rerun.stderr
    assert "export: cached" in rerun.stderr and "calibration: cached" in rerun.stderr
    assert (out / "gemma_w8a8_rk3588.rkllm").is_file() and (out / "gemma_w8a8_rk3588.rkllm.json").is_file()
    assert not list(out.glob(".rkedge-tmp-*"))


def test_inspect_command(tiny, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(tiny["gemma2"]), "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["architecture"] == "Gemma2ForCausalLM" and info["parameters"] > 0 and info["chat_template"] is True
    converted = convert(ConversionRequest(model=tiny["llama"], out=tmp_path / "o", toolkit="mock",
                                          calibration="auto")).model_file
    shown = json.loads(runner.invoke(main, ["inspect", str(converted), "--json"]).output)
    assert shown["kind"] == "simulated-rkllm" and shown["manifest"]["model_file"] == converted.name
    fake = tmp_path / "fake.rkllm"
    fake.write_bytes(b"RKLL" + (1).to_bytes(4, "little") + bytes(64))
    assert "F-13" in json.loads(runner.invoke(main, ["inspect", str(fake), "--json"]).output)["problem"]


@pytest.fixture(scope="session")
def adapter(tiny, tmp_path_factory) -> Path:
    return train_lora(tiny["llama"], tmp_path_factory.mktemp("adapter") / "style-lora", steps=3)


def test_convert_with_a_merged_lora(tiny, adapter, calibration_file, tmp_path):
    result = convert(ConversionRequest(model=tiny["llama"], out=tmp_path / "o", toolkit="mock", lora=adapter,
                                       lora_mode="merge", calibration=str(calibration_file)))
    assert [s.name for s in result.steps] == ["merge", "export", "calibration", "quantize"]
    manifest = result.manifest
    assert manifest["inputs"]["adapter"]["mode"] == "merge" and manifest["inputs"]["adapter"]["sha256"]
    assert manifest["lora_file"] is None
    merged_config = json.loads((tmp_path / "o" / ".rkedge-work" / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config
    assert "LoRA" in (tmp_path / "o" / "README.md").read_text()
    with LLM(result.model_file, library="mock", abi="1.3.0") as llm:
        assert llm.chat_session().send("hi", stream=False).text


def test_convert_with_a_runtime_lora(tiny, adapter, calibration_file, tmp_path, monkeypatch):
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RKEDGE_SIM_TOOLKIT_RECORD", str(record))
    result = convert(ConversionRequest(model=tiny["llama"], out=tmp_path / "o", toolkit="mock", lora=adapter,
                                       lora_mode="runtime", calibration=str(calibration_file)))
    load = next(json.loads(l)["kwargs"] for l in record.read_text().splitlines() if "load_huggingface" in l)
    assert load["model_lora"] == str(adapter.resolve())
    lora_file = tmp_path / "o" / "llama_w8a8_rk3588_lora.rkllm"
    assert result.lora_file == lora_file and lora_file.is_file()
    assert result.manifest["lora_file"]["file"] == lora_file.name
    with LLM(result.model_file, library="mock", abi="1.3.0") as llm:
        name = llm.load_lora(lora_file)
        assert llm.generate("hi", lora=name, stream=False).text
    chat = run_cli("chat", str(result.model_file), "--mock", "--lora", str(lora_file), "--prompt", "hi")
    assert chat.returncode == 0 and chat.stdout.strip()


def test_lora_for_another_base_is_refused_before_converting(adapter, tmp_path):
    other = make_checkpoint(tmp_path / "other", "llama", config_overrides={"num_key_value_heads": 4})
    result = run_cli("convert", str(other), "--out", str(tmp_path / "o"), "--toolkit", "mock", "--lora",
                     str(adapter), "--dry-run", "--json")
    assert result.returncode == 2
    ids = {f["id"] for f in json.loads(result.stdout)["findings"] if f["severity"] == "error"}
    assert ids & {"lora.target-missing", "lora.shape", "lora.base-mismatch"}


def test_the_dry_run_shows_the_steps_and_the_toolkit_job_that_run(tiny, adapter, calibration_file, tmp_path):
    args = ["convert", str(tiny["llama"]), "--out", str(tmp_path / "o"), "--toolkit", "mock", "--lora", str(adapter),
            "--lora-mode", "runtime", "--calibration", str(calibration_file)]
    shown = run_cli(*args, "--dry-run")
    assert shown.returncode == 0, shown.stderr
    assert "steps: export -> calibration -> quantize" in shown.stdout
    assert "load_huggingface(model=<exported>, device='cpu', model_lora=<adapter>)" in shown.stdout
    assert "dataset=<calibration>" in shown.stdout and "export_rkllm(export_path=<output>)" in shown.stdout
    assert not (tmp_path / "o").exists()
    request = ConversionRequest(model=tiny["llama"], out=tmp_path / "o", toolkit="mock", lora=adapter,
                                lora_mode="runtime", calibration=str(calibration_file))
    planned = convert(request, dry_run=True)
    done = convert(request)
    assert [s.name for s in done.steps] == [s.name for s in planned.steps] == planned.plan.steps
    calls = done.manifest["toolkit_calls"]
    assert calls["load_huggingface"]["model"] == str((tmp_path / "o" / ".rkedge-work" / "export").resolve())
    assert calls["build"]["dataset"] == str((tmp_path / "o" / ".rkedge-work" / "calibration.json").resolve())
    assert calls["export_rkllm"] == {"export_path": str(tmp_path / "o" / "llama_w8a8_rk3588.rkllm")}


def test_a_toolkit_job_is_bound_to_every_input_or_refused(tiny):
    from rkedge.convert.planner import Input, ToolkitJob
    from rkedge.convert.toolkit.worker import PROTOCOL

    job = ToolkitJob("load_huggingface", {"model": Input.EXPORTED}, {"dataset": Input.CALIBRATION, "max_context": 4096},
                     {"export_path": Input.OUTPUT})
    assert job.inputs == {Input.EXPORTED, Input.CALIBRATION, Input.OUTPUT}
    with pytest.raises(KeyError, match="<calibration>"):
        job.bind({Input.EXPORTED: "/e", Input.OUTPUT: "/o.rkllm"})
    with pytest.raises(ValueError, match="bind"):
        job.worker_job()
    bound = job.bind({Input.EXPORTED: Path("/e"), Input.CALIBRATION: "/c.json", Input.OUTPUT: "/o.rkllm"})
    assert bound.worker_job()["build"]["kwargs"] == {"dataset": "/c.json", "max_context": 4096}
    assert bound.worker_job()["protocol"] == PROTOCOL and bound.inputs == set()


def test_gguf_input_is_planned_from_the_rules(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    def write(name: str, file_type: int) -> Path:
        path = tmp_path / name
        writer = gguf.GGUFWriter(str(path), "qwen2")
        writer.add_file_type(file_type)
        writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    def errors(path: Path, **options) -> set[str]:
        result = convert(ConversionRequest(model=path, out=tmp_path / "o", **options), dry_run=True)
        return {f.id for f in result.findings if f.severity == "error"}

    q4 = write("m-q4_0.gguf", 2)
    assert errors(q4) == {"F-2"}, "q4_0 is w4a16_g32, which rk3588 does not run"
    assert errors(q4, platform="rk3576", dtype="w4a16_g32") == set()
    assert errors(write("m-q4_k_m.gguf", 15)) == {"gguf.type"}
    with pytest.raises(InputError, match="not implemented yet"):
        convert(ConversionRequest(model=write("m-f16.gguf", 1), out=tmp_path / "o"))
