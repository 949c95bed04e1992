"""The runtime's behavioural suite on aarch64, under qemu-user (see scripts/run_aarch64_tests.py).

Where qemu-user, the cross compiler or Debian's arm64 packages cannot be had, this test is reported as
skipped with the one line that says why; it never passes without having run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.aarch64
@pytest.mark.timeout(900)
def test_behavioural_suite_on_aarch64_under_emulation():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_aarch64_tests.py")], capture_output=True,
                            text=True, timeout=890)
    if result.returncode == 3:
        pytest.skip(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "aarch64 tools unavailable")
    tail = "\n".join(result.stdout.splitlines()[-25:])
    assert result.returncode == 0, f"aarch64 run failed:\n{tail}\n{result.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", result.stdout)
    skipped = re.search(r"(\d+) skipped", result.stdout)
    ran = int(passed.group(1)) if passed else 0
    # Every test the suite holds here (all ABIs of the registry) ran there: none lost to collection or filtering.
    assert ran + (int(skipped.group(1)) if skipped else 0) == collected_here(), tail
    assert ran >= 300, tail
    print(result.stdout.splitlines()[-1])


def collected_here() -> int:
    """How many tests the aarch64 suite collects on this machine (the same files, the same ABI list)."""
    from run_aarch64_tests import SUITE  # scripts/ is on pytest's pythonpath

    listing = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              *(str(ROOT / test) for test in SUITE)], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
    counted = re.search(r"(\d+) tests? collected", listing.stdout)
    assert counted, listing.stdout[-2000:]
    return int(counted.group(1))
