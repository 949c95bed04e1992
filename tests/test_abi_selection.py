"""Choosing the struct set for a library: explicit, by version marker, by symbols; never guessing."""

from __future__ import annotations

import ctypes
import json
import struct
import subprocess
from pathlib import Path

import pytest

from rkedge.errors import AbiSelectionError
from rkedge.runtime import abi as abi_registry
from rkedge.runtime._elf import elf_machine, exported_functions
from rkedge.runtime.abi._native import NativeLibrary
from rkedge.runtime.library import detect_abi, resolve_library
from rkedge.runtime.mock import build_mock_library

BASE = {"rkllm_createDefaultParam", "rkllm_init", "rkllm_load_lora", "rkllm_load_prompt_cache",
        "rkllm_release_prompt_cache", "rkllm_destroy", "rkllm_run", "rkllm_run_async", "rkllm_abort",
        "rkllm_is_running"}
V120 = BASE | {"rkllm_clear_kv_cache", "rkllm_set_chat_template"}
V121 = V120 | {"rkllm_get_kv_cache_size", "rkllm_set_function_tools", "rkllm_set_cross_attn_params"}
EXPECTED_EXPORTS = {"1.1": BASE, "1.2.0": V120, "1.2.1": V121, "1.2.3": V121, "1.3.0": V121, "1.3.1": V121}
SAME_SYMBOLS = ("1.2.1", "1.2.3", "1.3.0", "1.3.1")


@pytest.mark.parametrize("abi", list(EXPECTED_EXPORTS))
def test_each_mock_build_exports_exactly_its_abi(abi):
    path = build_mock_library(abi)
    assert exported_functions(path) == EXPECTED_EXPORTS[abi]
    assert exported_functions(path) == {f.name for f in abi_registry.for_version(abi).FUNCTIONS}
    assert elf_machine(path) in ("x86_64", "aarch64")


@pytest.mark.parametrize(("release", "abi"), [("1.1.0", "1.1"), ("1.1.4", "1.1"), ("1.2.0", "1.2.0"),
                                             ("1.2.1", "1.2.1"), ("1.2.2", "1.2.1"), ("1.2.3", "1.2.3"),
                                             ("1.3.0", "1.3.0"), ("1.3.1", "1.3.1"), ("v1.2.2", "1.2.1")])
def test_release_to_abi(release, abi):
    assert abi_registry.normalize(release) == abi
    assert abi_registry.for_version(release).ABI == abi


@pytest.mark.parametrize("version", ["1.0.1", "1.2.1b1", "2.0", "banana"])
def test_unsupported_versions_are_refused(version):
    with pytest.raises(AbiSelectionError):
        abi_registry.for_version(version)


@pytest.mark.parametrize(("abi", "release"), [("1.2.1", "1.2.1"), ("1.2.1", "1.2.2"), ("1.2.3", "1.2.3"),
                                              ("1.3.0", "1.3.0"), ("1.3.1", "1.3.1"), ("1.1", "1.1.2")])
def test_detected_from_the_version_marker(abi, release):
    path = build_mock_library(abi, runtime_version=release)
    detection = detect_abi(path)
    assert (detection.abi, detection.runtime_version) == (abi, release)
    chosen = resolve_library(path)
    assert (chosen.abi, chosen.simulated) == (abi, True)
    assert "version marker 'RKLLM SDK (version: " + release in chosen.selected_by


@pytest.mark.parametrize("abi", ["1.1", "1.2.0"])
def test_detected_from_symbols_when_there_is_no_version_string(abi):
    path = build_mock_library(abi, embed_version_string=False)
    detection = detect_abi(path)
    assert detection.abi == abi and detection.runtime_version is None
    assert resolve_library(path).abi == abi


@pytest.mark.parametrize("abi", SAME_SYMBOLS)
def test_newer_abis_are_never_guessed_from_symbols(abi):
    path = build_mock_library(abi, embed_version_string=False)
    assert detect_abi(path).candidates == SAME_SYMBOLS
    with pytest.raises(AbiSelectionError) as caught:
        resolve_library(path)
    assert "--abi" in caught.value.fix
    assert resolve_library(path, abi=abi).abi == abi


