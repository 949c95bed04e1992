"""The toolkit seam: the REAL worker.py run (as a subprocess) against the simulated toolkit, and the error table.

Checkpoints are hand-written Hugging Face folders (config.json, rkedge_export.json, tokenizer_config.json): the
simulated toolkit reads no weights, so no torch is needed.
"""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rkedge import failures
from rkedge.convert.toolkit import (
    SIMULATED_DIR,
    WORKER,
    ToolkitEnv,
    build_job,
    mock_env,
    probe_python,
    probe_toolkit,
    resolve_toolkit,
    run_job,
)
from rkedge.convert.toolkit.known_errors import findings_from_log
from rkedge.errors import InputError, ToolkitError
from rkedge.failures import simulated_toolkit_text as simulated_text
from rkedge.runtime.simmodel import read_simulated_model

BUILD_13 = {"do_quantization": True, "optimization_level": 0, "quantized_dtype": "w8a8",
            "quantized_algorithm": "normal", "target_platform": "rk3588", "num_npu_core": 3, "extra_qparams": None,
            "dataset": None, "hybrid_rate": 0.0, "max_context": 8192}


@pytest.fixture(autouse=True)
def _clean_toolkit_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("RKEDGE_SIM_TOOLKIT_FAIL", "RKEDGE_SIM_TOOLKIT_RECORD", "RKEDGE_SIM_TOOLKIT_VERSION",
                 "RKEDGE_SIM_TOOLKIT_PACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RKEDGE_TOOLKITS_DIR", str(tmp_path / "toolkits"))


def write_checkpoint(folder: Path, *, arch: str = "Qwen2ForCausalLM", model_type: str = "qwen2",
                     config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body = {"architectures": [arch], "model_type": model_type, "vocab_size": 151936, "hidden_size": 896,
            "num_hidden_layers": 6, "bos_token_id": 151643, "eos_token_id": 151645, **(config or {})}
    (folder / "config.json").write_text(json.dumps(body))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    if meta is not None:
        (folder / "rkedge_export.json").write_text(json.dumps(meta))
    return folder


QWEN_META = {"chat_family": "qwen2", "name": "Qwen/Qwen2-0.5B-Instruct", "source_sha256": "ab" * 32,
             "bos_token_id": 151643, "eos_token_id": 151645,
             "chat_template": {"system_prompt": "<|im_start|>system\nYou are terse.<|im_end|>\n",
                               "prompt_prefix": "<|im_start|>user\n",
                               "prompt_postfix": "<|im_end|>\n<|im_start|>assistant\n"}}


def make_job(model: Path, out: Path, *, build: dict[str, Any] | None = None, load: dict[str, Any] | None = None,
             export: dict[str, Any] | None = None, name: str = "qwen_w8a8_rk3588.rkllm",
             method: str = "load_huggingface") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    load_kwargs = {"model": str(model), "model_lora": None, "device": "cpu", "dtype": "float32"} \
        if method == "load_huggingface" else {"model": str(model)}
    return build_job(load_method=method, load_kwargs=load if load is not None else load_kwargs,
                     build_kwargs=build if build is not None else dict(BUILD_13),
                     export_kwargs=export if export is not None else {"export_path": str(out / name)})


def ids(result: Any) -> list[str]:
    return [f.id for f in result.findings if f.severity == "error"]


# -- success ----------------------------------------------------------------------------------------------------


def test_successful_job_passes_every_parameter_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RKEDGE_SIM_TOOLKIT_RECORD", str(record))
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([{"input": "<|im_start|>user\nHi<|im_end|>\n", "target": "Hello!"}]))
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    build = {**BUILD_13, "dataset": str(calib), "hybrid_rate": 0.25, "quantized_dtype": "w8a8_g128"}
    job = make_job(model, tmp_path / "out", build=build,
                   export={"export_path": str(tmp_path / "out" / "qwen.rkllm"), "export_tokenizer": True,
                           "export_embedding": True})
    events: list[dict[str, Any]] = []
    result = run_job(mock_env("1.3.0"), job, on_event=events.append, timeout=120)

    assert result.ok, (result.error, result.log_lines)
    assert result.returncode == 0 and result.error is None and result.toolkit_version == "1.3.0"
    expected = [{"method": "load_huggingface", "kwargs": job["load"]["kwargs"]},
                {"method": "build", "kwargs": build},
                {"method": "export_rkllm", "kwargs": job["export"]["kwargs"]}]
    assert result.calls == expected
    # What the toolkit itself received (recorded inside RKLLM's methods): exactly the job's kwargs.
    assert [json.loads(line) for line in record.read_text().splitlines()] == expected

    target = tmp_path / "out" / "qwen.rkllm"
    assert [o["name"] for o in result.outputs] == ["qwen.rkllm"]
    assert result.outputs[0]["size"] == target.stat().st_size
    manifest = read_simulated_model(target)
    assert manifest["build_kwargs"] == build
    assert manifest["load_kwargs"] == job["load"]["kwargs"]
    assert (manifest["name"], manifest["architecture"], manifest["toolkit_version"]) == \
        ("qwen", "Qwen2ForCausalLM", "1.3.0")
    assert (manifest["platform"], manifest["dtype"], manifest["npu_cores"], manifest["max_context_limit"]) == \
        ("rk3588", "w8a8_g128", 3, 8192)
    assert (manifest["vocab_size"], manifest["hidden_size"]) == (151936, 896)
    assert manifest["chat_family"] == "qwen2" and manifest["chat_template"] == QWEN_META["chat_template"]
    assert (manifest["bos_token_id"], manifest["eos_token_id"]) == (151643, 151645)
    assert manifest["source_sha256"] == "ab" * 32 and manifest["source_name"] == "Qwen/Qwen2-0.5B-Instruct"
    assert manifest["hybrid_rate"] == 0.25 and manifest["algorithm"] == "normal" and manifest["faults"] == {}

    # Events: start/done around every step, in order, with bar fractions in between; the result last.
    steps = [(e["step"], e["state"]) for e in events if e["type"] == "progress" and e["state"] != "update"]
    assert steps == [("load", "start"), ("load", "done"), ("build", "start"), ("build", "done"),
                     ("export", "start"), ("export", "done")]
    build_updates = [e["fraction"] for e in events if e["type"] == "progress" and e["step"] == "build"
                     and e["state"] == "update"]
    assert build_updates and build_updates[-1] == 1.0 and build_updates == sorted(build_updates)
    assert any(line.startswith("Building model: 100%|") for line in result.log_lines)  # \r-split tqdm lines
    assert events[-1]["type"] == "result"
    assert "INFO: Setting max_context_limit to 4096" not in result.log_lines  # max_context was passed


