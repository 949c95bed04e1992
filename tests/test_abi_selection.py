"""Choosing the struct set for a library: explicit, by version string, by symbols; never guessing."""

from __future__ import annotations

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
EXPECTED_EXPORTS = {"1.1": BASE, "1.2.0": V120, "1.2.1": V121, "1.2.3": V121, "1.3.0": V121}


@pytest.mark.parametrize("abi", list(EXPECTED_EXPORTS))
def test_each_mock_build_exports_exactly_its_abi(abi):
    path = build_mock_library(abi)
    assert exported_functions(path) == EXPECTED_EXPORTS[abi]
    assert exported_functions(path) == {f.name for f in abi_registry.for_version(abi).FUNCTIONS}
    assert elf_machine(path) in ("x86_64", "aarch64")


@pytest.mark.parametrize(("release", "abi"), [("1.1.0", "1.1"), ("1.1.4", "1.1"), ("1.2.0", "1.2.0"),
                                             ("1.2.1", "1.2.1"), ("1.2.2", "1.2.1"), ("1.2.3", "1.2.3"),
                                             ("1.3.0", "1.3.0"), ("v1.2.2", "1.2.1")])
def test_release_to_abi(release, abi):
    assert abi_registry.normalize(release) == abi
    assert abi_registry.for_version(release).ABI == abi


@pytest.mark.parametrize("version", ["1.0.1", "1.2.1b1", "2.0", "banana"])
def test_unsupported_versions_are_refused(version):
    with pytest.raises(AbiSelectionError):
        abi_registry.for_version(version)


@pytest.mark.parametrize(("abi", "release"), [("1.2.1", "1.2.1"), ("1.2.1", "1.2.2"), ("1.2.3", "1.2.3"),
                                              ("1.3.0", "1.3.0"), ("1.1", "1.1.2")])
def test_detected_from_the_version_string(abi, release):
    path = build_mock_library(abi, runtime_version=release)
    detection = detect_abi(path)
    assert (detection.abi, detection.runtime_version) == (abi, release)
    chosen = resolve_library(path)
    assert (chosen.abi, chosen.simulated) == (abi, True)
    assert "version string" in chosen.selected_by


@pytest.mark.parametrize("abi", ["1.1", "1.2.0"])
def test_detected_from_symbols_when_there_is_no_version_string(abi):
    path = build_mock_library(abi, embed_version_string=False)
    detection = detect_abi(path)
    assert detection.abi == abi and detection.runtime_version is None
    assert resolve_library(path).abi == abi


@pytest.mark.parametrize("abi", ["1.2.1", "1.2.3", "1.3.0"])
def test_newer_abis_are_never_guessed_from_symbols(abi):
    path = build_mock_library(abi, embed_version_string=False)
    assert detect_abi(path).candidates == ("1.2.1", "1.2.3", "1.3.0")
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
    from rkedge.errors import LibraryNotFoundError

    with pytest.raises(LibraryNotFoundError):
        resolve_library(tmp_path / "missing.so")


def test_library_module_cli_reports_detection(capsys):
    from rkedge.runtime.library import _main

    assert _main([str(build_mock_library("1.2.0", embed_version_string=False))]) == 0
    out = capsys.readouterr().out
    assert '"abi": "1.2.0"' in out and '"simulated": true' in out