def test_an_explicit_abi_that_contradicts_the_library_is_refused():
    with pytest.raises(AbiSelectionError, match="wrong struct set"):
        resolve_library(build_mock_library("1.3.0"), abi="1.2.2")
    with pytest.raises(AbiSelectionError):
        resolve_library(build_mock_library("1.1", embed_version_string=False), abi="1.3.0")
    with pytest.raises(AbiSelectionError):
        resolve_library(build_mock_library("1.2.3", embed_version_string=False), abi="1.2.0")


def test_the_abi_environment_variable(monkeypatch):
    path = build_mock_library("1.2.3", embed_version_string=False)
    monkeypatch.setenv("RKEDGE_RKLLM_ABI", "1.2.3")
    chosen = resolve_library(path)
    assert chosen.abi == "1.2.3" and chosen.selected_by == "$RKEDGE_RKLLM_ABI"
    assert resolve_library(path, abi="1.2.3").selected_by == "abi argument"


def test_a_library_is_bound_to_one_abi_per_process(tmp_path):
    path = tmp_path / "librkllmrt.so"
    path.write_bytes(build_mock_library("1.2.1", embed_version_string=False).read_bytes())
    NativeLibrary.load(path, "1.2.1")
    assert NativeLibrary.load(path, "1.2.2").abi.ABI == "1.2.1"  # same ABI, same binding
    with pytest.raises(AbiSelectionError, match="already loaded"):
        NativeLibrary.load(path, "1.3.0")


def test_not_a_runtime_library(tmp_path):
    from rkedge.errors import InputError

    not_elf = tmp_path / "x.so"
    not_elf.write_bytes(b"hello")
    with pytest.raises(InputError, match="not an ELF"):
        detect_abi(not_elf)
    truncated = tmp_path / "t.so"
    truncated.write_bytes(build_mock_library("1.3.1").read_bytes()[:40])
    with pytest.raises(InputError, match="truncated"):
        detect_abi(truncated)
    cut = tmp_path / "cut.so"
    cut.write_bytes(build_mock_library("1.3.1").read_bytes()[:4096])  # headers point past the end
    with pytest.raises(InputError, match="not a readable ELF"):
        detect_abi(cut)
    from rkedge.errors import LibraryNotFoundError

    with pytest.raises(LibraryNotFoundError):
        resolve_library(tmp_path / "missing.so")


def test_library_module_cli_reports_detection(capsys):
    from rkedge.runtime.library import _main

    assert _main([str(build_mock_library("1.2.0", embed_version_string=False))]) == 0
    out = capsys.readouterr().out
    assert '"abi": "1.2.0"' in out and '"simulated": true' in out


# -- stand-ins for vendor libraries: the symbols of an ABI and a version marker, nothing else ---------------------

def build_stub(tmp_path: Path, symbols: set[str], *strings: str, name: str = "librkllmrt.so",
               ldflags: tuple[str, ...] = ()) -> Path:
    """A shared library exporting ``symbols`` (empty functions) and carrying ``strings`` in its data, built with
    the simulated NPU's compiler. It is only ever read, never loaded."""
    from rkedge.runtime.mock import find_compiler

    lines = [f'__attribute__((visibility("default"))) int {symbol}(void) {{ return 0; }}' for symbol in sorted(symbols)]
    lines += [f"__attribute__((used)) static const char marker_{i}[] = {json.dumps(text)};"
              for i, text in enumerate(strings)]
    source = tmp_path / f"{name}.c"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / name
    argv = [*find_compiler().split(), "-shared", "-fPIC", "-fvisibility=hidden", *ldflags, "-o", str(out), str(source)]
    subprocess.run(argv, check=True, capture_output=True)
    return out


def sdk_marker(release: str) -> str:
    """The marker's form, per ABI.md "Version marker" (the build field's hash and date are made up here)."""
    return f"RKLLM SDK (version: {release} | target: Linux | build: 0123abcd 2026-09-01 10:00:00)"


def test_a_1_3_1_library_is_detected_from_its_marker_without_abi(tmp_path):
    stub = build_stub(tmp_path, V121, sdk_marker("1.3.1"))
    detection = detect_abi(stub)
    assert (detection.runtime_version, detection.abi, detection.candidates) == ("1.3.1", "1.3.1", ("1.3.1",))
    assert detection.marker == sdk_marker("1.3.1") and detection.simulated is False
    chosen = resolve_library(stub)
    assert (chosen.abi, chosen.runtime_version, chosen.simulated) == ("1.3.1", "1.3.1", False)
    assert "RKLLM SDK (version: 1.3.1" in chosen.selected_by
    assert resolve_library(stub, abi="1.3.1").abi == "1.3.1"
    with pytest.raises(AbiSelectionError, match="wrong struct set"):
        resolve_library(stub, abi="1.3.0")  # same symbols, but the marker says 1.3.1: 48 bytes short