def test_default_context_prints_the_vendor_info_line(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    build = {k: v for k, v in BUILD_13.items() if k != "max_context"}
    result = run_job(mock_env("1.2.0"), make_job(model, tmp_path / "out", build=build), timeout=120)
    assert result.ok, result.log_lines
    assert "INFO: Setting max_context_limit to 4096" in result.log_lines  # rknn-llm#220
    assert [f.id for f in result.findings] == ["F-7"] and result.findings[0].severity == "info"
    assert read_simulated_model(result.outputs[0]["path"])["max_context_limit"] == 4096


def test_old_toolkit_bakes_4096(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    build = {k: v for k, v in BUILD_13.items() if k != "max_context"}
    load = {"model": str(model), "model_lora": None, "device": "cpu"}  # 1.1.x has no dtype
    result = run_job(mock_env("1.1.1"), make_job(model, tmp_path / "out", build=build, load=load), timeout=120)
    assert result.ok, result.log_lines
    assert not any("max_context_limit" in line for line in result.log_lines)
    assert read_simulated_model(result.outputs[0]["path"])["max_context_limit"] == 4096


# -- failures ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("injection, step, finding", [
    ("build:F-2", "build", "F-2"),
    ("load:F-9", "load", "F-9"),
    ("load:F-8", "load", "F-8"),
    ("build:F-7", "build", "F-7"),
])
def test_injected_toolkit_failures_become_findings(tmp_path: Path, injection: str, step: str, finding: str) -> None:
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    result = run_job(mock_env("1.3.0"), make_job(model, tmp_path / "out"), timeout=120,
                     extra_env={"RKEDGE_SIM_TOOLKIT_FAIL": injection})
    assert not result.ok and result.returncode == 1
    assert result.error_event is not None and result.error_event["step"] == step and result.error_event["ret"] == -1
    assert finding in ids(result)
    assert not (tmp_path / "out" / "qwen_w8a8_rk3588.rkllm").exists()
    with pytest.raises(ToolkitError) as caught:
        result.raise_for_error()
    assert finding in str(caught.value)


