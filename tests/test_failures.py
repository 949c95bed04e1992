"""The failure catalogue (rkedge.failures): one record type, one scan, and the simulators held to its texts."""

from __future__ import annotations

import ast
import codecs
import re
import string
from pathlib import Path

import pytest

from rkedge import failures
from rkedge.failures import CATALOGUE_ENTRIES, KnownFailure, plan_rules, refused_architecture, scan

ROOT = Path(__file__).resolve().parents[1]
MOCK_C = ROOT / "runtime" / "mock" / "rkllm_mock.c"
SIMULATED_TOOLKIT = ROOT / "convert" / "toolkit" / "simulated" / "rkllm" / "api.py"

#: A value for each variable part of the catalogue's texts, shaped like what the tools print.
SAMPLES = {"stamp": "08:23:51.447", "size": "232128512", "asked": "8192", "limit": "4096", "chars": "\ufffd\u0314",
           "wanted": "0.9.7", "platform": "rk3588", "dtype": "w4a16_g128", "arch": "Gemma3ForCausalLM", "a": "2048",
           "b": "4096", "rope": "{'factor': 8.0, 'rope_type': 'llama3'}", "type": "MOSTLY_Q8_0",
           "what": "something else", "text": "the dataset is empty"}

#: Texts the simulated NPU prints that name no failure mode of the catalogue: the runtime's generic follow-up
#: lines, and argument errors of the simulated API itself. A new E/W text in rkllm_mock.c must match a runtime
#: entry or be listed here.
MOCK_TEXTS_WITHOUT_A_FAILURE_MODE = {
    "E rkllm: rkllm_init failed", "rknn_init fail! ret=-1", "E RKNN: [08:23:51.447] load model file error!",
    "E RKNN: [08:23:51.447] failed to allocate handle, ret: -1, errno: 14, errstr: Bad address",
    ": error: failed to load model 'x'", "E rkllm: failed to load model 'x'", "E rkllm: model_path is NULL",
    "E rkllm: prompt is NULL", "E rkllm: a run is already in progress on this handle",
    "E rkllm: unsupported input_type 123", "E rkllm: lora adapter 'x' is not loaded",
    "E rkllm: failed to save prompt cache to x", "E rkllm: x path is NULL", "E rkllm: failed to open x file x",
    "E rkllm: invalid x file x", "E rkllm: the x x was made for another model",
    "E rkllm: the input of 123 tokens plus 123 cached tokens exceeds max_context_len 123",
}


def sample_line(entry: KnownFailure) -> str:
    fields = {name for _, name, _, _ in string.Formatter().parse(entry.text or "") if name}
    values = {name: SAMPLES[name] for name in fields if name != "id"}
    if "id" in fields:
        values["id"] = entry.id if entry.id != "*" else "some.new-id"
    return entry.render(**values)


# --- the records ---------------------------------------------------------------------------------------------

def test_every_entry_is_complete_and_sourced() -> None:
    keys = [e.key for e in CATALOGUE_ENTRIES]
    assert len(keys) == len(set(keys))
    for entry in CATALOGUE_ENTRIES:
        assert entry.id and entry.message and entry.source, entry.key
        assert entry.severity in ("error", "warning", "info")
        if entry.where == "plan":
            assert entry.pattern is None and entry.applies is not None and entry.kind is not None, entry.key
        else:
            assert entry.regex is not None and entry.kind is None, entry.key
    assert {e.where for e in CATALOGUE_ENTRIES} >= {"toolkit", "runtime", "plan"}


@pytest.mark.parametrize("entry", [e for e in CATALOGUE_ENTRIES if e.text is not None], ids=lambda e: e.key)
def test_each_text_is_recognised_as_its_own_entry(entry: KnownFailure) -> None:
    """What the tool prints (and the simulators print) is matched by the entry's pattern, and no earlier entry of
    the catalogue shadows it."""
    line = sample_line(entry)
    assert entry.regex is not None and entry.regex.search(line), (entry.key, line)
    found = scan(["noise", line], entry.where)
    assert [m.failure.key for m in found] == [entry.key], line


