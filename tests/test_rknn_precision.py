"""Quality-targeted mixed precision for the RKNN backend (rkedge.convert.rknn.precision) and its honest
defaults: the chooser on given measurements, plain-text calibration, the held-out split, the out-of-domain finding,
and real conversions of the tiny RecurrentGemma that reach the target by the automatic choice or report that
they are below it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rkedge.convert.rknn import precision as prec
from rkedge.convert.rknn.pipeline import RknnRequest, check, convert_rknn, quality_texts
from rkedge.convert.rknn.shape import GriffinShape
from rkedge.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/data/tiny-recurrentgemma"
HELD_OUT = ROOT / "tests/data/rknn/heldout.txt"
CALIBRATION_JSON = ROOT / "tests/data/rknn/calibration.json"

try:
    import rknn.api  # noqa: F401

    HAVE_SIMULATOR = True
except Exception:  # the toolkit is an optional, x86_64-only install
    HAVE_SIMULATOR = False
needs_simulator = pytest.mark.skipif(not HAVE_SIMULATOR, reason="rknn-toolkit2 is not installed")

TARGET = prec.QualityTarget()  # top-1 >= 95%, |NLL delta| <= 1%


# --- the target -------------------------------------------------------------------------------------------

def test_quality_target_syntax():
    assert prec.QualityTarget.parse(None) == TARGET == prec.QualityTarget(0.95, 1.0)
    assert prec.QualityTarget.parse("top1=0.97,nll=0.5") == prec.QualityTarget(0.97, 0.5)
    assert prec.QualityTarget.parse("top1=96") == prec.QualityTarget(0.96, 1.0), "a percentage is read as one"
    assert prec.QualityTarget.parse(" nll = 2 ") == prec.QualityTarget(0.95, 2.0)
    for bad in ("top1", "top5=0.9", "nll=abc", "top1=-1"):
        with pytest.raises(InputError):
            prec.QualityTarget.parse(bad)
    quality = {"top1_agreement": 0.94, "nll_delta_pct": -1.5, "kl_divergence": 0.01}
    assert not TARGET.met(quality), "|NLL delta| counts: a lower NLL than the float model is a deviation too"
    assert len(TARGET.shortfalls(quality)) == 2
    assert TARGET.distance(quality) == pytest.approx(1.0 + 0.5)


# --- the chooser on given measurements --------------------------------------------------------------------

def _part(name: str, weights: int, group: str = "mlp") -> prec.Part:
    return prec.Part(name, group, (0,), ("chunk0",), (f"^{name}$",), weights)


COSTS = prec.CostModel(base_bytes=1e6, bandwidth_gbs=10.0, total_weights=1_000_000)


def additive(effects: dict[str, tuple[float, float]], base: tuple[float, float] = (0.90, 0.010)):
    """A model whose quality is plain w8a8's plus each kept part's (top-1 gain, KL removed); NLL follows KL."""
    calls: list[list[str]] = []

    def evaluate(kept):
        calls.append(sorted(p.name for p in kept))
        top1 = base[0] + sum(effects[p.name][0] for p in kept)
        kl = max(0.0, base[1] - sum(effects[p.name][1] for p in kept))
        return {"top1_agreement": round(top1, 4), "nll_delta_pct": round(kl * 100, 3), "kl_divergence": kl}

    return evaluate, calls


def test_the_chooser_keeps_the_fewest_parts_that_reach_the_target():
    parts = [_part("a", 1000), _part("b", 1000), _part("c", 1000), _part("d", 1000)]
    # b and d together reach 95% and NLL <= 1%; a alone gains little, c nothing
    evaluate, calls = additive({"a": (0.01, 0.001), "b": (0.03, 0.004), "c": (0.0, 0.0), "d": (0.025, 0.003)})
    choice = prec.choose(parts, evaluate, TARGET, COSTS)
    assert choice.met and sorted(p.name for p in choice.chosen) == ["b", "d"]
    assert TARGET.met(choice.quality)
    assert calls[0] == [], "plain w8a8 first"
    assert calls[1:5] == [["a"], ["b"], ["c"], ["d"]], "then each part alone"
    assert choice.table[0]["variant"] == "plain w8a8" and len(choice.table) == len(calls)
    assert {"variant", "fp16_share", "top1_agreement", "nll_delta_pct", "kl_divergence", "tokens_per_s"} \
        <= set(choice.table[0])


def test_the_chooser_ranks_by_quality_per_predicted_millisecond():
    # "big" removes the most KL but costs 100x the bytes: two cheap parts reach the target for far less
    parts = [_part("big", 100_000), _part("small1", 1000), _part("small2", 1000)]
    evaluate, _ = additive({"big": (0.06, 0.006), "small1": (0.03, 0.0045), "small2": (0.03, 0.0045)})
    choice = prec.choose(parts, evaluate, TARGET, COSTS)
    assert choice.met and sorted(p.name for p in choice.chosen) == ["small1", "small2"]
    assert COSTS.tokens_per_s(choice.chosen) > COSTS.tokens_per_s([parts[0]])
    assert COSTS.fp16_share(choice.chosen) == pytest.approx(0.002)


def test_the_chooser_takes_the_cheapest_single_part_and_nothing_when_plain_w8a8_suffices():
    parts = [_part("big", 100_000), _part("small", 1000)]
    evaluate, _ = additive({"big": (0.06, 0.01), "small": (0.06, 0.01)})
    choice = prec.choose(parts, evaluate, TARGET, COSTS)
    assert [p.name for p in choice.chosen] == ["small"]
    evaluate, calls = additive({"big": (0.0, 0.0), "small": (0.0, 0.0)}, base=(0.99, 0.001))
    choice = prec.choose(parts, evaluate, TARGET, COSTS)
    assert choice.met and choice.chosen == [] and calls == [[]], "one run: plain w8a8 already meets it"


def test_an_unreachable_target_keeps_the_closest_variant_and_says_so():
    parts = [_part("a", 1000), _part("b", 2000)]
    evaluate, _ = additive({"a": (0.01, 0.001), "b": (0.01, 0.001)})
    choice = prec.choose(parts, evaluate, TARGET, COSTS)
    assert not choice.met
    assert sorted(p.name for p in choice.chosen) == ["a", "b"], "everything in fp16 came closest"
    assert choice.to_dict()["search_met"] is False
    finding = prec.below_target_finding(choice.quality, TARGET, dtype="w8a8", searched=True,
                                        calibration_given=False)
    assert finding is not None and finding.severity == "warning" and "below its quality target" in finding.message
    assert "--calibration" in (finding.fix or "") and "--dtype fp16" in (finding.fix or "")
    assert prec.below_target_finding({"top1_agreement": 0.99, "nll_delta_pct": 0.1}, TARGET, dtype="w8a8",
                                     searched=True, calibration_given=True) is None


def test_the_search_is_capped():
    parts = [_part(f"p{i}", 1000) for i in range(10)]
    evaluate, calls = additive({p.name: (0.001, 0.0001) for p in parts})
    choice = prec.choose(parts, evaluate, TARGET, COSTS, max_evaluations=5)
    assert len(calls) == 5 and not choice.met
    fine = prec.search_plan(parts, seconds_per_evaluation=10, budget_s=1000)
    assert fine.granularity == "layer" and fine.max_evaluations == 64
    groups = [prec.Part(f"L{i}.{g}", g, (i,), ("chunk0",), (f"^/blocks\\.{i}/{g}/",), 10) for i in range(26)
              for g in ("rg_lru", "mlp", "state")]
    coarse = prec.search_plan(groups, seconds_per_evaluation=300, budget_s=3600)
    assert coarse.granularity == "group" and [p.group for p in coarse.parts] == ["rg_lru", "mlp", "state"]
    assert coarse.parts[0].weights == 260 and len(coarse.parts[0].patterns) == 26
    assert prec.search_plan(groups, seconds_per_evaluation=1800, budget_s=3600).granularity == "none"


def test_parts_cover_each_layer_and_cost_what_they_add_to_a_decode_step():
    config = json.loads((TINY / "config.json").read_text())
    dims = GriffinShape.from_dict(config)
    parts = prec.layer_parts(dims, [prec.GraphLayers("chunk0", (0, 1)), prec.GraphLayers("chunk1", (2,))],
                             ["head0", "head1"])
    names = [p.name for p in parts]
    assert names == ["L0.rg_lru", "L0.conv1d", "L0.linear", "L0.mlp", "L0.state",
                     "L1.rg_lru", "L1.conv1d", "L1.linear", "L1.mlp", "L1.state",
                     "L2.attention", "L2.mlp", "L2.state", "head"]
    by_name = {p.name: p for p in parts}
    assert by_name["L2.attention"].patterns == (r"^/blocks\.0/(?!mlp/)",), "chunk-local block index"
    assert by_name["head"].graphs == ("head0", "head1") and by_name["head"].weights == dims.vocab * dims.hidden
    assert by_name["L2.state"].weights == 0 and by_name["L2.state"].state_elements == 2 * 63 * 32
    costs = prec.cost_model(dims)
    assert costs.ms(by_name["head"]) > costs.ms(by_name["L0.rg_lru"]) > 0
    assert costs.tokens_per_s([]) > costs.tokens_per_s(parts)
    by_graph = prec.patterns_by_graph([by_name["L0.state"], by_name["L2.mlp"]], ["chunk0", "chunk1", "head0"])
    assert by_graph["chunk0"] == list(by_name["L0.state"].patterns) and by_graph["chunk1"] == [r"^/blocks\.0/mlp/"]
    assert by_graph["head0"] == []
    import re

    assert any(re.search(p, "new_h0-rs") for p in by_name["L0.state"].patterns)
    assert not any(re.search(p, "new_h1-rs") for p in by_name["L0.state"].patterns)


def test_the_table_renders_every_variant_and_marks_the_choice():
    parts = [_part("a", 1000), _part("b", 1000)]
    evaluate, _ = additive({"a": (0.03, 0.005), "b": (0.03, 0.005)})
    choice = prec.choose(parts, evaluate, TARGET, COSTS)
    lines = prec.render_table(choice.table, [p.name for p in choice.chosen])
    assert lines[0].split()[:2] == ["variant", "fp16"] and len(lines) == len(choice.table) + 1
    assert sum(line.endswith(" *") for line in lines) >= 1


# --- calibration text, the held-out split, the out-of-domain finding ---------------------------------------

def test_plain_text_calibration_splits_into_prompts():
    text = "\n\n".join(f"paragraph {i} " + "word " * 30 for i in range(10)) + "\n\n" + "x" * 2000
    prompts = prec.text_prompts(text)
    assert all(0 < len(p) <= 2 * prec.TEXT_PROMPT_CHARS for p in prompts)
    assert "paragraph 0" in prompts[0] and "paragraph 1" in prompts[0], "short paragraphs are merged"
    assert sum(p.count("x") for p in prompts) == 2000, "a long paragraph is cut, not dropped"
    assert prec.text_prompts("\n\n \n") == []


def test_the_held_out_split_is_spread_and_disjoint():
    prompts = [f"p{i}" for i in range(16)]
    kept, held = prec.hold_out(prompts)
    assert len(held) == 3 and len(kept) == 13 and not set(kept) & set(held)
    assert held != prompts[-3:], "spread over the set, not its end"
    assert prec.hold_out(["only"]) == (["only"], [])


def test_quality_texts_hold_out_calibration_text(tmp_path):
    calibration = tmp_path / "calib.txt"
    calibration.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}\n" * 12 for i in range(10)))
    texts = quality_texts(RknnRequest(model=TINY, out=tmp_path, calibration=str(calibration)))
    assert texts.report_text == texts.search_text and "held out of" in texts.report_source
    assert all(line not in texts.calibration for line in texts.search_text.split("\n") if line in texts.calibration)
    held = set(texts.search_text.split("\n"))
    assert not any(prompt in held for prompt in texts.calibration)
    with_eval = quality_texts(RknnRequest(model=TINY, out=tmp_path, calibration=str(calibration),
                                          eval_text=HELD_OUT))
    assert with_eval.report_text == HELD_OUT.read_text() and "held out of" in with_eval.search_source
    assert with_eval.search_texts == [with_eval.search_text, HELD_OUT.read_text()], \
        "the search also reads the user's own text: a choice must hold on both"
    worst = prec.worst([{"top1_agreement": 0.97, "nll_delta_pct": 0.2, "kl_divergence": 0.01, "steps": 10},
                        {"top1_agreement": 0.94, "nll_delta_pct": -1.5, "kl_divergence": 0.03, "steps": 10}])
    assert (worst["top1_agreement"], worst["nll_delta_pct"], worst["kl_divergence"], worst["steps"]) == \
        (0.94, -1.5, 0.02, 20)
    builtin = quality_texts(RknnRequest(model=TINY, out=tmp_path))
    assert "built-in" in builtin.report_source and len(builtin.calibration) == 20


@needs_simulator
def test_a_model_without_chat_template_warns_about_builtin_prompts(tmp_path):
    def domain(request):
        return [f for f in check(request)[1] if f.id == "rknn.domain"]

    found = domain(RknnRequest(model=TINY, out=tmp_path))
    assert len(found) == 1 and found[0].severity == "warning"
    assert "chat prompts" in found[0].message and "English paragraph" in found[0].message
    assert "--calibration FILE.txt" in (found[0].fix or "")
    assert domain(RknnRequest(model=TINY, out=tmp_path, calibration=str(CALIBRATION_JSON))) == [], \
        "the report then reads text held out of the user's calibration set"
    assert "English" not in domain(RknnRequest(model=TINY, out=tmp_path, eval_text=HELD_OUT))[0].message
    assert domain(RknnRequest(model=TINY, out=tmp_path, dtype="fp16", eval_text=HELD_OUT)) == []
    bad = [f for f in check(RknnRequest(model=TINY, out=tmp_path, quality_target="top1=x"))[1]
           if f.id == "rknn.quality_target"]
    assert bad and bad[0].severity == "error"


# --- real conversions through the simulator -------------------------------------------------------------

def _calibration_txt(folder: Path, count: int | None = None) -> Path:
    """The fixture's in-domain calibration excerpts as a plain-text file, one paragraph each."""
    prompts = json.loads(CALIBRATION_JSON.read_text())[:count]
    path = folder / "calibration.txt"
    path.write_text("\n\n".join(p.replace("\n\n", "\n") for p in prompts) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def auto_bundle(tmp_path_factory) -> tuple[dict, list]:
    """w8a8 by the automatic choice, calibrated on a .txt file, no --eval-text: the report reads text held out of
    the calibration set."""
    import torch

    folder = tmp_path_factory.mktemp("rknn-auto")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the calibration's torch steps are tiny: two threads only spin on a busy host
    # op groups over all layers: about half the simulator runs of the per-layer search (the benchmark's)
    request = RknnRequest(model=TINY, out=folder, dtype="w8a8", calibration=str(_calibration_txt(folder)),
                          eval_steps=128, prefill_chunk=0, precision_granularity="group")
    try:
        result = convert_rknn(request)
    finally:
        torch.set_num_threads(threads)
    assert result.bundle is not None and result.manifest is not None
    return json.loads((result.bundle / "bundle.json").read_text()), result.findings


@needs_simulator
@pytest.mark.timeout(900)  # the fixture's conversion and search: ~2 minutes on an idle 2-core host
def test_the_automatic_choice_reaches_the_target_and_records_its_table(auto_bundle):
    manifest, findings = auto_bundle
    quality, precision = manifest["quality"], manifest["precision"]
    assert precision["mode"] == "auto" and precision["met"] is True and precision["granularity"] == "group"
    assert quality["top1_agreement"] >= 0.95 and abs(quality["nll_delta_pct"]) <= 1.0
    assert "held out of" in quality["text"] and precision["searched_on"] == quality["text"]
    assert precision["target"] == {"top1": 0.95, "nll_delta_pct": 1.0}
    table = precision["table"]
    assert table[0]["variant"] == "plain w8a8" and len(table) == precision["evaluations"] >= 2
    chosen_rows = [r for r in table if sorted(r["parts"]) == sorted(precision["chosen"])]
    assert chosen_rows and chosen_rows[0]["meets_target"], "the chosen set met the target in the search"
    if precision["chosen"]:
        assert table[0]["meets_target"] is False, "parts are kept in fp16 only when plain w8a8 misses the target"
    kept = {t for g in [*manifest["graphs"], *manifest["heads"]] for t in g["fp16_tensors"]}
    assert bool(kept) == bool(precision["chosen"]) == manifest["hybrid"]["enabled"]
    assert not [f for f in findings if f.id in ("rknn.quality_target", "rknn.domain")]


@needs_simulator
@pytest.mark.timeout(900)
def test_a_build_below_its_target_says_so_in_the_cli_card_and_manifest(tmp_path):
    import os
    import subprocess
    import sys

    calibration = _calibration_txt(tmp_path, count=5)
    proc = subprocess.run([sys.executable, "-m", "rkedge", "convert", str(TINY), "--backend", "rknn", "--dtype",
                           "w8a8", "--no-hybrid", "--out", str(tmp_path / "out"), "--calibration", str(calibration),
                           "--eval-steps", "48", "--prefill-chunk", "0", "--quality-target", "top1=0.999,nll=0.01"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # as the fixture above: no spinning threads
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "rknn.quality_target" in output and "below its quality target" in output
    bundle = next((tmp_path / "out").iterdir())
    manifest = json.loads((bundle / "bundle.json").read_text())
    precision = manifest["precision"]
    assert precision["mode"] == "plain" and precision["met"] is False
    assert precision["target"] == {"top1": 0.999, "nll_delta_pct": 0.01}
    assert precision["below_target"]["shortfalls"] and "fp16" in precision["below_target"]["try"]
    assert "below its quality target" in (bundle / "README.md").read_text()


def test_merged_parts_keep_each_layers_patterns_in_its_own_graph():
    dims = GriffinShape.from_dict(json.loads((TINY / "config.json").read_text()))
    parts = prec.layer_parts(dims, [prec.GraphLayers("chunk0", (0, 1)), prec.GraphLayers("chunk1", (2,))], [])
    attention = next(p for p in prec.group_parts(parts) if p.group == "attention")
    by_graph = prec.patterns_by_graph([attention], ["chunk0", "chunk1"])
    assert by_graph == {"chunk0": [], "chunk1": [r"^/blocks\.0/(?!mlp/)"]}, \
        "layer 2's block 0 in chunk1 is not layer 0's block 0 in chunk0"
    mlp = next(p for p in prec.group_parts(parts) if p.group == "mlp")
    assert prec.patterns_by_graph([mlp], ["chunk0", "chunk1"]) == {
        "chunk0": [r"^/blocks\.0/mlp/", r"^/blocks\.1/mlp/"], "chunk1": [r"^/blocks\.0/mlp/"]}


def test_a_search_over_its_budget_builds_the_fixed_set_and_says_so(tmp_path):
    from types import SimpleNamespace

    from rkedge.convert.rknn import pipeline

    dims = GriffinShape.from_dict(json.loads((TINY / "config.json").read_text()))
    specs = [SimpleNamespace(name="chunk0", layers=(0, 1, 2)), SimpleNamespace(name="head", layers=())]
    findings: list = []
    plan = pipeline._precision_plan(RknnRequest(model=TINY, out=tmp_path), dims, specs, 256, findings)
    assert plan is not None and plan.granularity == "layer" and not findings, "a tiny model searches per layer"
    assert [p.name for p in plan.parts][-1] == "head"
    no_head = pipeline._precision_plan(RknnRequest(model=TINY, out=tmp_path, head_dtype="fp16"), dims, specs, 256,
                                       findings)
    assert no_head is not None and "head" not in [p.name for p in no_head.parts], "an fp16 head is no part"
    tight = RknnRequest(model=TINY, out=tmp_path, precision_budget_s=20)
    assert pipeline._precision_plan(tight, dims, specs, 256, findings) is None
    assert [f.id for f in findings] == ["rknn.precision_search"] and "fixed set" in findings[0].message
    assert RknnRequest(model=TINY, out=tmp_path).auto_precision
    assert not RknnRequest(model=TINY, out=tmp_path, fp16_patterns=(r"/rg_lru/",)).auto_precision
    assert RknnRequest(model=TINY, out=tmp_path, fp16_patterns=(r"/rg_lru/",)).hybrid_patterns == [r"/rg_lru/"]
