"""Everything imports on a machine with no .so, no toolkit and no torch; only the ABI package uses ctypes."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from rkedge.runtime.server import WEB_MODULES

ROOT = Path(__file__).resolve().parents[1]


def all_modules() -> list[str]:
    """Every module of the package, found as Python finds it (the layout has no remap to copy here)."""
    import pkgutil

    import rkedge

    def fail(name: str) -> None:
        raise AssertionError(f"package {name} does not import")  # else walk_packages silently skips it

    names = ["rkedge"] + [info.name for info in pkgutil.walk_packages(rkedge.__path__, "rkedge.", onerror=fail)]
    return sorted(set(names))


#: Modules that exist to drive a heavy package; nothing imports them at module level: the FastAPI app, and the
#: RKNN backend's torch graphs (host) and numpy decode loop (loaded when an RKNN bundle is opened).
HEAVY_BY_DESIGN = {"rkedge.convert.rknn.decode_step", "rkedge.convert.rknn.torch_graphs",
                   "rkedge.convert.rknn.quality", "rkedge.runtime.rknn.loop", "rkedge.runtime.rknn.engine",
                   *WEB_MODULES}


def test_every_module_imports_without_heavy_packages():
    code = (
        "import sys, importlib\n"
        f"names = {sorted(set(all_modules()) - HEAVY_BY_DESIGN)!r}\n"
        "for name in names:\n"
        "    if name.endswith('__main__'): continue\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch','transformers','peft','numpy','safetensors','fastapi','uvicorn','onnx','jinja2'})\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported at module level: {result.stdout}"


def test_only_the_abi_package_imports_ctypes():
    offenders = []
    for folder in (ROOT / "rkedge", ROOT / "convert", ROOT / "runtime", ROOT / "lora", ROOT / "boards"):
        for path in folder.glob("*.py") if folder.name == "rkedge" else folder.rglob("*.py"):
            if "abi" in path.relative_to(ROOT).parts:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n.split(".")[0] == "ctypes" for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


@pytest.mark.slow
def test_runtime_imports_in_a_venv_with_only_the_base_install(tmp_path):
    env_dir = tmp_path / "base-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert install.returncode == 0, install.stderr[-2000:]
    frozen = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout.lower()
    assert "torch" not in frozen and "numpy" not in frozen
    check = subprocess.run([str(python), "-c", "import rkedge.runtime; from rkedge.runtime import LLM; print('ok')"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr
    help_run = subprocess.run([str(env_dir / "bin" / "rkedge"), "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0, help_run.stderr