def test_a_runtime_text_lives_in_one_python_file() -> None:
    """The runtime's failure texts are written once, in the catalogue (tests may quote them)."""
    sources = _python_sources()
    for entry in (e for e in CATALOGUE_ENTRIES if e.where == "runtime" and e.text):
        words = max(re.split(r"\{\w+\}", entry.text), key=len)  # the longest fixed part
        holders = sorted(str(p.relative_to(ROOT)) for p in sources if words in p.read_text(encoding="utf-8"))
        assert holders == ["rkedge/failures.py"], (entry.key, words, holders)
    f7 = "must be less than the model's max_context_limit"
    assert [str(p.relative_to(ROOT)) for p in sources if f7 in p.read_text(encoding="utf-8")] == ["rkedge/failures.py"]


def _python_sources() -> list[Path]:
    folders = [ROOT / name for name in ("convert", "runtime", "lora", "boards", "scripts", "benchmarks")]
    return sorted({*(ROOT / "rkedge").glob("*.py"), *(p for folder in folders for p in folder.rglob("*.py"))})


# --- scan ------------------------------------------------------------------------------------------------------

def test_scan_keeps_log_order_drops_duplicates_and_generic_entries() -> None:
    log = ["INFO: Setting max_context_limit to 4096", "ERROR: Catch exception when loading model: bitsandbytes",
           "ERROR: Catch exception when loading model: bitsandbytes", "Load model failed!"]
    assert [(m.id, m.severity) for m in scan(log, "toolkit")] == [("F-7", "info"), ("F-9", "error")]
    generic_only = scan(["INFO: Setting max_context_limit to 2048", "Load model failed!"], "toolkit")
    assert [m.id for m in generic_only] == ["F-7", "toolkit.load-failed"]  # nothing specific failed: kept
    assert "2048" in generic_only[0].message


def test_scan_reads_only_the_texts_of_where() -> None:
    line = "E rkllm: max_context[8192] must be less than the model's max_context_limit[4096]"
    runtime = scan(line, "runtime")
    assert [m.failure.key for m in runtime] == ["runtime.F-7"]
    assert runtime[0].fix == "use --max-context 4096 or less, or reconvert with a larger --max-context (at most 16384)"
    assert [m.failure.key for m in scan(line, "toolkit")] == ["toolkit.F-7.above-limit"]
    assert scan("ERROR: Not support Gemma3ForCausalLM!", "runtime") == []
    assert scan(line, "plan") == [] and scan("", "runtime") == []


def test_simulated_toolkit_texts_carry_their_id() -> None:
    text = failures.simulated_toolkit_text("toolkit.argument", "device must be 'cpu' or 'cuda', not 'npu' {x}")
    (match,) = scan(text, "toolkit")
    assert (match.id, match.message) == ("toolkit.argument", "device must be 'cpu' or 'cuda', not 'npu' {x}")
    assert match.fix and match.failure.simulated
    (unknown,) = scan(failures.simulated_toolkit_text("toolkit.brand-new", "said"), "toolkit")
    assert (unknown.id, unknown.fix) == ("toolkit.brand-new", None)


def test_a_runtime_init_log_is_scanned_in_order_and_its_first_error_found() -> None:
    log = ("I rkllm: rkllm-runtime version: 1.2.1\nW rkllm: Warning: Your rknpu driver version is too low, please "
           "upgrade to 0.9.7.\nE RKNN: [08:23:51.447] failed to malloc npu memory, size: 232128512, flags: 0x2\n")
    found = scan(log, "runtime")
    assert [(m.failure.id, m.failure.severity) for m in found] == [("F-5", "warning"), ("F-1", "error")]
    error = failures.first_error(log, "runtime")
    assert error is not None and "232128512" in error.summary and "base_domain_id=1" in (error.fix or "")


# --- plan rules ----------------------------------------------------------------------------------------------