@pytest.mark.parametrize(("release", "abi", "symbols"), [("1.2.2", "1.2.1", V121), ("1.2.1", "1.2.1", V121),
                                                        ("1.2.3", "1.2.3", V121), ("1.3.0", "1.3.0", V121),
                                                        ("1.2.0", "1.2.0", V120), ("1.1.4", "1.1", BASE)])
def test_the_release_in_the_marker_maps_to_its_abi(tmp_path, release, abi, symbols):
    detection = detect_abi(build_stub(tmp_path, symbols, sdk_marker(release)))
    assert (detection.runtime_version, detection.abi) == (release, abi)


def test_the_rknn_llm_lib_version_string_counts_when_a_release_follows_it(tmp_path):
    stub = build_stub(tmp_path, V121, "rknn llm lib version: 1.2.2", name="a.so")
    assert (detect_abi(stub).runtime_version, detect_abi(stub).abi) == ("1.2.2", "1.2.1")
    # As a printf format (like the init log's "rkllm-runtime version: %s") it carries no release.
    formats = build_stub(tmp_path, V121, "rknn llm lib version: %s", "I rkllm: rkllm-runtime version: %s", name="b.so")
    detection = detect_abi(formats)
    assert (detection.abi, detection.runtime_version, detection.candidates) == (None, None, SAME_SYMBOLS)
    assert "no version marker" in detection.evidence


def test_the_old_log_line_text_is_not_taken_for_a_marker(tmp_path):
    stub = build_stub(tmp_path, V121, "rkllm-runtime version: 1.2.2")  # never next to the version in a real file
    assert detect_abi(stub).abi is None


def test_an_unknown_newer_release_falls_back_to_symbols_and_asks_for_abi(tmp_path):
    stub = build_stub(tmp_path, V121, sdk_marker("1.4.0"))
    detection = detect_abi(stub)
    assert (detection.abi, detection.runtime_version, detection.candidates) == (None, "1.4.0", SAME_SYMBOLS)
    assert "does not know" in detection.evidence
    with pytest.raises(AbiSelectionError) as caught:
        resolve_library(stub)
    assert "--abi" in caught.value.fix and "1.3.1" in caught.value.fix
    assert resolve_library(stub, abi="1.3.1").abi == "1.3.1"  # the user's word, within what the symbols allow


def test_contradicting_markers_settle_nothing(tmp_path):
    stub = build_stub(tmp_path, V121, sdk_marker("1.3.0"), "rknn llm lib version: 1.3.1")
    detection = detect_abi(stub)
    assert (detection.abi, detection.runtime_version, detection.candidates) == (None, None, SAME_SYMBOLS)
    assert "1.3.0 and 1.3.1" in detection.evidence


def test_a_marker_the_symbols_contradict_is_not_trusted(tmp_path):
    stub = build_stub(tmp_path, V120, sdk_marker("1.3.1"))  # 1.2.0's functions only
    detection = detect_abi(stub)
    assert (detection.abi, detection.candidates) == (None, ("1.2.0",))
    with pytest.raises(AbiSelectionError):
        resolve_library(stub)
    with pytest.raises(AbiSelectionError):
        resolve_library(stub, abi="1.3.1")


def test_a_marker_of_an_unsupported_release_is_refused(tmp_path):
    with pytest.raises(AbiSelectionError, match="1.0.x"):
        detect_abi(build_stub(tmp_path, BASE, sdk_marker("1.0.2")))


