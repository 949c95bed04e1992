"""Finding ``librkllmrt.so`` and selecting the ABI to call it with.

Order (style lesson 3): an explicit ABI (``abi=`` / ``--abi`` / ``$RKEDGE_RKLLM_ABI``), else the version
string inside the library file, else its exported symbols. Symbols separate 1.1, 1.2.0 and ">= 1.2.1";
1.2.1, 1.2.3 and 1.3.0 export the same set, so between them rkedge never guesses: it stops and says how
to pass ``--abi``. An explicit ABI that contradicts the file is refused too: a struct set is never paired
with a library of another ABI.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from rkedge.errors import AbiSelectionError, InputError, LibraryNotFoundError
from rkedge.runtime import abi as abi_registry
from rkedge.runtime._elf import exported_functions

ENV_LIBRARY = "RKEDGE_RKLLM_LIB"
ENV_ABI = "RKEDGE_RKLLM_ABI"
DEFAULT_SEARCH = (
    "/usr/lib/librkllmrt.so",
    "/usr/local/lib/librkllmrt.so",
    "/usr/lib/aarch64-linux-gnu/librkllmrt.so",
    "/lib/librkllmrt.so",
)
#: A version inside the file, as "rkllm-runtime version: 1.2.2". Real libraries may not carry it in this form
#: (UNKNOWN: only the init log line is documented), hence the symbol fallback.
_VERSION_RE = re.compile(rb"rkllm[-_ ]runtime[-_ ]version[:=]?\s*v?(\d+\.\d+\.\d+(?:b\d+)?)", re.IGNORECASE)
#: The marker every simulated-NPU build carries (the magic of the models it loads).
_SIMULATED_MARKER = b"RKEDGE-SIMULATED-RKLLM-MODEL/1"
_AMBIGUOUS = ("1.2.1", "1.2.3", "1.3.0")


@dataclass(frozen=True)
class AbiDetection:
    abi: str | None
    runtime_version: str | None
    evidence: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class RuntimeLibrary:
    path: Path
    abi: str
    runtime_version: str | None
    selected_by: str
    simulated: bool


def detect_abi(path: str | Path) -> AbiDetection:
    """What the file itself says about its ABI, without loading it."""
    data = Path(path).read_bytes()
    versions = sorted({m.group(1).decode() for m in _VERSION_RE.finditer(data)})
    if len(versions) == 1:
        version = versions[0]
        return AbiDetection(abi_registry.normalize(version), version,
                            f"version string 'rkllm-runtime version: {version}' in the file", (abi_registry.normalize(version),))
    symbols = exported_functions(path)
    if not {"rkllm_init", "rkllm_run"} <= symbols:
        raise InputError(f"{path} does not export rkllm_init/rkllm_run: it is not librkllmrt.so.",
                         fix="point --lib at Rockchip's librkllmrt.so")
    if "rkllm_set_function_tools" in symbols:
        return AbiDetection(None, None, "exported symbols (rkllm_set_function_tools: ABI >= 1.2.1)", _AMBIGUOUS)
    if "rkllm_set_chat_template" in symbols:
        return AbiDetection("1.2.0", None, "exported symbols (rkllm_set_chat_template, no function tools)", ("1.2.0",))
    return AbiDetection("1.1", None, "exported symbols (no rkllm_clear_kv_cache or rkllm_set_chat_template)", ("1.1",))


def find_library(explicit: str | os.PathLike[str] | None = None, *, root: Path | None = None) -> Path:
    """The library path: the argument, else ``$RKEDGE_RKLLM_LIB``, else the usual install locations (below
    ``root`` when given: doctor reads a board's file tree there; ``$LD_LIBRARY_PATH`` is this machine's, so it is
    searched only without a root)."""
    tried: list[str] = []
    for candidate in (explicit, os.environ.get(ENV_LIBRARY)):
        if candidate:
            path = Path(candidate)
            if path.is_file():
                return path
            tried.append(str(path))
            raise LibraryNotFoundError(f"runtime library not found: {path}",
                                       fix="check the path, or use --mock for the simulated NPU")
    if root is None:
        search = list(DEFAULT_SEARCH)
        for directory in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")):
            search.insert(0, os.path.join(directory, "librkllmrt.so"))
    else:
        search = [str(root / p.lstrip("/")) for p in DEFAULT_SEARCH]
    for candidate in search:
        tried.append(candidate)
        if os.path.isfile(candidate):
            return Path(candidate)
    raise LibraryNotFoundError(
        f"librkllmrt.so was not found (tried: {', '.join(tried)}).",
        fix="install it with scripts/install-runtime.sh, pass --lib PATH (or set RKEDGE_RKLLM_LIB), "
        "or use --mock to run on the simulated NPU",
    )


def is_simulated_library(path: str | Path) -> bool:
    return _SIMULATED_MARKER in Path(path).read_bytes()


def resolve_library(library: str | os.PathLike[str] | None = None, abi: str | None = None) -> RuntimeLibrary:
    """Finds the library and selects its ABI.

    Args:
        library: a path, ``"mock"`` for the simulated NPU, or None to search.
        abi: an ABI name or runtime release; overrides ``$RKEDGE_RKLLM_ABI``.
    """
    explicit = abi or os.environ.get(ENV_ABI) or None
    source = "abi argument" if abi else (f"${ENV_ABI}" if explicit else None)
    if library == "mock":
        from rkedge.runtime.mock import DEFAULT_MOCK_ABI, DEFAULT_RUNTIME_VERSION, build_mock_library

        name = abi_registry.normalize(explicit) if explicit else DEFAULT_MOCK_ABI
        return RuntimeLibrary(build_mock_library(name), name, DEFAULT_RUNTIME_VERSION[name],
                              source or "simulated NPU default", True)
    path = find_library(library)
    return select_abi(path, detect_abi(path), explicit, source)


def select_abi(path: Path, detection: AbiDetection, explicit: str | None, source: str | None) -> RuntimeLibrary:
    """The ABI to call ``path`` with: ``explicit`` when the file allows it, else what the file says; an
    :class:`AbiSelectionError` when they disagree or the file cannot tell."""
    simulated = is_simulated_library(path)
    if explicit:
        name = abi_registry.normalize(explicit)
        if name not in detection.candidates:
            raise AbiSelectionError(
                f"{path} is ABI {' or '.join(detection.candidates)} by its {detection.evidence}, "
                f"but ABI {name} was requested ({source}). Calling it through the wrong struct set would "
                "corrupt memory.",
                fix=f"drop --abi, or pass --abi {detection.candidates[0]}" if len(detection.candidates) == 1
                else f"pass one of: {', '.join(detection.candidates)}",
            )
        return RuntimeLibrary(path, name, detection.runtime_version, source or "abi argument", simulated)
    if detection.abi is None:
        raise AbiSelectionError(
            f"{path} exports the functions of ABI 1.2.1 (runtime 1.2.1/1.2.2), 1.2.3 and 1.3.0, whose struct "
            "layouts differ but whose symbols are identical, and it carries no version string. rkedge does not "
            "guess between them.",
            fix="pass --abi 1.2.1, 1.2.2, 1.2.3 or 1.3.0 (or set RKEDGE_RKLLM_ABI) to the release you installed; "
            "the runtime prints it at init as 'rkllm-runtime version: X'",
        )
    return RuntimeLibrary(path, detection.abi, detection.runtime_version, detection.evidence, simulated)


def _main(argv: list[str]) -> int:
    """``python -m rkedge.runtime.library PATH``: what the file says about its ABI (used by install scripts)."""
    import json
    import sys

    from rkedge.errors import RkedgeError
    from rkedge.runtime._elf import elf_machine

    if len(argv) != 1:
        print("usage: python -m rkedge.runtime.library PATH", file=sys.stderr)
        return 2
    try:
        detection = detect_abi(argv[0])
        report = {"path": argv[0], "machine": elf_machine(argv[0]), "abi": detection.abi,
                  "runtime_version": detection.runtime_version, "evidence": detection.evidence,
                  "candidates": list(detection.candidates), "simulated": is_simulated_library(argv[0])}
    except RkedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
