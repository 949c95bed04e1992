"""The simulated NPU: C source for a stand-in ``librkllmrt.so`` of each ABI, built on demand.

:func:`build_mock_library` compiles ``rkllm_mock.c`` with the system C compiler into one shared library per
ABI version and caches it by a hash of the sources, flags and compiler (``~/.cache/rkedge/mock``). The result
exports exactly that ABI's functions (``-fvisibility=hidden`` plus explicit exports), carries its layouts
(static assertions against ``shared/rkllm-abi/ABI.md`` sizes) and the version marker real libraries carry
(``RKLLM SDK (version: X.Y.Z | target: Linux | build: ...)``), so ABI detection reads it like a vendor file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from rkedge.errors import InputError, LibraryNotFoundError
from rkedge.runtime.abi import SUPPORTED_ABIS, newest_release

#: ABI name -> the RKEDGE_ABI code the C source is compiled with ("1.1" -> 110, "1.3.1" -> 131).
ABI_CODES: dict[str, int] = {abi: int("".join(abi.split(".")).ljust(3, "0")) for abi in SUPPORTED_ABIS}
#: The runtime release each build reports by default (the newest release of that ABI, from the registry).
DEFAULT_RUNTIME_VERSION: dict[str, str] = {abi: newest_release(abi) for abi in SUPPORTED_ABIS}
#: The ABI ``--mock`` uses when none is given.
DEFAULT_MOCK_ABI = "1.3.0"
SOURCES = ("rkllm_mock.c", "rkllm_abi.h", "json_mini.h")
CFLAGS = ("-std=c11", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread")


def cache_root() -> Path:
    """``$RKEDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/rkedge``, else ``~/.cache/rkedge``."""
    explicit = os.environ.get("RKEDGE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rkedge"


def source_text() -> dict[str, bytes]:
    package = resources.files(__name__)
    return {name: package.joinpath(name).read_bytes() for name in SOURCES}


def find_compiler(cc: str | None = None) -> str:
    """The C compiler: ``cc`` argument, else ``$CC``, else ``cc``/``gcc``/``clang`` on PATH."""
    candidates = [cc] if cc else ([os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"])
    for candidate in candidates:
        argv0 = candidate.split()[0]
        if shutil.which(argv0):
            return candidate
    raise LibraryNotFoundError(
        "the simulated NPU is built from C source on demand, and no C compiler was found "
        f"(tried {', '.join(candidates)}).",
        fix="install a C compiler (Debian/Ubuntu: apt install gcc) or set CC",
    )


def build_mock_library(
    abi: str = DEFAULT_MOCK_ABI,
    *,
    runtime_version: str | None = None,
    embed_version_string: bool = True,
    cc: str | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Builds (or reuses) the simulated ``librkllmrt.so`` for one ABI and returns its path.

    Args:
        abi: an ABI name (``1.1``, ``1.2.0``, ``1.2.1``, ``1.2.3``, ``1.3.0``, ``1.3.1``).
        runtime_version: the release the library reports (default: the newest release of the ABI).
        embed_version_string: False leaves out the ``RKLLM SDK (version: ...)`` marker, to simulate a library
            that carries none (ABI detection must then fall back on exported symbols).
        cc: the compiler command, e.g. ``aarch64-linux-gnu-gcc`` for a cross build.
        cache_dir: where builds are cached (default :func:`cache_root` / ``mock``).
    """
    if abi not in ABI_CODES:
        raise InputError(f"no simulated NPU for ABI {abi!r}.", fix=f"use one of {', '.join(ABI_CODES)}")
    version = runtime_version or DEFAULT_RUNTIME_VERSION[abi]
    compiler = find_compiler(cc)
    defines = [f"-DRKEDGE_ABI={ABI_CODES[abi]}", f'-DRKEDGE_RUNTIME_VERSION="{version}"']
    if not embed_version_string:
        defines.append("-DRKEDGE_NO_VERSION_STRING")
    sources = source_text()
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + sources[name])
    digest.update("\0".join((*CFLAGS, *defines, compiler, _compiler_identity(compiler))).encode())
    key = digest.hexdigest()[:20]
    out_dir = (cache_dir or cache_root() / "mock") / key
    target = out_dir / f"librkllmrt-sim-{abi}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rkedge-mock-") as work:
        for name, data in sources.items():
            Path(work, name).write_bytes(data)
        partial = out_dir / f".{target.name}.{os.getpid()}.part"
        argv = [*compiler.split(), *CFLAGS, *defines, "-o", str(partial), str(Path(work, "rkllm_mock.c")), "-lm"]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise LibraryNotFoundError(
                f"building the simulated NPU for ABI {abi} failed:\n{proc.stderr.strip()}",
                fix="check that the C compiler works (try: cc --version)",
            )
        os.replace(partial, target)  # atomic: concurrent builders race harmlessly
    return target


def _compiler_identity(compiler: str) -> str:
    try:
        proc = subprocess.run([*compiler.split(), "-dumpmachine"], capture_output=True, text=True, timeout=30)
        return proc.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


__all__ = ["ABI_CODES", "DEFAULT_MOCK_ABI", "DEFAULT_RUNTIME_VERSION", "build_mock_library", "cache_root"]