@pytest.mark.parametrize("hash_style", ["gnu", "sysv"])
def test_a_library_without_section_headers_is_read_through_pt_dynamic(tmp_path, hash_style):
    stub = build_stub(tmp_path, V121, sdk_marker("1.3.1"), ldflags=(f"-Wl,--hash-style={hash_style}",))
    data = bytearray(stub.read_bytes())
    assert data[4:6] == b"\x02\x01", "a 64-bit little-endian build"
    struct.pack_into("<Q", data, 0x28, 0)  # e_shoff
    struct.pack_into("<HHH", data, 0x3A, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx: what sstrip leaves
    stripped = tmp_path / "stripped.so"
    stripped.write_bytes(bytes(data))
    assert exported_functions(stripped) == V121
    assert detect_abi(stripped).abi == "1.3.1"


# -- the simulated NPU goes through the same detection ----------------------------------------------------------

@pytest.mark.parametrize("abi", list(abi_registry.SUPPORTED_ABIS))
def test_the_mock_carries_the_real_marker_and_is_detected_like_a_vendor_file(abi):
    path = build_mock_library(abi)
    release = abi_registry.newest_release(abi)
    assert sdk_marker(release).split(" | build:")[0].encode() in path.read_bytes()
    chosen = resolve_library("mock", abi)
    assert (chosen.path, chosen.abi, chosen.runtime_version, chosen.simulated) == (path, abi, release, True)
    assert detect_abi(path).candidates == (abi,)


def test_the_default_mock_abi_is_read_from_the_file():
    from rkedge.runtime.mock import DEFAULT_MOCK_ABI

    chosen = resolve_library("mock")
    assert chosen.abi == DEFAULT_MOCK_ABI
    assert f"RKLLM SDK (version: {abi_registry.newest_release(DEFAULT_MOCK_ABI)}" in chosen.selected_by


def test_the_mock_path_refuses_a_build_its_marker_contradicts(monkeypatch):
    from rkedge.runtime import mock

    monkeypatch.setattr(mock, "build_mock_library", lambda abi=None, **_: build_mock_library("1.3.0"))
    with pytest.raises(AbiSelectionError, match="wrong struct set"):
        resolve_library("mock", "1.3.1")
    monkeypatch.setattr(mock, "build_mock_library",
                        lambda abi=None, **_: build_mock_library("1.3.1", embed_version_string=False))
    with pytest.raises(AbiSelectionError, match="does not guess"):
        resolve_library("mock")


@pytest.mark.parametrize("abi", list(abi_registry.SUPPORTED_ABIS))
def test_a_run_passes_the_input_struct_of_the_library_abi(abi, tmp_path):
    """On 1.3.1 the runtime reads a 208-byte RKLLMInput (ABI.md, "Hazard"): a 1.3.0-shaped one would leave it
    reading 48 bytes past the allocation."""
    from types import SimpleNamespace

    from rkedge.runtime.abi._native import NativeModel
    from rkedge.runtime.simmodel import simulated_manifest, write_simulated_model
    from rkedge.runtime.types import InitParams, RunRequest

    model = tmp_path / "m.rkllm"
    write_simulated_model(model, simulated_manifest(toolkit_version=abi_registry.newest_release(abi)))
    library = NativeLibrary.load(resolve_library("mock", abi).path, abi)
    sizes: list[int] = []
    real_run = library.fn.rkllm_run

    def recording_run(handle, rkllm_input, infer, userdata):
        sizes.append(ctypes.sizeof(rkllm_input._obj))  # byref() keeps the object it points at
        return real_run(handle, rkllm_input, infer, userdata)

    native = NativeModel(library, str(model), InitParams(max_new_tokens=2), lambda run_id, event: 0)
    try:
        native.library = SimpleNamespace(fn=SimpleNamespace(**{**vars(library.fn), "rkllm_run": recording_run}))
        assert native.run(1, RunRequest(prompt=b"hi")) == 0
    finally:
        native.library = library
        native.destroy()
    expected = {"1.1": 32, "1.2.0": 32, "1.2.1": 64, "1.2.3": 64, "1.3.0": 160, "1.3.1": 208}[abi]  # ABI.md
    assert sizes == [expected]


def test_library_module_cli_prints_release_abi_and_evidence(tmp_path, capsys):
    from rkedge.runtime.library import _main

    assert _main([str(build_stub(tmp_path, V121, sdk_marker("1.3.1")))]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["release"], report["abi"], report["simulated"]) == ("1.3.1", "1.3.1", False)
    assert "RKLLM SDK (version: 1.3.1" in report["evidence"] and report["machine"] in ("x86_64", "aarch64")
    with pytest.raises(SystemExit) as caught:
        _main(["--help"])
    assert caught.value.code == 0 and "LIB.so" in capsys.readouterr().out
    assert _main([str(tmp_path / "missing.so")]) != 0
