"""``install_toolkit`` with a fake wheel: real venv, real worker probe, pip replaced by a recording fake runner.

The fake runner records pip commands and "installs" the wheel by unzipping it into the venv's site-packages
(a wheel is a zip), so the probe and a job afterwards run the real worker against the wheel's fake rkllm.api.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from rkedge.convert.toolkit import build_job, resolve_toolkit, run_job
from rkedge.convert.toolkit.environments import (
    KNOWN_REQUIREMENTS,
    RECORDS_FILE,
    REQUIREMENTS_FILE,
    install_toolkit,
    list_toolkits,
    newest_toolkit,
    split_glued_requirements,
)
from rkedge.errors import InputError, ToolkitError

FAKE = Path(__file__).resolve().parent / "fake_toolkit"
TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"


@pytest.fixture(autouse=True)
def _x86_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")  # the wheels' only platform
    monkeypatch.setenv("RKEDGE_TOOLKITS_DIR", str(tmp_path / "toolkits"))


def make_wheel(folder: Path, version: str = "1.2.2", tag: str = TAG, requires: list[str] | None = None,
               api_source: str | None = None) -> Path:
    wheel = folder / f"rkllm_toolkit-{version}-{tag}-{tag}-linux_x86_64.whl"
    info = f"rkllm_toolkit-{version}.dist-info"
    metadata = "Metadata-Version: 2.1\nName: rkllm-toolkit\nVersion: " + version + "\n" + \
        "".join(f"Requires-Dist: {r}\n" for r in (requires or []))
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(FAKE / "rkllm" / "__init__.py", "rkllm/__init__.py")
        if api_source is None:
            archive.write(FAKE / "rkllm" / "api.py", "rkllm/api.py")
        else:
            archive.writestr("rkllm/api.py", api_source)
        archive.writestr(f"{info}/METADATA", metadata)
        archive.writestr(f"{info}/WHEEL",
                         f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {tag}-{tag}-linux_x86_64\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


class FakeRunner:
    """Records every command; fakes pip; runs venv creation (without pip) and everything else for real."""

    def __init__(self, fail_requirements: str | None = None) -> None:
        self.calls: list[tuple[list[str], dict[str, str] | None]] = []
        self.fail_requirements = fail_requirements

    def pip_calls(self) -> list[tuple[list[str], dict[str, str] | None]]:
        return [(cmd, env) for cmd, env in self.calls if cmd[1:3] == ["-m", "pip"]]

    def __call__(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        cmd = [str(c) for c in cmd]
        self.calls.append((cmd, kwargs.get("env")))
        if cmd[1:3] == ["-m", "venv"]:
            return subprocess.run([*cmd[:3], "--without-pip", *cmd[3:]], **kwargs)
        if cmd[1:4] == ["-m", "pip", "install"]:
            if "--no-deps" in cmd:
                purelib = subprocess.run([cmd[0], "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                         capture_output=True, text=True, check=True).stdout.strip()
                with zipfile.ZipFile(cmd[-1]) as archive:
                    archive.extractall(purelib)
            elif self.fail_requirements:
                return subprocess.CompletedProcess(cmd, 1, "Collecting torch==2.3.0\n", self.fail_requirements)
            return subprocess.CompletedProcess(cmd, 0, "Successfully installed\n", "")
        return subprocess.run(cmd, **kwargs)


GLUED = ["tqdm>=4.64.0", "timm==1.0.19numpy >= 1.23.1,<=1.26.4", "numpy >= 1.23.1,<=1.26.4",
         "tqdm>=4.64.0; extra == 'docs'"]


def test_install_records_a_probed_environment(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, requires=GLUED)
    runner = FakeRunner()
    record = install_toolkit(wheel, python=sys.executable, runner=runner)

    pips = runner.pip_calls()
    assert len(pips) == 2
    (requirements_cmd, requirements_env), (wheel_cmd, wheel_env) = pips
    assert "-r" in requirements_cmd and "--no-deps" not in requirements_cmd  # requirements first ...
    assert wheel_cmd[-2:] == ["--no-deps", str(wheel)]  # ... then the wheel alone
    assert requirements_env and wheel_env and requirements_env["BUILD_CUDA_EXT"] == wheel_env["BUILD_CUDA_EXT"] == "0"
    assert all(cmd[0] == record.python for cmd, _ in pips)

    venv = tmp_path / "toolkits" / f"1.2.2-{TAG}"
    assert (record.version, record.python_tag, record.venv) == ("1.2.2", TAG, str(venv))
    assert record.requirements == ("tqdm>=4.64.0", "timm==1.0.19", "numpy >= 1.23.1,<=1.26.4")
    assert (venv / REQUIREMENTS_FILE).read_text().splitlines() == list(record.requirements)
    assert "METADATA" in record.requirements_source
    assert any("split the malformed requirement 'timm==1.0.19numpy" in fix for fix in record.fixes)
    assert any("duplicate" in fix for fix in record.fixes)
    assert record.probe["import_ok"] and record.probe["toolkit_version"] == "1.2.2"
    assert len(record.wheel_sha256) == 64 and record.installed_at

    stored = json.loads((tmp_path / "toolkits" / RECORDS_FILE).read_text())
    assert [t["venv"] for t in stored["toolkits"]] == [str(venv)]
    assert list_toolkits() == [record] and newest_toolkit() == record

    # The recorded environment is what --toolkit defaults to, and the real worker drives its rkllm.api.
    env = resolve_toolkit(None, None)
    assert (env.kind, env.python, env.version) == ("python", record.python, "1.2.2")
    assert resolve_toolkit("1.2.2", None) == env
    with pytest.raises(InputError):
        resolve_toolkit(None, "1.3.0")
    (tmp_path / "out").mkdir()
    calls = tmp_path / "fake-calls.jsonl"
    job = build_job(load_method="load_huggingface",
                    load_kwargs={"model": str(tmp_path), "model_lora": None, "device": "cpu", "dtype": "float32"},
                    build_kwargs={"do_quantization": True, "quantized_dtype": "w8a8", "target_platform": "rk3588",
                                  "hybrid_rate": 0.5, "max_context": 4096},
                    export_kwargs={"export_path": str(tmp_path / "out" / "m.rkllm")})
    result = run_job(env, job, timeout=120, extra_env={"FAKE_RKLLM_RECORD": str(calls)})
    assert result.ok, (result.error, result.log_lines)
    assert "fake toolkit: loaded " + str(tmp_path) in result.log_lines
    assert result.toolkit_version == "1.2.2"
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    assert recorded[1] == {"method": "build", "kwargs": job["build"]["kwargs"]}


def test_install_falls_back_to_the_pin_table(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, version="1.3.0", requires=[])
    record = install_toolkit(wheel, python=sys.executable, runner=FakeRunner())
    assert record.requirements == KNOWN_REQUIREMENTS["1.3.0"]
    assert "transformers == 5.8.0" in record.requirements and "rkedge table" in record.requirements_source
    newer = make_wheel(tmp_path, version="1.2.2", requires=["torch==2.6.0"])
    install_toolkit(newer, python=sys.executable, runner=FakeRunner())
    assert newest_toolkit().version == "1.3.0" and newest_toolkit(version="1.2.2").version == "1.2.2"
    assert [r.version for r in list_toolkits()] == ["1.3.0", "1.2.2"]


def test_install_refuses_wrong_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    runner = FakeRunner()
    other = "cp38" if TAG != "cp38" else "cp39"
    with pytest.raises(InputError, match="is for CPython"):
        install_toolkit(make_wheel(tmp_path, tag=other), python=sys.executable, runner=runner)
    bad_name = tmp_path / "rkllm-toolkit.whl"
    bad_name.write_bytes(b"")
    with pytest.raises(InputError, match="not an rkllm-toolkit wheel name"):
        install_toolkit(bad_name, python=sys.executable, runner=runner)
    arm = tmp_path / f"rkllm_toolkit-1.2.2-{TAG}-{TAG}-linux_aarch64.whl"
    arm.write_bytes(b"")
    with pytest.raises(InputError, match="linux x86_64 only"):
        install_toolkit(arm, python=sys.executable, runner=runner)
    with pytest.raises(InputError, match="unknown rkllm-toolkit version"):
        install_toolkit(make_wheel(tmp_path, version="9.9.9"), python=sys.executable, runner=runner)
    with pytest.raises(InputError, match="not found"):
        install_toolkit(tmp_path / "missing.whl", runner=runner)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(InputError, match="not a supported wheel on this platform"):
        install_toolkit(make_wheel(tmp_path), python=sys.executable, runner=runner)
    assert runner.pip_calls() == []


def test_existing_install_needs_force(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    first = install_toolkit(wheel, python=sys.executable, runner=FakeRunner())
    with pytest.raises(InputError, match="already installed"):
        install_toolkit(wheel, python=sys.executable, runner=FakeRunner())
    again = install_toolkit(wheel, python=sys.executable, runner=FakeRunner(), force=True)
    assert again.venv == first.venv and len(list_toolkits()) == 1


def test_pip_failure_leaves_nothing_installed(tmp_path: Path) -> None:
    runner = FakeRunner(fail_requirements="ERROR: No matching distribution found for torch==2.3.0\n")
    with pytest.raises(ToolkitError) as caught:
        install_toolkit(make_wheel(tmp_path, version="1.2.1", requires=["torch==2.3.0"]), python=sys.executable,
                        runner=runner)
    assert "F-14" in str(caught.value)
    assert not (tmp_path / "toolkits" / f"1.2.1-{TAG}").exists()
    assert list_toolkits() == []


def test_a_toolkit_that_does_not_import_is_not_recorded(tmp_path: Path) -> None:
    broken = "raise NameError(\"name 'exit' is not defined\")\n"
    with pytest.raises(ToolkitError) as caught:
        install_toolkit(make_wheel(tmp_path, api_source=broken), python=sys.executable, runner=FakeRunner())
    assert "F-14" in str(caught.value) and "name 'exit' is not defined" in str(caught.value)
    assert list_toolkits() == [] and not (tmp_path / "toolkits" / f"1.2.2-{TAG}").exists()


def test_the_malformed_122_requirements_are_repaired() -> None:
    table = list(KNOWN_REQUIREMENTS["1.2.2"])
    shipped = table[:-1] + [table[-1] + table[0]] + table[1:]  # the list repeated with no newline in between
    assert "timm==1.0.19numpy >= 1.23.1,<=1.26.4" in shipped
    fixed, fixes = split_glued_requirements(shipped)
    assert fixed == table
    assert fixes == ["split the malformed requirement 'timm==1.0.19numpy >= 1.23.1,<=1.26.4' into 'timm==1.0.19' "
                     "and 'numpy >= 1.23.1,<=1.26.4'", f"dropped {len(table)} duplicate requirements"]
    # Versions that merely contain letters are left alone.
    for requirement in ("torch==2.3.0+cpu", "foo==1.0rc1", "bar>=2.0.post1", "baz==1.0dev"):
        assert split_glued_requirements([requirement]) == ([requirement], [])
