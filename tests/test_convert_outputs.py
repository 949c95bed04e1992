"""`rkedge convert`'s outputs (issue 11 item 8): never a finished-looking subset, never the source overwritten, one
conversion per output folder, no job file left behind, a LoRA convert beside the plain one."""

from __future__ import annotations

import errno
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
from tiny_models import make_checkpoint, train_lora

import rkedge.convert.pipeline as pipeline
from rkedge._fs import folder_lock
from rkedge.convert.pipeline import LOCK_FILE, WORK, convert
from rkedge.convert.planner import ConversionRequest
from rkedge.errors import InputError, ModelFileError
from rkedge.manifest import Manifest, read_manifest
from rkedge.modelfile import check_model_file


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_checkpoint(tmp_path_factory.mktemp("outputs") / "llama", "llama")
    (folder / "README.md").write_text("# the source's own card\n")
    return folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.json"
    path.write_text(json.dumps([{"prompt": p, "target": "ok"} for p in ("Hello!", "你好", "Bonjour", "2+2?")]))
    return path


def _request(model: Path, out: Path, prompts: Path, **extra: object) -> ConversionRequest:
    return ConversionRequest(model=model, out=out, toolkit="mock", calibration=str(prompts), **extra)  # type: ignore[arg-type]


def _finished(out: Path) -> list[Path]:
    """Models that look finished: a .rkllm (and what the runtime would load with it)."""
    return sorted(out.glob("*.rkllm"))


def test_out_equal_to_the_model_folder_is_refused_and_the_source_kept(model: Path) -> None:
    before = sorted(p.name for p in model.iterdir())
    result = run_cli("convert", str(model), "--out", str(model), "--toolkit", "mock")
    assert result.returncode == 2, result.stderr
    assert "is the model folder" in result.stderr and "fix:" in result.stderr and "Traceback" not in result.stderr
    assert (model / "README.md").read_text() == "# the source's own card\n"
    assert sorted(p.name for p in model.iterdir()) == before


def test_out_equal_to_the_lora_folder_is_refused(model: Path, tmp_path: Path, prompts: Path) -> None:
    adapter = train_lora(model, tmp_path / "adapter", steps=1)
    with pytest.raises(InputError, match="is the LoRA folder"):
        convert(_request(model, adapter, prompts, lora=adapter))
    assert not list(adapter.glob("*.rkllm")) and not (adapter / WORK).exists()


def test_a_second_convert_into_a_busy_folder_is_refused(model: Path, tmp_path: Path, prompts: Path) -> None:
    out = tmp_path / "o"
    with folder_lock(out / WORK / LOCK_FILE, what="held by this test"), \
            pytest.raises(InputError, match="in use by rkedge") as refused:
        convert(_request(model, out, prompts))
    assert refused.value.fix and "another --out" in refused.value.fix
    assert not _finished(out)
    assert convert(_request(model, out, prompts)).model_file  # the lock died with its holder


def test_two_converts_into_one_folder_at_once_one_is_refused(model: Path, tmp_path: Path, prompts: Path) -> None:
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "rkedge", "convert", str(model), "--out", str(out), "--toolkit", "mock",
            "--calibration", str(prompts)]
    slow = {**os.environ, "RKEDGE_SIM_TOOLKIT_PACE": "0.2"}  # the first one holds the folder for a few seconds
    first = subprocess.Popen(argv, env=slow, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".rkedge-tmp-*")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = run_cli(*argv[3:])
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and "in use by rkedge (pid" in second.stderr and "Traceback" not in second.stderr
    manifest = read_manifest(out / "llama_w8a8_rk3588.rkllm")
    assert manifest is not None
    check_model_file(manifest, out / "llama_w8a8_rk3588.rkllm", verify_sha256=True)


