#!/usr/bin/env python3
"""Runs the runtime's behavioural suite on aarch64: an arm64 CPython under qemu-user, the simulated NPU
cross-compiled for aarch64, every ABI (the suite's ``abi`` fixture reads them from the ABI registry).

Why: struct layouts are the same on x86_64 and aarch64, but calling conventions and undefined behaviour are
not; e.g. a ctypes callback that raises returns 0 to C on x86_64 and 1 on aarch64 ("pause" on ABI >= 1.2.1).

Steps: ``scripts/aarch64-env.sh`` (qemu-user, the cross compiler, Debian's arm64 python3.11 unpacked with
``dpkg -x``); a site folder with rkedge (laid out as installed) and pytest's pure-Python packages; then
``qemu-aarch64 -L ROOT python3.11 -m pytest`` with ``CC=aarch64-linux-gnu-gcc``, so the emulated tests build the
simulated NPU for aarch64 (the cross compiler runs natively).

Usage: ``run_aarch64_tests.py [TEST PATHS AND PYTEST OPTIONS]`` (default: the suite below); paths are relative to
the checkout, other arguments are passed to pytest as they are (e.g. ``-k abi1.3.1``).

Exit codes: the emulated pytest's, or 3 when the tools are not available (one line says which).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools" / "aarch64"
PACKAGE_DIRS = {"rkedge": "rkedge", "rkedge/convert": "convert", "rkedge/lora": "lora", "rkedge/runtime": "runtime",
                "rkedge/boards": "boards"}
PURE_PYTHON = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pytest_timeout", "py", "pygments", "jinja2",
               "markupsafe")
SUITE = ("tests/test_runtime_behaviour.py", "tests/test_abi_layout.py", "tests/test_abi_selection.py",
         "tests/test_mock_semantics.py", "tests/test_llm_features.py")


def build_site(site: Path) -> None:
    """rkedge as an installed package would lay it out, plus pytest and its pure-Python dependencies."""
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for target, source in PACKAGE_DIRS.items():
        for path in (ROOT / source).rglob("*"):
            if "__pycache__" in path.parts or path.is_dir():
                continue
            destination = site / target / path.relative_to(ROOT / source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
    for name in PURE_PYTHON:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, site / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, site / origin.name)


def _is_test_path(arg: str) -> bool:
    """A test file or folder of the checkout (``tests/x.py``, ``tests/x.py::test_y``), not a pytest option."""
    return not arg.startswith("-") and (ROOT / arg.split("::")[0]).exists()


def qemu() -> str | None:
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


def main(argv: list[str]) -> int:
    setup = subprocess.run(["bash", str(ROOT / "scripts" / "aarch64-env.sh")], capture_output=True, text=True)
    line = (setup.stdout.strip().splitlines() or [setup.stderr.strip()])[-1]
    if setup.returncode != 0 or not qemu():
        print(line or "aarch64: setup failed")
        return 3
    site = TOOLS / "site"
    build_site(site)
    python = TOOLS / "root" / "usr" / "bin" / "python3.11"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(site),
        "PYTHONDONTWRITEBYTECODE": "1",
        "CC": "aarch64-linux-gnu-gcc",
        "RKEDGE_CACHE_DIR": str(TOOLS / "cache"),
        "LANG": "C.UTF-8",
        "RKEDGE_EXPECT_MACHINE": "aarch64",
    }
    chosen = argv if any(_is_test_path(arg) for arg in argv) else [*SUITE, *argv]
    suite = [str(ROOT / arg) if _is_test_path(arg) else arg for arg in chosen]
    # Run from an empty folder: the checkout's own rkedge/ (the root package without its subpackages) must not
    # shadow the installed layout in the site folder.
    work = TOOLS / "work"
    work.mkdir(exist_ok=True)
    command = [qemu(), "-L", str(TOOLS / "root"), str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-p", "pytest_timeout", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-o", "addopts=-ra",
               *suite]
    print("aarch64: " + " ".join(command[3:]), flush=True)
    return subprocess.run(command, cwd=work, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
