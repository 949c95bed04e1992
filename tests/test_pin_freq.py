"""scripts/rk3588-pin-freq.sh on a fixture sysfs tree: pin to the maximum, then restore what was there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rk3588-pin-freq.sh"


def make_sysfs(root: Path) -> None:
    cpufreq = root / "sys/devices/system/cpu/cpufreq"
    for policy, freqs in (("policy0", "408000 1800000"), ("policy4", "408000 2400000"), ("policy6", "408000 2352000")):
        folder = cpufreq / policy
        folder.mkdir(parents=True)
        (folder / "scaling_governor").write_text("schedutil\n")
        (folder / "scaling_available_frequencies").write_text(freqs + "\n")
        (folder / "scaling_cur_freq").write_text("408000\n")
        (folder / "scaling_setspeed").write_text("<unsupported>\n")
    for node, freqs, governor in (("fdab0000.npu", "300000000 1000000000", "rknpu_ondemand"),
                                  ("dmc", "528000000 2112000000", "userspace")):
        folder = root / "sys/class/devfreq" / node
        (folder / "userspace").mkdir(parents=True)
        (folder / "governor").write_text(governor + "\n")
        (folder / "available_frequencies").write_text(freqs + "\n")
        (folder / "cur_freq").write_text("528000000\n")
        (folder / "userspace" / "set_freq").write_text("0\n")


def run(root: Path, state: Path, command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RKEDGE_SYSFS_ROOT": str(root), "RKEDGE_FREQ_STATE": str(state)}
    return subprocess.run(["sh", str(SCRIPT), command], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX sh")
def test_pin_then_restore(tmp_path):
    root, state = tmp_path / "root", tmp_path / "freq.state"
    make_sysfs(root)
    pinned = run(root, state, "pin")
    assert pinned.returncode == 0, pinned.stderr
    cpufreq = root / "sys/devices/system/cpu/cpufreq"
    assert all((cpufreq / p / "scaling_governor").read_text().strip() == "performance"
               for p in ("policy0", "policy4", "policy6"))
    npu, dmc = root / "sys/class/devfreq/fdab0000.npu", root / "sys/class/devfreq/dmc"
    assert (npu / "governor").read_text().strip() == "userspace"
    assert (npu / "userspace/set_freq").read_text().strip() == "1000000000"
    assert (dmc / "userspace/set_freq").read_text().strip() == "2112000000"
    saved = state.read_text()
    assert f"{cpufreq}/policy4/scaling_governor schedutil" in saved
    assert f"{dmc}/userspace/set_freq 528000000" in saved, "a userspace node's frequency is saved too"

    again = run(root, state, "pin")
    assert again.returncode == 0 and state.read_text() == saved, "a second pin keeps the first state"

    restored = run(root, state, "restore")
    assert restored.returncode == 0, restored.stderr
    assert (cpufreq / "policy0/scaling_governor").read_text().strip() == "schedutil"
    assert (npu / "governor").read_text().strip() == "rknpu_ondemand"
    assert (dmc / "governor").read_text().strip() == "userspace"
    assert (dmc / "userspace/set_freq").read_text().strip() == "528000000"
    assert not state.exists()
    status = run(root, state, "status")
    assert status.returncode == 0 and "policy0" in status.stdout