def test_f2_text_per_version(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    build = {**BUILD_13, "quantized_dtype": "w4a16"}
    new = run_job(mock_env("1.3.0"), make_job(model, tmp_path / "a", build=build), timeout=120)
    assert "ERROR: target_platform: rk3588 not support quantized_dtype: w4a16!" in new.log_lines  # rknn-llm#535
    old = run_job(mock_env("1.2.3"), make_job(model, tmp_path / "b", build=build), timeout=120)
    assert "The quantized_dtype = 'w4a16' is not supported in 'rk3588'!" in old.log_lines  # rknn-llm#186
    for result in (new, old):
        assert not result.ok and ids(result) == ["F-2"]
        assert result.findings[0].fix and "w8a8" in result.findings[0].fix


def test_export_crash_reports_the_exception(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    result = run_job(mock_env(), make_job(model, tmp_path / "out"), timeout=120,
                     extra_env={"RKEDGE_SIM_TOOLKIT_FAIL": "export:crash"})
    assert not result.ok and result.returncode == 1
    assert result.error_event["step"] == "export" and result.error_event["ret"] is None
    assert "RuntimeError" in result.error and "injected crash" in result.error
    assert "Traceback" in result.error_event["traceback"]


def test_hang_is_killed_by_timeout(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    events: list[dict[str, Any]] = []
    result = run_job(mock_env(), make_job(model, tmp_path / "out"), timeout=4, on_event=events.append,
                     extra_env={"RKEDGE_SIM_TOOLKIT_FAIL": "build:hang"})
    assert not result.ok and result.timed_out
    assert "did not finish within 4 s" in result.error and "build" in result.error
    assert result.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(result.pid, 0)  # gone, not a zombie either (reaped)
    assert ("build", "start") in [(e["step"], e["state"]) for e in events if e["type"] == "progress"]


def test_worker_killed_by_a_signal(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    result = run_job(mock_env(), make_job(model, tmp_path / "out"), timeout=120,
                     extra_env={"RKEDGE_SIM_TOOLKIT_FAIL": "build:segfault"})
    assert not result.ok and result.returncode == -11
    assert "killed by SIGSEGV during step build" in result.error
    killed = run_job(mock_env(), make_job(model, tmp_path / "out2"), timeout=120,
                     extra_env={"RKEDGE_SIM_TOOLKIT_FAIL": "load:killed"})
    assert not killed.ok and "F-11" in ids(killed)  # SIGKILL: most likely the OOM killer


def test_keyword_the_version_lacks_is_a_type_error(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    load = {"model": str(model), "model_lora": None, "device": "cpu"}  # 1.1.x has no dtype
    result = run_job(mock_env("1.1.1"), make_job(model, tmp_path / "out", load=load), timeout=120)
    assert not result.ok and result.error_event["step"] == "build"
    assert "TypeError" in result.error and "unexpected keyword argument 'max_context'" in result.error
    # 1.1.1's load_huggingface has no dtype either:
    result = run_job(mock_env("1.1.1"), make_job(model, tmp_path / "out"), timeout=120)
    assert result.error_event["step"] == "load" and "'dtype'" in result.error


def test_architecture_newer_than_the_toolkit(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "gemma3", arch="Gemma3ForCausalLM", model_type="gemma3_text", meta={})
    build = {k: v for k, v in BUILD_13.items() if k != "max_context"}
    load = {"model": str(model), "model_lora": None, "device": "cpu"}
    result = run_job(mock_env("1.1.4"), make_job(model, tmp_path / "out", build=build, load=load), timeout=120)
    assert "ERROR: Not support Gemma3ForCausalLM!" in result.log_lines  # rknn-llm#220
    assert ids(result) == ["F-8"] and result.error_event["step"] == "load"


def test_bitsandbytes_checkpoint(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "bnb", meta=QWEN_META, config={
        "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    result = run_job(mock_env(), make_job(model, tmp_path / "out"), timeout=120)
    assert "ERROR: Catch exception when loading model: bitsandbytes" in result.log_lines
    assert "Load model failed!" in result.log_lines
    assert ids(result) == ["F-9"]  # the generic load-failed entry is dropped


def test_bad_arguments_use_simulated_texts(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    bad = tmp_path / "calib.json"
    bad.write_text(json.dumps([{"input": "only input"}]))
    cases = [({**BUILD_13, "dataset": str(bad)}, "calibration"),
             ({**BUILD_13, "max_context": 5000}, "F-7"),
             ({**BUILD_13, "hybrid_rate": 1.0}, "toolkit.argument"),
             ({**BUILD_13, "num_npu_core": 4}, "toolkit.argument"),
             ({**BUILD_13, "quantized_dtype": "w4a16", "target_platform": "rk3576", "quantized_algorithm": "grq",
               "num_npu_core": 2}, "toolkit.algorithm")]  # grq needs device='cuda'
    for index, (build, finding) in enumerate(cases):
        result = run_job(mock_env(), make_job(model, tmp_path / f"out{index}", build=build), timeout=120)
        assert not result.ok and ids(result) == [finding], (build, result.log_lines)
        simulated = [line for line in result.log_lines if line.startswith("ERROR: [rkedge simulated toolkit]")]
        assert simulated, "an unknown vendor text must be marked as the simulator's"


def test_bad_job_file_exits_2(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"protocol": 99}))
    done = subprocess.run([sys.executable, str(WORKER), "--job", str(job)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert json.loads(done.stdout)["type"] == "error" and "protocol" in json.loads(done.stdout)["message"]
    result = run_job(mock_env(), {"load": {}, "build": {}, "export": {}}, timeout=60)
    assert not result.ok and result.returncode == 2


# -- probe and resolution ---------------------------------------------------------------------------------------


def test_probe_of_the_mock_env() -> None:
    probe = probe_toolkit(mock_env("1.2.3"))
    assert probe["type"] == "probe" and probe["import_ok"] is True and probe["returncode"] == 0
    assert probe["toolkit_version"] == "1.2.3" and probe["simulated"] is True
    assert probe["python"] == ".".join(map(str, sys.version_info[:3])) and probe["machine"]
    assert probe["cuda"] is None  # the simulated toolkit imports no torch, and the probe never does


def test_probe_of_an_interpreter_without_rkllm() -> None:
    probe = probe_python(sys.executable)
    assert probe["import_ok"] is False and probe["returncode"] == 3
    assert "No module named 'rkllm'" in probe["import_error"]
    with pytest.raises(InputError) as caught:
        resolve_toolkit(sys.executable, None)
    assert "cannot import rkllm.api" in str(caught.value) and "rkedge toolkit install" in str(caught.value)
    assert caught.value.exit_code == 2


@pytest.fixture
def toolkit_python(tmp_path: Path) -> Path:
    """An 'interpreter' whose environment has the simulated toolkit 1.2.3 installed (a wrapper script)."""
    script = tmp_path / "toolkit-python"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={SIMULATED_DIR} RKEDGE_SIM_TOOLKIT_VERSION=1.2.3 exec "
                      f"{sys.executable} \"$@\"\n")
    script.chmod(0o755)
    return script


def test_resolve_an_interpreter_uses_the_probed_version(toolkit_python: Path, tmp_path: Path) -> None:
    env = resolve_toolkit(str(toolkit_python), None)
    assert (env.kind, env.version, env.python) == ("python", "1.2.3", str(toolkit_python))
    assert env == resolve_toolkit(str(toolkit_python), "1.2.3")
    with pytest.raises(InputError) as caught:
        resolve_toolkit(str(toolkit_python), "1.3.0")
    assert "--toolkit-version 1.3.0 does not match" in str(caught.value)
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    result = run_job(env, make_job(model, tmp_path / "out"), timeout=120)
    assert result.ok and read_simulated_model(result.outputs[0]["path"])["toolkit_version"] == "1.2.3"


def test_resolve_mock_and_missing_installs() -> None:
    assert resolve_toolkit("mock", None) == ToolkitEnv("mock", sys.executable, "1.3.0",
                                                       "simulated rkllm-toolkit 1.3.0 (mock)")
    assert resolve_toolkit("mock", "1.1.4").version == "1.1.4"
    with pytest.raises(InputError):
        resolve_toolkit("mock", "9.9.9")
    with pytest.raises(InputError) as caught:
        resolve_toolkit(None, None)
    assert "rkedge toolkit install" in str(caught.value) and "--toolkit mock" in str(caught.value)
    with pytest.raises(InputError):
        resolve_toolkit("/no/such/python", None)


# -- LoRA and the known board failure ---------------------------------------------------------------------------


def write_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
                                                            "r": 8, "target_modules": ["q_proj", "v_proj"]}))
    return folder


def test_lora_output_loads_in_the_simulated_runtime(tmp_path: Path) -> None:
    from rkedge.runtime import LLM

    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    adapter = write_adapter(tmp_path / "my-adapter")
    load = {"model": str(model), "model_lora": str(adapter), "device": "cpu", "dtype": "float32"}
    result = run_job(mock_env("1.3.0"), make_job(model, tmp_path / "out", load=load), timeout=120)
    assert result.ok, result.log_lines
    assert [o["name"] for o in result.outputs] == ["qwen_w8a8_rk3588.rkllm", "qwen_w8a8_rk3588_lora.rkllm"]
    base, lora = (Path(o["path"]) for o in result.outputs)
    manifest = read_simulated_model(base)
    assert manifest["lora"]["file"] == lora.name and manifest["lora"]["name"] == "my-adapter"
    with LLM(base, library="mock", abi="1.3.0") as llm:
        assert llm.load_lora(lora) == "qwen_w8a8_rk3588_lora"


def test_accuracy_lora_algorithm_writes_a_lora_file(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)
    result = run_job(mock_env("1.2.1"), make_job(model, tmp_path / "out",
                                                 build={**BUILD_13, "quantized_algorithm": "normal_r16"}), timeout=120)
    assert result.ok, result.log_lines
    assert [o["name"] for o in result.outputs] == ["qwen_w8a8_rk3588.rkllm", "qwen_w8a8_rk3588_lora.rkllm"]
    lora = read_simulated_model(result.outputs[0]["path"])["lora"]
    assert lora == {"file": "qwen_w8a8_rk3588_lora.rkllm", "kind": "accuracy-lora", "algorithm": "normal_r16",
                    "rank": 16}
    refused = run_job(mock_env("1.2.0"), make_job(model, tmp_path / "old",
                                                  build={**BUILD_13, "quantized_algorithm": "normal_r16"}), timeout=120)
    assert ids(refused) == ["toolkit.algorithm"]


def test_known_board_failure_is_written_into_the_model(tmp_path: Path) -> None:
    from rkedge.errors import RuntimeInitError
    from rkedge.failures import PLAN
    from rkedge.runtime import LLM

    model = write_checkpoint(tmp_path / "gemma2", arch="Gemma2ForCausalLM", model_type="gemma2",
                             meta={"chat_family": "gemma"}, config={"vocab_size": 256000, "hidden_size": 3584})
    build = {k: v for k, v in BUILD_13.items() if k != "max_context"}
    build["quantized_dtype"] = "w8a8_g128"
    load = {"model": str(model), "model_lora": None, "device": "cpu"}
    result = run_job(mock_env("1.1.1"), make_job(model, tmp_path / "out", build=build, load=load,
                                                 name="gemma2_w8a8_g128_rk3588.rkllm"), timeout=120)
    assert result.ok, result.log_lines
    manifest = read_simulated_model(result.outputs[0]["path"])
    entry = next(rule for rule in PLAN if rule.kind == "board-failure")
    assert manifest["faults"] == entry.board_fault and manifest["known_failures"] == [entry.id]
    # ... and the simulated board reproduces it.
    with pytest.raises(RuntimeInitError) as caught:
        LLM(result.outputs[0]["path"], library="mock", abi="1.1").close()
    assert "F-1" in str(caught.value)
    # Plain w8a8 is the one configuration that works:
    plain = run_job(mock_env("1.1.1"), make_job(model, tmp_path / "plain", load=load, name="g.rkllm",
                                                build={**build, "quantized_dtype": "w8a8"}), timeout=120)
    assert read_simulated_model(plain.outputs[0]["path"])["faults"] == {}


# -- GGUF -------------------------------------------------------------------------------------------------------


def write_gguf(path: Path, file_type: int, arch: str = "qwen2") -> Path:
    def string(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<Q", len(data)) + data

    kvs = [string("general.architecture") + struct.pack("<I", 8) + string(arch),
           string("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", file_type),
           string(f"{arch}.embedding_length") + struct.pack("<I", 4) + struct.pack("<I", 896),
           string("tokenizer.ggml.tokens") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 3)
           + b"".join(string(t) for t in ("a", "b", "c"))]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    return path


def test_gguf_types(tmp_path: Path) -> None:
    build = {**BUILD_13, "target_platform": "rk3576", "num_npu_core": 2, "quantized_dtype": "w4a16_g32"}
    q4 = write_gguf(tmp_path / "m-q4_0.gguf", 2)
    result = run_job(mock_env("1.2.1"), make_job(q4, tmp_path / "a", build=build, method="load_gguf"), timeout=120)
    assert result.ok, result.log_lines
    manifest = read_simulated_model(result.outputs[0]["path"])
    assert (manifest["architecture"], manifest["dtype"], manifest["hidden_size"], manifest["vocab_size"]) == \
        ("Qwen2ForCausalLM", "w4a16_g32", 896, 3)
    q8 = write_gguf(tmp_path / "m-q8_0.gguf", 7)
    result = run_job(mock_env("1.2.1"), make_job(q8, tmp_path / "b", build=build, method="load_gguf"), timeout=120)
    assert "Not support GGMLQuantizationType: MOSTLY_Q8_0!" in result.log_lines and ids(result) == ["gguf.type"]
    f16 = write_gguf(tmp_path / "m-f16.gguf", 1)
    result = run_job(mock_env("1.2.1"), make_job(f16, tmp_path / "c", build=build, method="load_gguf"), timeout=120)
    assert ids(result) == ["gguf.fp16-quantization"]
    on_3588 = run_job(mock_env("1.2.1"), make_job(q4, tmp_path / "d", method="load_gguf"), timeout=120)
    assert ids(on_3588) == ["F-2"]  # q4_0 is w4a16_g32: never rk3588


# -- the worker itself and the error table -----------------------------------------------------------------------


def test_worker_is_python38_stdlib_only() -> None:
    source = WORKER.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 8))
    annotated = [node.lineno for node in ast.walk(tree)
                 if isinstance(node, ast.AnnAssign) or (isinstance(node, ast.arg) and node.annotation is not None)
                 or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None)]
    assert annotated == [], "annotations are evaluated at runtime on Python 3.8 (no PEP 604 there)"
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add((node.module or "").split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"rkllm"}
    assert "from __future__" not in source


def test_parse_fraction() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("rkedge_worker_under_test", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)  # type: ignore[union-attr]
    bar = "Converting model: 100%|██████████| 341/341 [00:05<00:00, 60.1it/s]"
    assert worker.parse_fraction(bar) == 1.0
    assert worker.parse_fraction("Building model:  25%|██        | 3/12") == 0.25
    assert worker.parse_fraction("Optimizing model: 40%") == 0.4
    assert worker.parse_fraction("INFO: Setting max_context_limit to 4096") is None
    assert worker.parse_fraction("loaded 2024/05 data") is None


@pytest.mark.parametrize("line, finding", [
    ("ERROR: target_platform: rk3588 not support quantized_dtype: w4a16_g128!", "F-2"),
    ("The quantized_dtype = 'w4a16' is not supported in 'rk3588'!", "F-2"),
    ("ERROR: Not support Gemma3ForCausalLM!", "F-8"),
    ("ERROR: Catch exception when loading model: 'Gemma3Config' object has no attribute 'vocab_size'", "F-8"),
    ("ERROR: Catch exception when loading model: The size of tensor a (2048) must match the size of tensor b "
     "(4096) at non-singleton dimension 0", "F-8"),
    ("ERROR: Catch exception when loading model: bitsandbytes", "F-9"),
    ("NameError: name 'exit' is not defined", "F-14"),
    ("ERROR: rkllm_toolkit-1.0.1-cp38-cp38-linux_x86_64.whl is not a supported wheel on this platform.", "F-14"),
    ("ERROR: No matching distribution found for torch==2.3.0", "F-14"),
    ("E rkllm: max_context[16384] must be less than the model's max_context_limit[4096]", "F-7"),
    ("ERROR: do_quantization must be False, when GGMLQuantizationType is MOSTLY_F16!", "gguf.fp16-quantization"),
    ("Not support GGMLQuantizationType: MOSTLY_Q4_K_M!", "gguf.type"),
    ("ERROR: Catch exception when loading model: something else", "toolkit.load-failed"),
    (simulated_text("calibration", "dataset x.json item 0 has no target"), "calibration"),
])
def test_known_error_texts(line: str, finding: str) -> None:
    found = findings_from_log(["some noise", line, "Load model failed!"])
    assert [f.id for f in found if f.severity == "error"][:1] == [finding]
    assert all(f.fix for f in found if f.severity == "error")


def test_known_error_table_is_sourced() -> None:
    for entry in [e for e in failures.entries("toolkit") if not e.simulated]:
        assert entry.source and entry.message and entry.regex is not None
    found = findings_from_log(["ERROR: Catch exception when loading model: bitsandbytes", "Load model failed!"])
    assert [f.id for f in found] == ["F-9"]  # the generic "load failed" is dropped when a specific entry matched
    assert findings_from_log(["Load model failed!"])[0].id == "toolkit.load-failed"
    assert findings_from_log(["all good"]) == []


def test_simulated_package_is_importable_only_with_its_folder_on_the_path() -> None:
    # The folder is not a package of rkedge's tree; the worker gets it on PYTHONPATH for the mock.
    assert (SIMULATED_DIR / "rkllm" / "api.py").is_file() and not (SIMULATED_DIR / "__init__.py").exists()


def _python38() -> str | None:
    import shutil

    for candidate in (shutil.which("python3.8"), "/root/.pyenv/versions/3.8.18/bin/python3.8"):
        if candidate and Path(candidate).exists():
            done = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                  text=True)
            if done.returncode == 0 and done.stdout.strip() == "(3, 8)":
                return candidate
    return None


