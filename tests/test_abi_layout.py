"""Every ctypes struct of every ABI against shared/rkllm-abi/ABI.md (via tests/data/abi_layouts.json)."""

from __future__ import annotations

import ctypes
import importlib.util
import json
from pathlib import Path

import pytest

from rkedge.runtime import abi as abi_registry

DATA = Path(__file__).parent / "data" / "abi_layouts.json"
LAYOUTS: dict[str, dict[str, dict]] = json.loads(DATA.read_text())
ABI_MD = Path(__file__).resolve().parents[2] / "shared" / "rkllm-abi" / "ABI.md"


def flatten(struct: type, base: int = 0) -> dict[str, tuple[int, int]]:
    """Absolute offset and size of every member, nested members included (by their own name)."""
    out: dict[str, tuple[int, int]] = {}
    for name, ctype, *_ in struct._fields_:
        field = getattr(struct, name)
        out.setdefault(name, (base + field.offset, field.size))
        if isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union)) and not name.startswith("reserved"):
            for inner, value in flatten(ctype, base + field.offset).items():
                out.setdefault(inner, value)
    return out


CASES = [(abi, name) for abi, structs in LAYOUTS.items() for name in structs]


@pytest.mark.parametrize(("abi", "struct_name"), CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_struct_layout_matches_abi_md(abi: str, struct_name: str) -> None:
    module = abi_registry.for_version(abi)
    struct = getattr(module, struct_name)
    expected = LAYOUTS[abi][struct_name]
    assert ctypes.sizeof(struct) == expected["sizeof"], f"sizeof({struct_name})"
    members = flatten(struct)
    for field, (offset, size) in {**expected["fields"], **expected["nested"]}.items():
        assert field in members, f"{struct_name}.{field} is missing"
        assert members[field] == (offset, size), f"{struct_name}.{field}: (offset, size)"
    top_level = {name for name, *_ in struct._fields_ if not name.startswith("_")}
    nested_blocks = {"extend_param", "image", "video", "audio"}  # ABI.md lists their members, not the blocks
    assert top_level == set(expected["fields"]) | (nested_blocks & top_level), \
        f"{struct_name} declares fields ABI.md does not list"


def test_every_abi_declares_every_documented_struct() -> None:
    for abi, structs in LAYOUTS.items():
        module = abi_registry.for_version(abi)
        declared = {s.__name__ for s in module.STRUCTS} | {n for n in dir(module) if n.startswith("RKLLM")}
        assert set(structs) <= declared, f"ABI {abi} lacks {set(structs) - declared}"


def test_layout_data_is_current_with_abi_md() -> None:
    if not ABI_MD.exists():
        pytest.skip("shared/rkllm-abi/ABI.md is not beside this checkout")
    spec = importlib.util.spec_from_file_location("extract", Path(__file__).parents[1] / "scripts" / "extract_abi_layouts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.extract(ABI_MD.read_text(encoding="utf-8")) == LAYOUTS


@pytest.mark.parametrize("abi", list(abi_registry.SUPPORTED_ABIS))
def test_callback_and_function_signatures(abi: str) -> None:
    module = abi_registry.for_version(abi)
    callback_restype = module.LLMResultCallback._restype_
    assert callback_restype is (ctypes.c_int if module.FEATURES.callback_returns_int else None)
    functions = {f.name: f for f in module.FUNCTIONS}
    init_last = functions["rkllm_init"].argtypes[-1]
    if module.FEATURES.init_takes_callback_struct:
        assert init_last._type_ is module.RKLLMCallback  # RKLLMCallback*
    else:
        assert init_last is module.LLMResultCallback  # a bare function pointer
    assert functions["rkllm_createDefaultParam"].restype is module.RKLLMParam  # returned by value
    clear = functions.get("rkllm_clear_kv_cache")
    assert (len(clear.argtypes) if clear else 0) == module.FEATURES.clear_kv_cache_arity
    for func in module.FUNCTIONS:
        assert func.restype is not None, f"{func.name} has an explicit restype"
    for name in ("rkllm_run", "rkllm_run_async"):  # the input passed is this ABI's own RKLLMInput*
        assert functions[name].argtypes[1]._type_ is module.RKLLMInput, name


def test_abi_1_3_1_is_1_3_0_plus_audio() -> None:
    """ABI.md "ABI 1.3.1": only the multimodal input (and so the input union) changes; everything else is 1.3.0's."""
    old, new = abi_registry.for_version("1.3.0"), abi_registry.for_version("1.3.1")
    assert (ctypes.sizeof(old.RKLLMInput), ctypes.sizeof(new.RKLLMInput)) == (160, 208)
    assert (ctypes.sizeof(old.RKLLMMultiModalInput), ctypes.sizeof(new.RKLLMMultiModalInput)) == (144, 192)
    assert new.RKLLMMultiModalInput.audio.offset == 144
    changed = {"RKLLMMultiModalInput", "RKLLMInput"}
    assert {s.__name__ for s in new.STRUCTS} == {s.__name__ for s in old.STRUCTS}
    for struct in new.STRUCTS:
        if struct.__name__ not in changed:
            assert struct is getattr(old, struct.__name__), f"{struct.__name__} is 1.3.0's declaration, reused"
    assert [(f.name, len(f.argtypes)) for f in new.FUNCTIONS] == [(f.name, len(f.argtypes)) for f in old.FUNCTIONS]
    assert new.FEATURES.has_audio_input and not old.FEATURES.has_audio_input
    assert new.RUNTIME_RELEASES == ("1.3.1",) and abi_registry.normalize("1.3.1") == "1.3.1"


def test_enums_per_abi() -> None:
    assert abi_registry.for_version("1.1").LLMCallState.RKLLM_RUN_GET_LAST_HIDDEN_LAYER == 4
    assert not hasattr(abi_registry.for_version("1.2.0").LLMCallState, "RKLLM_RUN_GET_LAST_HIDDEN_LAYER")
    assert not hasattr(abi_registry.for_version("1.1").RKLLMInferMode, "RKLLM_INFER_GET_LOGITS")
    assert abi_registry.for_version("1.3.0").RKLLMInferMode.RKLLM_INFER_GET_LOGITS == 2
