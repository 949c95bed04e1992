"""`rkedge doctor` on fixture roots: several boards and failure states, human and JSON."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run_cli

from rkedge.runtime.doctor import run_doctor
from rkedge.runtime.mock import build_mock_library

GIB = 1 << 30


def make_root(tmp_path: Path, *, model: str, compatible: list[str], ram_gb: int, driver: str | None,
              driver_where: str = "debugfs", runtime: tuple[str, str] | None = ("1.2.1", "1.2.2"),
              governor: str = "schedutil", debugfs_hidden: bool = False, rocket: bool = False) -> Path:
    root = tmp_path / "root"
    (root / "proc" / "device-tree").mkdir(parents=True)
    (root / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\0")
    (root / "proc" / "device-tree" / "compatible").write_bytes(b"".join(c.encode() + b"\0" for c in compatible))
    kib = ram_gb * 1024 * 1024
    (root / "proc" / "meminfo").write_text(f"MemTotal: {kib} kB\nMemAvailable: {kib * 9 // 10} kB\nSwapTotal: 0 kB\n")
    (root / "sys" / "kernel" / "debug").mkdir(parents=True)
    if driver and driver_where == "debugfs" and not debugfs_hidden:
        (root / "sys" / "kernel" / "debug" / "rknpu").mkdir()
        (root / "sys" / "kernel" / "debug" / "rknpu" / "version").write_text(f"RKNPU driver: v{driver}\n")
    if driver and driver_where == "module":
        (root / "sys" / "module" / "rknpu").mkdir(parents=True)
        (root / "sys" / "module" / "rknpu" / "version").write_text(driver + "\n")
    if rocket:
        (root / "sys" / "module" / "rocket").mkdir(parents=True)
    for policy in ("policy0", "policy4", "policy6"):
        folder = root / "sys" / "devices" / "system" / "cpu" / "cpufreq" / policy
        folder.mkdir(parents=True)
        (folder / "scaling_governor").write_text(governor + "\n")
    npu = root / "sys" / "class" / "devfreq" / "fdab0000.npu"
    npu.mkdir(parents=True)
    (npu / "governor").write_text("rknpu_ondemand\n")
    (npu / "cur_freq").write_text("1000000000\n")
    if runtime:
        abi, release = runtime
        (root / "usr" / "lib").mkdir(parents=True)
        shutil.copy(build_mock_library(abi, runtime_version=release), root / "usr" / "lib" / "librkllmrt.so")
    return root


def statuses(report) -> dict[str, str]:
    return {c.id: c.status for c in report.checks}


def test_orange_pi_5_with_driver_0_9_6(tmp_path):
    root = make_root(tmp_path, model="Xunlong Orange Pi 5", compatible=["xunlong,orangepi-5", "rockchip,rk3588s"],
                     ram_gb=8, driver="0.9.6")
    report = run_doctor(root)
    checks = statuses(report)
    assert checks["soc"] == "ok" and report.facts["board"] == "orangepi-5" and report.facts["soc"] == "rk3588s"
    assert checks["driver"] == "warn" and report.facts["rknpu_driver"] == "0.9.6"
    assert checks["library"] == "ok" and report.facts["library"]["abi"] == "1.2.1"
    assert checks["clocks"] == "info"
    assert report.verdict == "warn"
    text = report.render()
    assert "[warn] NPU driver: rknpu 0.9.6" in text and "0.9.8" in text and "verdict: WARN" in text


def test_rock_5b_with_driver_0_9_8_is_ok(tmp_path):
    root = make_root(tmp_path, model="Radxa ROCK 5B", compatible=["radxa,rock-5b", "rockchip,rk3588"], ram_gb=16,
                     driver="0.9.8", driver_where="module", governor="performance", runtime=("1.3.0", "1.3.0"))
    report = run_doctor(root)
    assert report.verdict == "ok", report.render()
    assert report.facts["board"] == "rock-5b" and report.facts["mem_total"] == 16 * GIB
    assert report.facts["npu_freq_hz"] == 1_000_000_000


@pytest.mark.parametrize(("model", "compatible"), [
    ("Raspberry Pi 4 Model B Rev 1.4", ["raspberrypi,4-model-b", "brcm,bcm2711"]),
    ("Radxa ROCK 3A", ["radxa,rock3a", "rockchip,rk3568"]),
])
def test_a_board_rkllm_cannot_run_on(tmp_path, model, compatible):
    root = make_root(tmp_path, model=model, compatible=compatible, ram_gb=8, driver=None, runtime=None)
    report = run_doctor(root)
    assert statuses(report)["soc"] == "fail" and report.verdict == "fail"


def test_debugfs_not_readable(tmp_path):
    root = make_root(tmp_path, model="Radxa ROCK 5B", compatible=["radxa,rock-5b", "rockchip,rk3588"], ram_gb=16,
                     driver="0.9.8", debugfs_hidden=True)
    check = next(c for c in run_doctor(root).checks if c.id == "driver")
    assert check.status == "warn" and "needs root" in check.detail and "sudo" in check.fix


def test_mainline_rocket_driver(tmp_path):
    root = make_root(tmp_path, model="Radxa ROCK 5B", compatible=["radxa,rock-5b", "rockchip,rk3588"], ram_gb=16,
                     driver=None, rocket=True)
    check = next(c for c in run_doctor(root).checks if c.id == "driver")
    assert check.status == "fail" and "rocket" in check.detail


def write_vendor_like_model(folder: Path, *, toolkit: str, weight_gb: float, platform: str = "rk3588") -> Path:
    """A stand-in for a converted file plus its manifest (doctor reads the manifest, never the weights)."""
    model = folder / "model.rkllm"
    model.write_bytes(b"\0" * 1024 + b"rkllm-toolkit version: " + toolkit.encode())
    data = model.read_bytes()
    manifest = {"schema": "rkedge-manifest", "schema_version": 1, "model_file": model.name,
                "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "platform": platform, "dtype": "w8a8", "toolkit": {"version": toolkit},
                "max_context_limit": 4096, "toolkit_calls": {}, "simulated": False,
                "estimate": {"weight_bytes": int(weight_gb * GIB), "embedding_bytes": 0, "kv_cache_bytes": 0}}
    (folder / "model.rkllm.json").write_text(json.dumps(manifest))
    return model


def test_model_checks_against_board_and_runtime(tmp_path):
    root = make_root(tmp_path, model="Xunlong Orange Pi 5", compatible=["xunlong,orangepi-5", "rockchip,rk3588s"],
                     ram_gb=8, driver="0.9.6")
    models = tmp_path / "models"
    models.mkdir()
    newer = write_vendor_like_model(models, toolkit="1.3.0", weight_gb=1.0)
    checks = statuses(run_doctor(root, model=newer))
    assert checks["model.skew"] == "fail"  # F-3: 1.3.0 model on runtime 1.2.2
    same = write_vendor_like_model(models, toolkit="1.2.2", weight_gb=1.0)
    assert statuses(run_doctor(root, model=same))["model.skew"] == "ok"
    drift = write_vendor_like_model(models, toolkit="1.2.1", weight_gb=1.0)
    assert statuses(run_doctor(root, model=drift))["model.skew"] == "warn"  # F-4
    big = write_vendor_like_model(models, toolkit="1.2.2", weight_gb=2.5)
    checks = statuses(run_doctor(root, model=big))
    assert checks["model.iommu-driver"] == "fail", "over 2 GiB of weights on driver 0.9.6"
    huge = write_vendor_like_model(models, toolkit="1.2.2", weight_gb=9.0)
    checks = statuses(run_doctor(root, model=huge))
    assert checks["model.memory"] == "fail" and checks["model.iommu"] == "warn"
    rk3576 = write_vendor_like_model(models, toolkit="1.2.2", weight_gb=1.0, platform="rk3576")
    assert statuses(run_doctor(root, model=rk3576))["model.platform"] == "fail"


def test_a_model_its_manifest_does_not_describe_fails_as_chat_would_refuse_it(tmp_path):
    root = make_root(tmp_path, model="Radxa ROCK 5B", compatible=["radxa,rock-5b", "rockchip,rk3588"], ram_gb=16,
                     driver="0.9.8")
    models = tmp_path / "models"
    models.mkdir()
    model = write_vendor_like_model(models, toolkit="1.2.2", weight_gb=1.0)
    assert statuses(run_doctor(root, model=model))["model.manifest"] == "ok"
    model.write_bytes(model.read_bytes()[:-1] + b"X")  # same size, other bytes: only the digest can tell
    report = run_doctor(root, model=model)
    check = next(c for c in report.checks if c.id == "model.manifest")
    assert check.status == "fail" and check.fix
    model.write_bytes(b"\0" * 10)  # an old conversion left beside a newer manifest
    assert statuses(run_doctor(root, model=model))["model.manifest"] == "fail"


def test_library_is_found_and_its_abi_selected_as_chat_would(tmp_path, monkeypatch):
    root = make_root(tmp_path, model="Radxa ROCK 5B", compatible=["radxa,rock-5b", "rockchip,rk3588"], ram_gb=16,
                     driver="0.9.8", runtime=("1.2.1", "1.2.2"))
    assert statuses(run_doctor(root))["library"] == "ok"
    report = run_doctor(root, abi="1.3.0")  # the file says 1.2.2: chat refuses to call it through 1.3.0's structs
    assert statuses(report)["library"] == "fail" and "wrong struct set" in report.render()
    monkeypatch.setenv("RKEDGE_RKLLM_ABI", "1.3.0")
    assert statuses(run_doctor(root))["library"] == "fail", "the environment's ABI counts as chat's does"
    monkeypatch.delenv("RKEDGE_RKLLM_ABI")
    elsewhere = tmp_path / "opt" / "librkllmrt.so"
    elsewhere.parent.mkdir()
    (root / "usr" / "lib" / "librkllmrt.so").rename(elsewhere)
    assert statuses(run_doctor(root))["library"] == "fail"
    monkeypatch.setenv("RKEDGE_RKLLM_LIB", str(elsewhere))
    report = run_doctor(root)
    assert statuses(report)["library"] == "ok" and report.facts["library"]["path"] == str(elsewhere)


def test_the_library_file_is_read_once(tmp_path, monkeypatch):
    import builtins

    root = make_root(tmp_path, model="Radxa ROCK 5B", compatible=["radxa,rock-5b", "rockchip,rk3588"], ram_gb=16,
                     driver="0.9.8")
    library = root / "usr" / "lib" / "librkllmrt.so"
    reads: list[str] = []
    read_bytes, real_open = Path.read_bytes, builtins.open

    def counting_read_bytes(self: Path) -> bytes:
        reads.append(str(self))
        return read_bytes(self)

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", counting_read_bytes)
    monkeypatch.setattr(builtins, "open", counting_open)
    report = run_doctor(root)
    assert reads.count(str(library)) == 1, reads
    facts = report.facts["library"]
    assert facts["simulated"] is True and facts["machine"]  # machine and marker came with the one read
    assert statuses(report)["library"] == "ok" and "built for" not in report.render()


def test_trial_init_reads_the_runtime_log(tmp_path):
    from rkedge.runtime.simmodel import simulated_manifest, write_simulated_model

    model = tmp_path / "gemma2.rkllm"
    write_simulated_model(model, simulated_manifest(toolkit_version="1.1.1", architecture="Gemma2ForCausalLM",
                                                    dtype="w8a8_g128",
                                                    faults={"init": "npu_malloc", "npu_malloc_size": 232128512}))
    report = run_doctor(tmp_path, model=model, library="mock", abi="1.1", trial_init=True)
    check = next(c for c in report.checks if c.id == "trial-init")
    assert check.status == "fail" and "F-1" in check.detail and "232128512" in check.detail
    assert "base_domain_id" in check.fix
    good = tmp_path / "good.rkllm"
    write_simulated_model(good, simulated_manifest(toolkit_version="1.1.4"))
    ok = run_doctor(tmp_path, model=good, library="mock", abi="1.1", trial_init=True)
    assert next(c for c in ok.checks if c.id == "trial-init").status == "ok"


def test_cli_human_and_json(tmp_path):
    root = make_root(tmp_path, model="Radxa ROCK 5B", compatible=["radxa,rock-5b", "rockchip,rk3588"], ram_gb=16,
                     driver="0.9.8")
    human = run_cli("doctor", "--root", str(root))
    assert human.returncode == 0 and "[ok]   SoC: RK3588 on Radxa ROCK 5B" in human.stdout
    as_json = run_cli("doctor", "--root", str(root), "--json")
    data = json.loads(as_json.stdout)
    assert data["facts"]["board"] == "rock-5b" and data["verdict"] in ("ok", "warn")
    pi = make_root(tmp_path / "pi", model="Raspberry Pi 4", compatible=["brcm,bcm2711"], ram_gb=4, driver=None,
                   runtime=None)
    failed = run_cli("doctor", "--root", str(pi), "--json")
    assert failed.returncode == 1 and json.loads(failed.stdout)["verdict"] == "fail"


def make_bundle(folder: Path, *, platform: str = "rk3588", graph_bytes: int = 1000) -> Path:
    """An RKNN bundle's manifest and files, enough for doctor (it does not load the graphs)."""
    folder.mkdir(parents=True)
    graphs = []
    for name in ("chunk0", "head"):
        (folder / f"{name}.rknn").write_bytes(b"\0" * graph_bytes)
        graphs.append({"name": name, "rknn": f"{name}.rknn", "rknn_bytes": graph_bytes, "inputs": ["x"],
                       "outputs": ["x_out"], "shapes": {"x": [1, 1, 8]}})
    (folder / "embedding.npy").write_bytes(b"\0" * 128)
    (folder / "bundle.json").write_text(json.dumps({
        "schema": "rkedge-rknn-bundle", "schema_version": 1, "backend": "rknn", "platform": platform, "dtype": "w8a8",
        "graphs": graphs[:1], "heads": graphs[1:], "embedding": {"file": "embedding.npy"},
        "versions": {"rknn_toolkit2": "2.5.0"}}))
    return folder


