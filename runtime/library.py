"""Finding ``librkllmrt.so`` and selecting the ABI to call it with.

Order (style lesson 3): an explicit ABI (``abi=`` / ``--abi`` / ``$RKEDGE_RKLLM_ABI``), else the version marker
inside the library file (``RKLLM SDK (version: X.Y.Z | target: Linux | build: ...)``, ABI.md "Version marker"),
mapped to its ABI through the registry's release table, else its exported symbols. Symbols separate 1.1, 1.2.0
and ">= 1.2.1"; 1.2.1, 1.2.3, 1.3.0 and 1.3.1 export the same set, so between them rkedge never guesses: it stops
and says how to pass ``--abi``. An explicit ABI that contradicts the file is refused too: a struct set is never
paired with a library of another ABI. The simulated NPU (``library="mock"``) carries the same marker and goes
through the same detection.

The file is read once per detection: the marker, the symbol table, the machine and the simulated-NPU magic all
come from the same bytes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from rkedge.errors import AbiSelectionError, InputError, LibraryNotFoundError
from rkedge.modelfile import SIMULATED_MODEL_MAGIC
from rkedge.runtime import abi as abi_registry
from rkedge.runtime._elf import elf_machine, exported_functions

ENV_LIBRARY = "RKEDGE_RKLLM_LIB"
ENV_ABI = "RKEDGE_RKLLM_ABI"
DEFAULT_SEARCH = (
    "/usr/lib/librkllmrt.so",
    "/usr/local/lib/librkllmrt.so",
    "/usr/lib/aarch64-linux-gnu/librkllmrt.so",
    "/lib/librkllmrt.so",
)
_VERSION = rb"v?(\d+\.\d+\.\d+(?:b\d+)?)"
#: The marker real libraries carry (reported for 1.2.0 and 1.3.1 builds); the pattern public tools read it with
#: (oRKLLM, src/pool.js:154-163), plus the rest of the marker up to its ")" for the evidence.
_SDK_MARKER_RE = re.compile(rb"RKLLM SDK \(version:\s*" + _VERSION + rb"[^)\x00\n]{0,160}\)?")
#: Some builds also carry "rknn llm lib version: ". Whether the release follows it inside the file is UNKNOWN
#: (it may be a format string, like the init log's "rkllm-runtime version: %s"): it counts only when one does.
_LIB_MARKER_RE = re.compile(rb"rknn llm lib version:\s*" + _VERSION)
#: The marker every simulated-NPU build carries (the magic of the models it loads).
_SIMULATED_MARKER = SIMULATED_MODEL_MAGIC.rstrip(b"\n")


@dataclass(frozen=True)
class AbiDetection:
    """What a library file says about itself. ``abi`` is None when the file cannot decide between
    ``candidates``; ``runtime_version`` is the release its version marker names (None without one)."""

    abi: str | None
    runtime_version: str | None
    evidence: str
    candidates: tuple[str, ...]
    marker: str | None = None  # the version marker as found in the file
    machine: str | None = None
    simulated: bool = False


@dataclass(frozen=True)
class RuntimeLibrary:
    path: Path
    abi: str
    runtime_version: str | None
    selected_by: str
    simulated: bool


@cache
def _function_names(abi: str) -> frozenset[str]:
    return frozenset(func.name for func in abi_registry.for_version(abi).FUNCTIONS)


def _same_symbols_as(abi: str) -> tuple[str, ...]:
    """The ABIs whose libraries export exactly ``abi``'s functions (symbols cannot tell them apart)."""
    return tuple(other for other in abi_registry.SUPPORTED_ABIS if _function_names(other) == _function_names(abi))


def _by_symbols(symbols: set[str], path: str | Path) -> tuple[str | None, tuple[str, ...], str]:
    """(abi or None, candidates, evidence) from the exported function names alone."""
    if not {"rkllm_init", "rkllm_run"} <= symbols:
        raise InputError(f"{path} does not export rkllm_init/rkllm_run: it is not librkllmrt.so.",
                         fix="point --lib at Rockchip's librkllmrt.so")
    if "rkllm_set_function_tools" in symbols:
        return None, _same_symbols_as("1.2.1"), "exported symbols (rkllm_set_function_tools: ABI >= 1.2.1)"
    if "rkllm_set_chat_template" in symbols:
        return "1.2.0", ("1.2.0",), "exported symbols (rkllm_set_chat_template, no function tools)"
    return "1.1", ("1.1",), "exported symbols (no rkllm_clear_kv_cache or rkllm_set_chat_template)"


def _markers(data: bytes) -> list[tuple[str, str]]:
    """(release, marker text) for every version marker in the file."""
    return [(m.group(1).decode(), m.group(0).decode("ascii", "replace"))
            for pattern in (_SDK_MARKER_RE, _LIB_MARKER_RE) for m in pattern.finditer(data)]