def test_sigkill_of_the_parent_leaves_no_job_file_anywhere(model: Path, tmp_path: Path, prompts: Path) -> None:
    out, temp = tmp_path / "o", tmp_path / "tmp"
    temp.mkdir()
    argv = [sys.executable, "-m", "rkedge", "convert", str(model), "--out", str(out), "--toolkit", "mock",
            "--calibration", str(prompts)]
    env = {**os.environ, "TMPDIR": str(temp), "RKEDGE_SIM_TOOLKIT_FAIL": "build:hang"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob(".rkedge-tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # the worker has read its job
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # the orphaned worker notices its parent is gone
    assert not list(temp.glob("rkedge-job-*")), "no job file in the system temp folder"
    assert not list((out / WORK).glob("rkedge-job-*")), "the worker deleted its job file once read"
    assert not _finished(out)
    rerun = run_cli(*argv[3:], env={"TMPDIR": str(temp)})
    assert rerun.returncode == 0, rerun.stderr
    assert not list(temp.glob("rkedge-job-*")) and not list((out / WORK).glob("rkedge-job-*"))
    assert not list(out.glob(".rkedge-tmp-*"))


def test_a_lora_convert_beside_a_plain_one_keeps_the_base(model: Path, tmp_path: Path, prompts: Path) -> None:
    out = tmp_path / "o"
    plain = convert(_request(model, out, prompts))
    assert plain.model_file is not None
    base_bytes = plain.model_file.read_bytes()
    adapter = train_lora(model, tmp_path / "style", steps=1)
    merged = convert(_request(model, out, prompts, lora=adapter))
    assert merged.model_file == out / "llama-style_w8a8_rk3588.rkllm"
    assert plain.model_file.read_bytes() == base_bytes
    for model_file in (plain.model_file, merged.model_file):
        manifest = read_manifest(model_file)
        assert manifest is not None
        check_model_file(manifest, model_file, verify_sha256=True)
    merged_manifest = read_manifest(merged.model_file)
    assert merged_manifest is not None and merged_manifest.inputs and merged_manifest.inputs["adapter"]
    base_manifest = read_manifest(plain.model_file)
    assert base_manifest is not None and base_manifest.inputs and base_manifest.inputs["adapter"] is None


def test_a_full_disk_while_publishing_leaves_the_earlier_conversion_whole(
        model: Path, tmp_path: Path, prompts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    first = convert(_request(model, out, prompts, max_context=2048))
    assert first.model_file is not None
    written = pipeline.atomic_write_text

    def disk_full_on_the_manifest(target: str | os.PathLike[str], text: str) -> Path:
        if str(target).endswith(".rkllm.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return written(target, text)

    monkeypatch.setattr(pipeline, "atomic_write_text", disk_full_on_the_manifest)
    with pytest.raises(InputError, match="the disk filled up") as full:
        convert(_request(model, out, prompts, max_context=4096))
    assert full.value.code == "disk_full" and full.value.fix and "free at least" in full.value.fix
    manifest = read_manifest(first.model_file)
    assert manifest is not None and manifest.max_context_limit == 2048
    check_model_file(manifest, first.model_file, verify_sha256=True)  # the old pair, untouched
    assert not list(out.glob(".rkedge-tmp-*"))


def test_a_model_file_that_does_not_match_its_manifest_is_refused(model: Path, tmp_path: Path,
                                                                  prompts: Path) -> None:
    out = tmp_path / "o"
    result = convert(_request(model, out, prompts))
    assert result.model_file is not None and result.manifest is not None
    manifest: Manifest = result.manifest
    check_model_file(manifest, result.model_file, verify_sha256=True)
    with open(result.model_file, "ab") as handle:  # an old .rkllm of another size left beside the manifest
        handle.write(b"\0")
    with pytest.raises(ModelFileError, match="different conversions") as refused:
        check_model_file(manifest, result.model_file)
    assert refused.value.fix and "manifest" in refused.value.fix
    renamed = tmp_path / "other.rkllm"
    result.model_file.rename(renamed)
    with pytest.raises(ModelFileError, match="describes"):
        check_model_file(manifest, renamed)
    with pytest.raises(ModelFileError, match="cannot read"):
        check_model_file(manifest, result.model_file)