@pytest.mark.skipif(_python38() is None, reason="needs a Python 3.8 interpreter (the oldest the toolkit uses)")
def test_worker_runs_on_python38(tmp_path: Path) -> None:
    """The toolkit's own interpreter can be 3.8: probe, then a whole job against the stdlib-only fake rkllm.api."""
    python = _python38()
    assert python is not None
    bare = probe_python(python)
    assert (bare["python"][:4], bare["import_ok"], bare["returncode"]) == ("3.8.", False, 3)
    wrapper = tmp_path / "python38-with-toolkit"
    fake = Path(__file__).resolve().parent / "fake_toolkit"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={fake} exec {python} \"$@\"\n")
    wrapper.chmod(0o755)
    env = ToolkitEnv("python", str(wrapper), "1.1.1", "fake toolkit on 3.8")
    job = make_job(tmp_path, tmp_path / "out", load={"model": str(tmp_path), "model_lora": None},
                   build={"do_quantization": True, "quantized_dtype": "w8a8"})
    result = run_job(env, job, timeout=60)
    assert result.ok, (result.error, result.log_lines)
    assert result.calls[1] == {"method": "build", "kwargs": {"do_quantization": True, "quantized_dtype": "w8a8"}}


def test_an_interrupt_kills_the_worker(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    model = write_checkpoint(tmp_path / "export", meta=QWEN_META)

    def interrupt(event: dict[str, Any]) -> None:
        if event["type"] == "progress" and event["step"] == "build":
            raise KeyboardInterrupt

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(KeyboardInterrupt):
        run_job(mock_env(), make_job(model, tmp_path / "out"), on_event=interrupt, timeout=120,
                extra_env={"RKEDGE_SIM_TOOLKIT_FAIL": "build:hang"})
    assert {p.pid for p in psutil.Process().children(recursive=True)} - before == set()