def test_an_rknn_bundle_is_checked_against_rknnlite_librknnrt_and_the_board(tmp_path):
    root = make_root(tmp_path, model="Radxa ROCK 5B", compatible=["radxa,rock-5b", "rockchip,rk3588"], ram_gb=8,
                     driver="0.9.8", runtime=None)
    bundle = make_bundle(tmp_path / "bundle")
    report = run_doctor(root, model=bundle)
    checks = statuses(report)
    assert checks["model"] == "ok" and report.facts["model"]["backend"] == "rknn"
    assert checks["library"] == "fail", "librknnrt.so is looked for, not librkllmrt.so"
    assert "librknnrt" in report.render()
    assert checks.get("rknnlite") in ("ok", "fail")
    assert checks["model.memory"] == "ok"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "librknnrt.so").write_bytes(b"\x7fELF")
    assert statuses(run_doctor(root, model=bundle))["library"] == "ok"

    other = make_root(tmp_path / "rk3568", model="Radxa ROCK 3A", compatible=["radxa,rock3a", "rockchip,rk3568"],
                      ram_gb=8, driver="0.9.8", runtime=None)
    assert statuses(run_doctor(other, model=bundle))["model.platform"] == "fail"

    (bundle / "head.rknn").unlink()
    broken = run_doctor(root, model=bundle)
    assert statuses(broken)["model"] == "fail" and "head.rknn" in broken.render()


def test_doctor_and_plan_share_one_memory_rule(tmp_path, monkeypatch):
    """The board's verdict and the host's come from rkedge.fit: moving its threshold moves both."""
    from types import SimpleNamespace

    from rkedge import fit
    from rkedge.convert.plan import ram_verdict

    root = make_root(tmp_path, model="Radxa ROCK 5B", compatible=["radxa,rock-5b", "rockchip,rk3588"], ram_gb=8,
                     driver="0.9.8", runtime=("1.2.1", "1.2.2"))
    models = tmp_path / "models"
    models.mkdir()
    model = write_vendor_like_model(models, toolkit="1.2.2", weight_gb=5.0)  # ~5.4 GiB with the runtime's share
    prediction = SimpleNamespace(total_bytes=int(5.4 * GIB), weight_bytes=int(1.0 * GIB))
    assert statuses(run_doctor(root, model=model))["model.memory"] == "ok"
    assert ram_verdict(prediction, 8).verdict == "fits"
    monkeypatch.setattr(fit, "COMFORT_SHARE", 0.5)
    assert statuses(run_doctor(root, model=model))["model.memory"] == "warn"
    assert ram_verdict(prediction, 8).verdict == "tight"