def detect_abi(path: str | Path) -> AbiDetection:
    """What the file itself says about its ABI, without loading it.

    Raises:
        InputError: the file is not an ELF library exporting rkllm_init/rkllm_run.
        AbiSelectionError: its marker names a release rkedge knows to be unsupported (1.0.x, 1.2.1b1).
        LibraryNotFoundError: the file cannot be read.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LibraryNotFoundError(f"cannot read {path}: {exc.strerror or exc}",
                                   fix="check the path and its permissions") from exc
    symbols = exported_functions(data, str(path))
    machine, simulated = elf_machine(data), _SIMULATED_MARKER in data
    by_symbols, candidates, symbol_evidence = _by_symbols(symbols, path)

    def detection(abi: str | None, release: str | None, evidence: str, marker: str | None = None,
                  allowed: tuple[str, ...] = candidates) -> AbiDetection:
        return AbiDetection(abi, release, evidence, allowed, marker, machine, simulated)

    markers = _markers(data)
    releases = sorted({release for release, _ in markers})
    if not releases:
        return detection(by_symbols, None, symbol_evidence + "; no version marker in the file")
    if len(releases) > 1:
        return detection(by_symbols, None, f"version markers of releases {' and '.join(releases)} in the file "
                         f"contradict each other, so only the {symbol_evidence} count")
    release = releases[0]
    marker = next(text for found, text in markers if found == release)
    abi = abi_registry.abi_of(release)
    if abi is None:
        return detection(by_symbols, release, f"version marker '{marker}' names release {release}, which this "
                         f"rkedge does not know, so only the {symbol_evidence} count", marker)
    if abi not in candidates:
        return detection(None, release, f"version marker '{marker}' names ABI {abi}, but the {symbol_evidence} "
                         f"say ABI {' or '.join(candidates)}", marker)
    return detection(abi, release, f"version marker '{marker}' in the file (release {release} = ABI {abi})",
                     marker, (abi,))


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
    """True for a simulated-NPU build (it carries the magic of the models it loads)."""
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
        from rkedge.runtime.mock import DEFAULT_MOCK_ABI, build_mock_library

        # The build for the requested ABI, then the same detection as a vendor file: its marker must agree.
        path = build_mock_library(abi_registry.normalize(explicit) if explicit else DEFAULT_MOCK_ABI)
    else:
        path = find_library(library)
    return select_abi(path, detect_abi(path), explicit, source)


def _releases_of(abis: tuple[str, ...]) -> str:
    return ", ".join(release for abi in abis for release in abi_registry.ABI_RELEASES[abi])


def select_abi(path: Path, detection: AbiDetection, explicit: str | None, source: str | None) -> RuntimeLibrary:
    """The ABI to call ``path`` with: ``explicit`` when the file allows it, else what the file says; an
    :class:`AbiSelectionError` when they disagree or the file cannot tell."""
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
        return RuntimeLibrary(path, name, detection.runtime_version, source or "abi argument", detection.simulated)
    if detection.abi is None:
        candidates = detection.candidates
        raise AbiSelectionError(
            f"{path} exports the functions of ABI {', '.join(candidates)} (runtime {_releases_of(candidates)}), "
            f"whose struct layouts differ but whose symbols are identical, and its version marker does not settle "
            f"it ({detection.evidence}). rkedge does not guess between them.",
            fix=f"pass --abi with the release you installed ({_releases_of(candidates)}), or set RKEDGE_RKLLM_ABI; "
            "the runtime prints it at init as 'rkllm-runtime version: X'",
        )
    return RuntimeLibrary(path, detection.abi, detection.runtime_version, detection.evidence, detection.simulated)


def _main(argv: list[str] | None = None) -> int:
    """``python -m rkedge.runtime.library LIB.so``: what the file says about its release and ABI, as JSON."""
    import argparse
    import json
    import sys

    from rkedge.errors import RkedgeError

    parser = argparse.ArgumentParser(
        prog="python -m rkedge.runtime.library",
        description="Report what a librkllmrt.so says about itself, without loading it: the runtime release from "
        "its version marker, the ABI rkedge would call it with, and the evidence (JSON on stdout). Exit 0 when the "
        "file was read, even if its ABI is undecided (\"abi\": null: pass --abi when using it).",
    )
    parser.add_argument("library", metavar="LIB.so", help="path of the runtime library")
    args = parser.parse_args(argv)
    try:
        detection = detect_abi(args.library)
    except RkedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    report = {"path": args.library, "machine": detection.machine, "release": detection.runtime_version,
              "abi": detection.abi, "evidence": detection.evidence, "candidates": list(detection.candidates),
              "marker": detection.marker, "simulated": detection.simulated,
              "runtime_version": detection.runtime_version}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
