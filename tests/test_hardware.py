"""The hardware tier: the same checks against Rockchip's real pieces, where a machine has them.

``board`` tests need an RK3588 with the vendor runtime and a vendor-converted model:
``RKEDGE_RKLLM_LIB=/usr/lib/librkllmrt.so RKEDGE_TEST_MODEL=model.rkllm pytest -m board``.
``toolkit`` tests need an rkllm-toolkit environment (``rkedge toolkit install WHEEL``):
``RKEDGE_TEST_TOOLKIT=/path/to/toolkit-venv/bin/python pytest -m toolkit``.
Elsewhere (CI included) they are skipped with the variable they need; they never pass without having run.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
from cli_helpers import run_cli

from rkedge.manifest import manifest_path
from rkedge.runtime.simmodel import is_simulated_model


def _needs(variable: str, what: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"set {variable} to {what} to run this hardware test")
    path = Path(value)
    if not path.exists():
        pytest.fail(f"{variable}={value} does not exist")
    return path


@pytest.fixture
def real_library() -> Path:
    if platform.machine() != "aarch64":
        pytest.skip("the vendor runtime runs on aarch64 boards only")
    return _needs("RKEDGE_RKLLM_LIB", "the board's librkllmrt.so")


@pytest.fixture
def real_model() -> Path:
    model = _needs("RKEDGE_TEST_MODEL", "a .rkllm converted by Rockchip's rkllm-toolkit")
    if is_simulated_model(model):
        pytest.fail(f"{model} is a simulated model; the board tier needs a vendor-converted one")
    return model


@pytest.mark.board
def test_the_vendor_library_is_detected_without_an_abi_flag(real_library: Path) -> None:
    from rkedge.runtime.library import detect_abi

    detection = detect_abi(real_library)
    assert detection.abi is not None, f"no ABI could be read from {real_library}: {detection}"


@pytest.mark.board
def test_a_vendor_model_generates_and_reports_stats(real_library: Path, real_model: Path) -> None:
    from rkedge.runtime import LLM

    with LLM(real_model, library=real_library, max_context_len=512, max_new_tokens=16) as llm:
        result = llm.generate("Say hello.", stream=False)
    assert result.text.strip(), "the NPU produced no text"
    assert result.finish_reason in {"stop", "length"}


@pytest.mark.board
def test_the_real_runtime_refuses_a_simulated_model(real_library: Path, tmp_path: Path) -> None:
    from rkedge.errors import RkedgeError
    from rkedge.runtime import LLM

    fake = tmp_path / "fake.rkllm"
    made = run_cli("mock-model", "--out", str(fake))
    assert made.returncode == 0, made.stderr
    with pytest.raises(RkedgeError, match="simulated"):
        LLM(fake, library=real_library)


@pytest.mark.toolkit
def test_the_real_toolkit_converts_a_tiny_model(tmp_path: Path) -> None:
    from tiny_models import make_checkpoint

    python = _needs("RKEDGE_TEST_TOOLKIT", "the python of an rkllm-toolkit environment")
    model = make_checkpoint(tmp_path / "tiny-llama", "llama")
    out = tmp_path / "out"
    done = run_cli("convert", str(model), "--out", str(out), "--toolkit", str(python), "--json", timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    produced = sorted(out.glob("*.rkllm"))
    assert produced, f"no .rkllm in {out}"
    assert not is_simulated_model(produced[0]), "a real toolkit run wrote a simulated model"
    manifest = json.loads(manifest_path(produced[0]).read_text())
    assert manifest["simulated"] is False


@pytest.mark.toolkit
def test_the_real_toolkit_refusal_becomes_a_finding(tmp_path: Path) -> None:
    """The toolkit's own F-2 text, not the planner's: the job goes to the worker directly (the planner would refuse
    w4a16 for RK3588 before the toolkit ever ran)."""
    from tiny_models import make_checkpoint

    from rkedge.convert.toolkit import build_job, resolve_toolkit, run_job

    python = _needs("RKEDGE_TEST_TOOLKIT", "the python of an rkllm-toolkit environment")
    model = make_checkpoint(tmp_path / "tiny-llama", "llama")
    env = resolve_toolkit(str(python), None)
    assert not env.simulated
    job = build_job(load_method="load_huggingface",
                    load_kwargs={"model": str(model), "model_lora": None, "device": "cpu"},
                    build_kwargs={"do_quantization": True, "optimization_level": 0, "quantized_dtype": "w4a16",
                                  "quantized_algorithm": "normal", "target_platform": "rk3588",
                                  "num_npu_core": 3, "dataset": None, "hybrid_rate": 0.0},
                    export_kwargs={"export_path": str(tmp_path / "out.rkllm")})
    result = run_job(env, job, timeout=3600)
    assert not result.ok
    refusals = [f for f in result.findings if f.id == "F-2"]
    assert refusals and "toolkit said" in refusals[0].source, result.log_lines[-20:]
    assert not (tmp_path / "out.rkllm").exists()