def test_plan_rules_apply_to_what_they_say() -> None:
    gemma2 = {"architecture": "Gemma2ForCausalLM", "platform": "rk3588", "toolkit_version": "1.1.1"}
    assert [r.key for r in plan_rules("board-failure", **gemma2, dtype="w8a8_g128", hybrid_rate=0.0)] == \
        ["plan.F-1.gemma2-rk3588-1.1"]
    assert plan_rules("board-failure", **gemma2, dtype="w8a8", hybrid_rate=0.0) == []  # plain w8a8 works
    assert plan_rules("board-failure", **gemma2, dtype="w8a8", hybrid_rate=0.5) != []
    assert plan_rules("board-failure", **{**gemma2, "toolkit_version": "1.2.0"}, dtype="w8a8_g128", hybrid_rate=0) == []
    assert plan_rules("board-failure", **{**gemma2, "platform": "rk3576"}, dtype="w8a8_g128", hybrid_rate=0) == []
    rope = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert [r.key for r in plan_rules("config", toolkit_version="1.0.2", config=rope)] == ["plan.F-8.llama3-rope"]
    assert plan_rules("config", toolkit_version="1.1.0", config=rope) == []
    assert plan_rules("config", toolkit_version="1.0.2", config={"rope_scaling": None}) == []


def test_refused_architectures_by_class_or_model_type() -> None:
    recurrent = refused_architecture("RecurrentGemmaForCausalLM", "recurrent_gemma")
    assert recurrent is not None and recurrent.alternatives == ("rknn backend",)
    assert refused_architecture(None, "recurrent_gemma") is recurrent
    assert refused_architecture("Gemma3ForCausalLM", "gemma3") is None  # a named class wins over model_type
    assert refused_architecture(None, "gemma3") is not None


def test_no_other_module_holds_catalogue_data() -> None:
    from rkedge.convert import architectures
    from rkedge.convert.toolkit import known_errors

    for module in (known_errors, architectures):
        tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
        built = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "KnownFailure"]
        assert built == [], f"{module.__name__} builds catalogue entries"


# --- the simulators ------------------------------------------------------------------------------------------

def c_texts(source: str) -> list[str]:
    """The lines the C simulator prints with ``diag(...)`` / ``rknn_error(...)``, variable parts filled in."""
    texts = []
    call = re.compile(r'\b(diag|rknn_error)\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)')
    for function, literals in call.findall(source):
        raw = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', literals))
        text = codecs.escape_decode(raw.encode())[0].decode("utf-8", "replace")
        if text.startswith("E RKNN: [%02d"):
            continue  # rknn_error's own wrapper
        text = re.sub(r"%(?:ll|l|z)?[du]", "123", text).replace("%s", "x").replace("%g", "1.5")
        texts.append(("E RKNN: [08:23:51.447] " if function == "rknn_error" else "") + text)
    return texts


def mock_drift(source: str) -> tuple[list[str], list[str]]:
    """(texts the C simulator prints that the catalogue does not know, entries it claims but does not print)."""
    texts = c_texts(source)
    unknown = [t for t in texts if t[:2] in ("E ", "W ", ": ", "rk")
               and "[rkedge simulator]" not in t and not scan(t, "runtime")
               and t not in MOCK_TEXTS_WITHOUT_A_FAILURE_MODE]
    missing = [e.key for e in failures.entries("runtime") if "simulated-npu" in e.reproduced_by
               and e.regex is not None and not any(e.regex.search(t) for t in texts)]
    return unknown, missing


def test_the_simulated_npu_prints_the_catalogue_texts() -> None:
    source = MOCK_C.read_text(encoding="utf-8")
    assert any("max_context[123] must be less than" in t for t in c_texts(source)), "the extraction works"
    unknown, missing = mock_drift(source)
    assert unknown == [], "rkllm_mock.c prints runtime texts the catalogue does not know"
    assert missing == [], "catalogue entries claimed by the simulated NPU that rkllm_mock.c does not print"
    # ... and a reworded text is caught both ways.
    reworded = source.replace("must be less than the model's", "must not exceed the model's")
    assert mock_drift(reworded) == (["E rkllm: max_context[123] must not exceed the model's max_context_limit[123]"],
                                    ["runtime.F-7"])


def test_the_simulated_toolkit_takes_its_vendor_texts_from_the_catalogue() -> None:
    source = SIMULATED_TOOLKIT.read_text(encoding="utf-8")
    for entry in (e for e in failures.entries("toolkit") if "simulated-toolkit" in e.reproduced_by):
        assert f'"{entry.key}"' in source, f"{entry.key} is claimed but not printed by the simulated toolkit"
        words = max(re.split(r"\{\w+\}", entry.text or ""), key=len)
        assert words not in source, f"the simulated toolkit spells {entry.key}'s text itself"
