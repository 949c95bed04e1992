"""The RKNN backend (RecurrentGemma through rknn-toolkit2): export, verification, quantization, quality, runtime.

Runs on the tiny RecurrentGemma trained by scripts/train_tiny_recurrentgemma.py (tests/data/tiny-recurrentgemma,
byte-level, trained on Python source). Its quality is measured on in-domain held-out text (tests/data/rknn).
The simulator tests need rknn-toolkit2 (installed by `make venv` through scripts/install-rknn-toolkit2.sh on
x86_64 with CPython <= 3.12) and skip, saying so, where it has no wheel.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
np = pytest.importorskip("numpy")

from rknn_helpers import BYTE_OFFSET, CALIBRATION, HELD_OUT, TINY, held_out_tokens, needs_simulator  # noqa: E402

from rkedge.convert.rknn import pipeline  # noqa: E402
from rkedge.convert.rknn.build_worker import edit_cfg, hybrid_keys  # noqa: E402
from rkedge.convert.rknn.decode_step import plan_chunks, plan_head_rows  # noqa: E402
from rkedge.convert.rknn.pipeline import RknnRequest, convert_rknn  # noqa: E402
from rkedge.convert.rknn.quality import compare  # noqa: E402
from rkedge.convert.rknn.shape import GriffinShape, bfloat16_round  # noqa: E402
from rkedge.convert.rknn.torch_graphs import torch_loop, verify_against_transformers  # noqa: E402
from rkedge.errors import InputError, ModelFileError, ToolkitError  # noqa: E402
from rkedge.runtime import LLM  # noqa: E402
from rkedge.runtime.rknn.engine import _sample  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()


# --- the decode step against transformers (no toolkit needed) ----------------------------------------------

@pytest.mark.parametrize("max_params", [None, 20_000], ids=["one-graph", "graph-per-layer-and-split-head"])
def test_decode_step_reproduces_transformers_through_the_window_wrap(tiny_model, max_params):
    loop = torch_loop(tiny_model, max_chunk_params=max_params)
    tokens = held_out_tokens(150)  # past the 64-token attention window
    report = verify_against_transformers(tiny_model, tokens, loop)
    assert report["max_abs_diff"] < 1e-4
    assert report["argmax_agreement"] == 1.0
    if max_params:
        assert len(loop.chunks) == 3 and len(loop.heads) == 2


def test_decode_loop_snapshot_restores_the_state(tiny_model):
    loop = torch_loop(tiny_model)
    tokens = held_out_tokens(40)
    for token in tokens[:20]:
        loop.step(token)
    saved = loop.snapshot()
    first = [loop.step(t) for t in tokens[20:]]
    loop.restore(saved)
    again = [loop.step(t) for t in tokens[20:]]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    loop.reset()
    assert loop.position == 0 and not np.array_equal(loop.step(tokens[20]), first[0])


def test_graph_by_graph_teacher_forcing_equals_stepping(tiny_model):
    loop = torch_loop(tiny_model, max_chunk_params=20_000)
    tokens = held_out_tokens(80)
    released = []
    layerwise = loop.teacher_forced_logits(tokens, released.append)
    loop.reset()
    stepwise = np.stack([loop.step(t) for t in tokens])
    assert np.allclose(layerwise, stepwise, atol=1e-5)
    assert released == list(range(5)), "each of the 3 chunk and 2 head graphs is released once, in order"


def test_the_default_quality_run_fits_its_time_budget():
    assert pipeline.auto_eval_steps(500_000, 2) == 256
    steps_2b = pipeline.auto_eval_steps(2_683_000_000, 5)
    assert 16 <= steps_2b < 64, "about a minute per simulated token at 2.7B"


RG_2B = {"hidden_size": 2560, "intermediate_size": 15360, "num_hidden_layers": 26, "num_attention_heads": 10,
         "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 256000, "lru_width": 2560,
         "attention_window_size": 2048, "block_types": ["recurrent", "recurrent", "attention"], "conv1d_width": 4,
         "logits_soft_cap": 30.0, "partial_rotary_factor": 0.5, "rope_theta": 10000.0}  # model-configs.json


@pytest.mark.parametrize("overrides", [{}, {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4,
                                         "head_dim": 48, "lru_width": 256, "vocab_size": 1024,
                                         "attention_window_size": 64},
                                        {"num_hidden_layers": 4, "block_types": ["attention", "recurrent"]}],
                         ids=["2b", "tiny-with-its-own-head-dim", "other-pattern"])
def test_one_shape_reads_a_config_file_as_transformers_does(overrides):
    from transformers import AutoConfig

    raw = {**RG_2B, **overrides}
    config = AutoConfig.for_model("recurrent_gemma", **raw)
    from_file, from_transformers = GriffinShape.from_dict(raw), GriffinShape.from_transformers(config)
    assert from_file == from_transformers
    assert from_file.head_dim == config.head_dim
    assert from_file.kv_heads == config.num_key_value_heads
    assert [k == "attention" for k in from_file.kinds] == [t == "sliding_attention" for t in config.layers_block_type]
    assert from_file.normalizer == float(torch.tensor(config.hidden_size ** 0.5, dtype=torch.bfloat16).float())


def test_the_normalizer_rounds_to_bfloat16_as_torch_does():
    for hidden in range(1, 20_000):
        expected = float(torch.tensor(hidden ** 0.5, dtype=torch.bfloat16).float())
        assert bfloat16_round(hidden ** 0.5) == expected, hidden
    assert bfloat16_round(2560 ** 0.5) == 50.5  # feasibility section 1


def test_graphs_are_sized_to_leave_the_host_room_for_what_the_process_holds():
    gib = 1 << 30
    assert pipeline.graph_param_budget("w8a8", available=0) == pipeline.GRAPH_WEIGHT_BUDGET
    assert pipeline.graph_param_budget("fp16", available=1000 * gib) == pipeline.GRAPH_WEIGHT_BUDGET // 2
    roomy = pipeline.graph_param_budget("w8a8", available=20 * gib)
    held = pipeline.graph_param_budget("w8a8", available=20 * gib, held=int(2.6 * gib))
    assert held < roomy
    assert held * pipeline.BUILD_BYTES_PER_PARAM + int(2.6 * gib) <= 20 * gib * 0.75
    dims = GriffinShape.from_dict({**RG_2B, "num_hidden_layers": 3})
    assert len(plan_head_rows(dims, max_params=held)) >= 2, "a 2b-width LM head is split on a 24 GB host"


def test_graph_planning_respects_the_parameter_budget():
    dims = GriffinShape.from_dict(RG_2B)
    assert dims.kinds == ("recurrent", "recurrent", "attention") * 8 + ("recurrent", "recurrent")
    layer_params = [78_000_000] * 26
    chunks = plan_chunks(dims, layer_params, max_params=500_000_000)
    assert [layer for chunk in chunks for layer in chunk] == list(range(26))
    assert all(sum(layer_params[i] for i in chunk) <= 500_000_000 for chunk in chunks)
    assert len(chunks) == 5
    rows = plan_head_rows(dims, max_params=500_000_000)
    assert rows[0][0] == 0 and rows[-1][1] == 256_000 and len(rows) == 2
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
    assert plan_chunks(dims, layer_params, max_params=1) == [[i] for i in range(26)], "at least one layer each"


def test_quality_metrics_see_a_degraded_model(tiny_model):
    reference, candidate = torch_loop(tiny_model), torch_loop(tiny_model)
    tokens = held_out_tokens(60)
    same = compare(reference, candidate, tokens)
    assert same["top1_agreement"] == 1.0 and abs(same["nll_delta_pct"]) < 1e-6
    inner = candidate.runner

    class Noisy:
        def run(self, index, inputs):
            outputs = inner.run(index, inputs)
            return [o + np.random.default_rng(index).normal(0, 2.0, o.shape).astype(o.dtype) for o in outputs]

    candidate.runner = Noisy()
    worse = compare(reference, candidate, tokens)
    assert worse["top1_agreement"] < 0.9 and worse["nll_delta_pct"] > 1 and worse["kl_divergence"] > 0.01


# --- calibration: streamed to disk, bounded -----------------------------------------------------------------

def _held_calibration(loop, prompts, steps):
    """The calibration as it was computed before streaming: every step of every graph held, then subsampled."""
    captured = {i: [] for i in range(len(loop.chunks) + len(loop.heads))}
    inner = loop.runner

    class Hold:
        def run(self, index, inputs):
            captured[index].append([np.array(a, copy=True) for a in inputs])
            return inner.run(index, inputs)

    loop.runner = Hold()
    for prompt in prompts:
        tokens = [2] + [b + BYTE_OFFSET for b in prompt.encode()]
        while len(tokens) < steps:
            tokens += [b + BYTE_OFFSET for b in (" " + prompt).encode()]
        loop.reset()
        for token in tokens[:steps]:
            loop.step(token)
    loop.runner = inner
    return {index: samples[:4] + samples[4::max(1, len(samples) // 96)] for index, samples in captured.items()}


def test_streamed_calibration_equals_holding_every_step(tiny_model, tmp_path):
    loop = torch_loop(tiny_model, max_chunk_params=20_000)  # 3 chunk graphs and 2 head graphs
    prompts = [item if isinstance(item, str) else item.get("prompt") or item["input"]
               for item in json.loads(CALIBRATION.read_text())]
    request = RknnRequest(model=TINY, out=tmp_path, calibration=str(CALIBRATION))
    encode = lambda text: [b + BYTE_OFFSET for b in text.encode()]  # noqa: E731 (the tiny model is byte-level)
    datasets = pipeline._calibration(loop, request, encode, {"bos_token_id": 2}, tmp_path / "calib", 5)
    steps = min(loop.window + 16, pipeline.CALIBRATION_MAX_STEPS)
    assert len(prompts) * steps <= pipeline.CALIBRATION_MAX_TOTAL_STEPS, "the bound does not cut this set"
    expected = _held_calibration(loop, prompts, steps)
    for index, dataset in datasets.items():
        lines = dataset.read_text().splitlines()
        assert len(lines) == len(expected[index]) <= 4 + 2 * 96
        for line, sample in zip(lines, expected[index], strict=True):
            arrays = [np.load(path) for path in line.split()]
            assert len(arrays) == len(sample)
            assert all(np.array_equal(a, b.astype(np.float32)) for a, b in zip(arrays, sample, strict=True))


def test_calibration_runs_a_bounded_number_of_steps(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CALIBRATION_MAX_TOTAL_STEPS", 200)
    loop = torch_loop(tiny_model)
    calls = []
    inner = loop.runner

    class Count:
        def run(self, index, inputs):
            calls.append(index)
            return inner.run(index, inputs)

    loop.runner = Count()
    request = RknnRequest(model=TINY, out=tmp_path, calibration=str(CALIBRATION))
    encode = lambda text: [b + BYTE_OFFSET for b in text.encode()]  # noqa: E731
    datasets = pipeline._calibration(loop, request, encode, {"bos_token_id": 2}, tmp_path / "calib", 2)
    steps = min(loop.window + 16, pipeline.CALIBRATION_MAX_STEPS)
    assert calls.count(0) == (200 // steps) * steps, "whole prompts, cut to the step budget"
    assert calls.count(1) == 0, "the head graph's input is the chunk output; the head is not run"
    assert [len(d.read_text().splitlines()) for d in datasets.values()] == \
        [len(pipeline.calibration_sample_steps((200 // steps) * steps))] * 2
    assert pipeline.calibration_sample_steps(10_000)[:5] == [0, 1, 2, 3, 4]
    assert 96 <= len(pipeline.calibration_sample_steps(10_000)) <= 101


# --- the toolkit's hybrid-quantization cfg ----------------------------------------------------------------

CFG = """custom_quantize_layers: {}
quantize_parameters:
    /blocks.0/rg_lru/Mul_output_0-rs:
        qtype: asymmetric_quantized
        dtype: int8
        qmethod: layer
    h0_rs:
        qtype: asymmetric_quantized
        dtype: int8
    h0:
        dtype: float32
    /blocks.0/mlp/up_proj/Add_output_0-rs:
        qtype: asymmetric_quantized
        dtype: int8
    /blocks.0/conv1d/Add_output_0-rs:
        qtype: asymmetric_quantized
        dtype: int8
"""


def test_hybrid_cfg_edit_marks_only_matching_int8_tensors(tmp_path):
    assert hybrid_keys(CFG, list(pipeline.HYBRID_PATTERNS)) == [
        "/blocks.0/rg_lru/Mul_output_0-rs", "h0_rs", "/blocks.0/conv1d/Add_output_0-rs"]
    cfg = tmp_path / "graph.quantization.cfg"
    cfg.write_text(CFG)
    keys = edit_cfg(cfg, list(pipeline.HYBRID_PATTERNS))
    text = cfg.read_text()
    assert text.startswith("custom_quantize_layers:\n    '/blocks.0/rg_lru/Mul_output_0-rs': float16\n")
    assert len(keys) == 3 and text.endswith(CFG[len("custom_quantize_layers: {}\n"):]), "the rest stays as written"
    cfg.write_text("something: else\n")
    with pytest.raises(RuntimeError, match="unexpected quantization cfg layout"):
        edit_cfg(cfg, ["x"])


# --- checks and errors --------------------------------------------------------------------------------------

def test_check_refuses_what_the_backend_cannot_build(tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                   "hidden_size": 64, "num_hidden_layers": 2,
                                                   "num_attention_heads": 4, "vocab_size": 100}))
    _, findings = pipeline.check(RknnRequest(model=llama, out=tmp_path / "out"))
    assert "rknn.architecture" in {f.id for f in findings}
    _, findings = pipeline.check(RknnRequest(model=TINY, out=tmp_path / "out", dtype="w4a16"))
    assert "rknn.dtype" in {f.id for f in findings}


def _quantized_tiny(folder: Path, **bnb_options) -> Path:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        TINY, quantization_config=BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **bnb_options),
        device_map="cpu")
    model.save_pretrained(folder)
    for name in ("rkedge_tokenizer.json", "generation_config.json"):
        (folder / name).write_bytes((TINY / name).read_bytes())
    return folder


def test_check_takes_bitsandbytes_checkpoints_with_a_warning_and_refuses_other_quantization(tmp_path):
    quantized = _quantized_tiny(tmp_path / "nf4", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True)
    _, findings = pipeline.check(RknnRequest(model=quantized, out=tmp_path / "out"))
    f9 = [f for f in findings if f.id == "F-9"]
    assert [f.severity for f in f9] == ["warning"] and "bounded by" in f9[0].message
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((TINY / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    (gptq / "model.safetensors").write_bytes((TINY / "model.safetensors").read_bytes())
    _, findings = pipeline.check(RknnRequest(model=gptq, out=tmp_path / "out"))
    assert [f.severity for f in findings if f.id == "F-9"] == ["error"]


@needs_simulator
def test_a_bitsandbytes_checkpoint_converts_after_dequantization(tmp_path):
    quantized = _quantized_tiny(tmp_path / "int8", load_in_8bit=True)
    result = convert_rknn(RknnRequest(model=quantized, out=tmp_path / "out", dtype="fp16", eval_text=HELD_OUT,
                                      eval_steps=24))
    manifest = result.manifest
    assert manifest is not None and result.bundle is not None
    assert manifest["inputs"]["source_quantization"]["quant_type"] == "int8"
    assert "bounded by" in (result.bundle / "README.md").read_text()
    assert [s["name"] for s in result.steps][:2] == ["dequantize", "verify"]
    assert manifest["verification"]["max_abs_diff"] < 1e-3, "the graphs follow the dequantized weights"
    assert manifest["quality"]["top1_agreement"] >= 0.95, "fp16 graphs of the dequantized model"
    assert not list((tmp_path / "out").glob(".dequantized-*")), "the dequantized copy is removed"


def test_cli_rejects_bad_requests_with_exit_2(tmp_path):
    out = tmp_path / "out"
    bad_dtype = run_cli("convert", str(TINY), "--backend", "rknn", "--dtype", "w4a16", "--out", str(out))
    assert bad_dtype.returncode == 2 and "w4a16" in bad_dtype.stderr and "fix:" in bad_dtype.stderr
    rkllm_only = run_cli("convert", str(TINY), "--backend", "rknn", "--max-context", "4096", "--out", str(out))
    assert rkllm_only.returncode == 2 and "--max-context" in rkllm_only.stderr
    default_spelled_out = run_cli("convert", str(TINY), "--backend", "rknn", "--algorithm", "normal",
                                  "--optimization-level", "0", "--out", str(out))
    assert default_spelled_out.returncode == 2, "an RKLLM option given explicitly is refused even at its default"
    assert "--algorithm, --optimization-level" in default_spelled_out.stderr
    assert not out.exists() or not any(out.iterdir()), "nothing is written for a refused request"
    refused = run_cli("convert", str(TINY), "--dry-run", "--out", str(out))
    assert refused.returncode == 2 and "--backend rknn" in refused.stdout + refused.stderr, \
        "RKLLM's refusal names the RKNN backend"


def test_a_folder_that_is_not_a_bundle_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match="not an RKNN bundle"):
        LLM(tmp_path, library="mock")
    (tmp_path / "bundle.json").write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ModelFileError, match="schema"):
        LLM(tmp_path, library="mock")


def test_sampling_rules():
    logits = np.array([0.0, 3.0, 2.9, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    plain = dict(top_k=1, top_p=1.0, temperature=1.0, repeat_penalty=1.0, frequency_penalty=0.0,
                 presence_penalty=0.0)
    assert _sample(logits, rng, [], **plain) == 1
    assert _sample(logits, rng, [1], **{**plain, "repeat_penalty": 1.2}) == 2, "a repeated token is pushed down"
    assert _sample(logits, rng, [1], **{**plain, "presence_penalty": 0.5}) == 2
    draws = {_sample(logits, rng, [], **{**plain, "top_k": 2, "temperature": 1.0}) for _ in range(200)}
    assert draws == {1, 2}, "top-k 2 samples only the two best"
    nucleus = {_sample(logits, rng, [], **{**plain, "top_k": 0, "top_p": 0.3}) for _ in range(100)}
    assert nucleus == {1}, "the smallest prefix reaching top_p keeps just the best token"


# --- through the rknn-toolkit2 simulator --------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory) -> Path:
    """fp16, one graph per layer and the head split in two (chained states, concatenated logits)."""
    out = tmp_path_factory.mktemp("rknn-fp16")
    result = convert_rknn(RknnRequest(model=TINY, out=out, dtype="fp16", graph_params=20_000,
                                      eval_text=str(HELD_OUT)))
    assert result.bundle is not None
    return result.bundle


@pytest.fixture(scope="module")
def w8a8_bundle(tmp_path_factory) -> tuple[Path, dict]:
    """w8a8 hybrid through the CLI, calibrated on in-domain text."""
    out = tmp_path_factory.mktemp("rknn-w8a8")
    proc = run_cli("convert", str(TINY), "--backend", "rknn", "--dtype", "w8a8", "--out", str(out),
                   "--calibration", str(CALIBRATION), "--eval-text", str(HELD_OUT), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)


@needs_simulator
def test_fp16_meets_the_acceptance_bar(fp16_bundle):
    manifest = json.loads((fp16_bundle / "bundle.json").read_text())
    quality = manifest["quality"]
    assert quality["steps"] == 256
    assert quality["top1_agreement"] >= 0.995
    assert abs(quality["nll_delta_pct"]) < 0.1
    assert manifest["verification"]["max_abs_diff"] < 1e-4
    assert [g["layers"] for g in manifest["graphs"]] == [[0], [1], [2]]
    assert [g["name"] for g in manifest["heads"]] == ["head0", "head1"]
    for graph in [*manifest["graphs"], *manifest["heads"]]:
        assert graph["dtype"] == "fp16"
        assert (fp16_bundle / graph["rknn"]).stat().st_size == graph["rknn_bytes"] > 0
    assert not manifest["hybrid"]["enabled"]
    assert not list(fp16_bundle.parent.glob(".*partial*")), "no staging folder is left behind"
    card = (fp16_bundle / "README.md").read_text()
    assert "top-1 agreement" in card and "fp16" in card


@needs_simulator
def test_w8a8_hybrid_meets_the_acceptance_bar(w8a8_bundle):
    out, summary = w8a8_bundle
    assert summary["ok"] and summary["backend"] == "rknn"
    quality = summary["quality"]
    assert abs(quality["nll_delta_pct"]) <= 1.0
    assert quality["top1_agreement"] >= 0.95
    assert quality["logits_cosine"] > 0.99
    bundle = Path(summary["output"])
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["hybrid"]["enabled"] and manifest["quality"] == quality
    kept = manifest["graphs"][0]["fp16_tensors"]
    assert any("/rg_lru/" in t for t in kept), "the search keeps the RG-LRU chain of this model in fp16"
    # the fp16 parts are chosen by measurement (rkedge.convert.rknn.precision; tests/test_rknn_precision.py)
    assert manifest["precision"]["mode"] == "auto" and manifest["precision"]["met"]
    assert manifest["heads"][0]["fp16_tensors"] == [], "the LM head is plain w8a8"
    assert manifest["tokenizer"]["type"] == "bytes"


@needs_simulator
@pytest.mark.timeout(900)  # run alone, it pays for the w8a8 fixture's conversion and precision search
def test_w8a8_prefill_graphs_are_a_separate_fixed_chunk_set_keeping_the_decode_graphs_fp16_parts(w8a8_bundle,
                                                                                                 tiny_model):
    from rkedge.runtime._stderr import capture_native_output
    from rkedge.runtime.rknn.bundle import read_bundle
    from rkedge.runtime.rknn.engine import SimulatorGraphs
    from rkedge.runtime.rknn.loop import DecodeLoop, bundle_graphs
    from rkedge.runtime.rknn.prefill import prefill_with

    _, summary = w8a8_bundle
    folder, manifest = read_bundle(summary["output"])
    prefill = manifest.prefill
    assert prefill is not None and prefill["weights"] == "separate" and not prefill["serves_decode"]
    assert prefill["lengths"] == [prefill["chunk"]] and 16 <= prefill["chunk"] <= 64  # choose_chunk's
    assert prefill["extra_bytes"] == sum(g["rknn_bytes"] for g in prefill["graphs"]) > 0
    assert prefill["verification"]["max_abs_diff"] < 1e-4
    for graph, decode in zip(prefill["graphs"], manifest.graphs or [], strict=True):
        assert graph["layers"] == decode["layers"] and graph["dtype"] == "w8a8"
        assert graph["simulator"]["build"] == "hybrid"
        assert bool(graph["fp16_tensors"]) == bool(decode["fp16_tensors"]), "the same parts kept in fp16"
    # the chunked path (prefill graphs, then decode steps for the rest) in the simulator against transformers
    tokens = held_out_tokens(2 * prefill["chunk"] + 5)
    with capture_native_output():
        runner = SimulatorGraphs(folder, bundle_graphs(manifest, prefill=True))
        try:
            loop = DecodeLoop.from_bundle(folder, manifest, runner, prefill=True)
            assert loop.prefill_set is not None
            assert loop.prefill_set.first_index == len(manifest.graphs or []) + len(manifest.heads or [])
            ours = []
            for length in (prefill["chunk"], len(tokens)):  # one chunk; two chunks and five decode steps
                loop.reset()
                ours.append(prefill_with(loop, loop.prefill_set, tokens[:length]))
        finally:
            runner.release()
    with torch.no_grad():
        reference = tiny_model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float().numpy()
    for logits, row in zip(ours, (prefill["chunk"] - 1, len(tokens) - 1), strict=True):
        assert logits is not None and int(np.argmax(logits)) in np.argsort(reference[row])[-3:]  # int8 noise
        cosine = float(np.dot(logits, reference[row]) / (np.linalg.norm(logits) * np.linalg.norm(reference[row])))
        assert cosine > 0.99


@needs_simulator
def test_the_bundle_manifest_reads_back_byte_for_byte(fp16_bundle):
    from rkedge.manifest import read_manifest

    manifest = read_manifest(fp16_bundle)
    assert manifest is not None and manifest.backend == "rknn"
    assert not manifest.omitted and not manifest.extra, "the typed fields cover every key the converter writes"
    assert manifest.to_json() == (fp16_bundle / "bundle.json").read_text(encoding="utf-8")


@needs_simulator
def test_llm_generates_what_the_reference_decode_loop_generates(fp16_bundle, tiny_model):
    prompt = "def main(argv):\n    "
    with LLM(fp16_bundle, library="mock", max_new_tokens=24, ignore_eos_token=True) as llm:
        assert llm.abi == "rknn" and llm.runtime.simulated
        result = llm.generate(prompt, stream=False)
        again = llm.generate(prompt, stream=False)
    loop = torch_loop(tiny_model)
    logits = None
    for token in [2] + [b + BYTE_OFFSET for b in prompt.encode()]:
        logits = loop.step(token)
    expected = []
    for _ in range(24):
        token = int(np.argmax(logits))
        expected.append(token - BYTE_OFFSET)
        logits = loop.step(token)
    assert result.text.encode() == bytes(expected)
    assert again.text == result.text, "without keep_history every run starts from a fresh state"
    assert result.finish_reason == "length" and result.stats.completion_tokens == 24
    assert result.stats.prompt_tokens == len(prompt) + 1


@needs_simulator
def test_streaming_abort_and_chat_sessions(fp16_bundle):
    with LLM(fp16_bundle, library="mock", max_new_tokens=400, ignore_eos_token=True) as llm:
        pieces = []
        stream = llm.generate("import os\n", stream=True)
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == 5:
                threading.Thread(target=llm.abort).start()
        assert stream.result.finish_reason == "abort"
        assert 5 <= stream.result.stats.completion_tokens < 400
        assert "".join(pieces) == stream.result.text

        session = llm.chat_session()
        first = session.send("def f(x):", stream=False, max_new_tokens=10)
        second = session.send("return", stream=False, max_new_tokens=10)
        assert session.messages[-1]["content"] == second.text and len(session.messages) == 4
        # the second turn continued from the kept state: the same as sending everything at once
        whole = llm.generate("def f(x):" + first.text + "return", stream=False, max_new_tokens=10)
        assert whole.text == second.text


@needs_simulator
def test_chat_cli_answers_from_the_bundle(fp16_bundle):
    prompt = "import sys\nimport os\n"
    proc = run_cli("chat", str(fp16_bundle), "--mock", "--max-new-tokens", "16", "--prompt", prompt)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with LLM(fp16_bundle, library="mock", max_new_tokens=16) as llm:
        expected = llm.generate(prompt, stream=False).text
    assert expected and expected in proc.stdout, "the reply is printed (no chat template: the prompt goes as is)"
    assert "inference" not in proc.stdout and "compress=" not in proc.stdout, "the toolkit's log stays off stdout"


@needs_simulator
def test_server_streams_and_aborts_when_the_client_leaves(fp16_bundle):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from server_helpers import LiveServer

    from rkedge.runtime.server.app import create_app
    from rkedge.runtime.server.settings import ServerSettings

    llm = LLM(fp16_bundle, library="mock", max_new_tokens=400, ignore_eos_token=True)
    streams = []
    start = llm.run  # every run (generate, chat sessions, the server's old _start) starts here

    def recording_start(*args, **kwargs):
        streams.append(start(*args, **kwargs))
        return streams[-1]

    llm.run = recording_start
    server = LiveServer(create_app(ServerSettings(model_path=fp16_bundle), llm))
    name = llm.metadata["name"]
    body = {"model": name, "messages": [{"role": "user", "content": "def run("}], "stream": True, "max_tokens": 12}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            text = http.post("/v1/chat/completions", json=body).text
            frames = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            assert frames[-1] == "[DONE]" and len(frames) > 5
            deltas = [json.loads(f)["choices"][0]["delta"].get("content") or "" for f in frames[:-1]
                      if json.loads(f).get("choices")]
            assert "".join(deltas) == streams[-1].result.text and streams[-1].result.stats.completion_tokens == 12
            ollama = http.post("/api/generate", json={"model": name, "prompt": "x = ", "stream": False,
                                                      "options": {"num_predict": 5}})
            assert ollama.status_code == 200 and ollama.json()["done"] is True

            with http.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 400}) as response:
                for seen, _line in enumerate(line for line in response.iter_lines() if line.startswith("data: ")):
                    if seen == 4:
                        break
            aborted = streams[-1]
            deadline = time.monotonic() + 30
            while aborted.result is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert aborted.result.finish_reason == "abort" and aborted.result.stats.completion_tokens < 400
            follow_up = http.post("/v1/chat/completions", json={**body, "stream": False})
            assert follow_up.status_code == 200 and follow_up.json()["choices"][0]["message"]["content"]
    finally:
        server.stop()
        llm.close()


@needs_simulator
def test_a_failed_build_leaves_no_bundle(tmp_path, monkeypatch):
    def broken(staging, name, request, dataset, **_):
        raise ToolkitError(f"rknn-toolkit2 could not build {name}: simulated failure")

    monkeypatch.setattr(pipeline, "_build_graph", broken)
    with pytest.raises(ToolkitError, match="simulated failure"):
        convert_rknn(RknnRequest(model=TINY, out=tmp_path, dtype="fp16", eval_steps=16))
    assert [p.name for p in tmp_path.iterdir()] == [], "neither a partial nor a complete-looking bundle"
    earlier = tmp_path / "tiny-recurrentgemma_fp16_rk3588_rknn"
    earlier.mkdir()
    (earlier / "bundle.json").write_text("{}")
    with pytest.raises(ToolkitError):
        convert_rknn(RknnRequest(model=TINY, out=tmp_path, dtype="fp16", eval_steps=16))
    assert [p.name for p in tmp_path.iterdir()] == [earlier.name], "a failed rebuild leaves the earlier bundle"
    assert (earlier / "bundle.json").read_text() == "{}"


def test_unsupported_runtime_parameters_are_refused():
    from rkedge.runtime.rknn.engine import _refuse_unsupported
    from rkedge.runtime.types import InitParams

    _refuse_unsupported(InitParams(top_k=5, temperature=0.7))
    with pytest.raises(InputError, match="base_domain_id"):
        _refuse_unsupported(InitParams(base_domain_id=1))


# -- the build worker on the toolkit seam's runner (a stand-in rknn.api: no rknn-toolkit2 needed) ----------------

FAKE_RKNN_API = '''
import os, signal, subprocess, sys, time

class RKNN:
    def __init__(self, verbose=False):
        self.mode = os.environ["FAKE_RKNN_MODE"]

    def config(self, **kwargs):
        print("I rknn-toolkit2 version: fake")  # the real toolkit prints on stdout
        return 0

    def load_onnx(self, model):
        return 0

    def build(self, do_quantization=False):
        if self.mode == "hang":
            child = subprocess.Popen(["sleep", "300"])  # something the toolkit started, in the worker's group
            with open(os.environ["FAKE_RKNN_CHILD"], "w") as out:
                out.write(str(child.pid))
            time.sleep(300)
        if self.mode == "killed":
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        if self.mode == "fails":
            print("E build: Meet unsupported op", file=sys.stderr)
            return -1
        return 0

    def export_rknn(self, path):
        with open(path, "wb") as out:
            out.write(b"RKNN" + bytes(60))
        return 0

    def release(self):
        pass
'''


@pytest.fixture
def fake_rknn(tmp_path, monkeypatch):
    package = tmp_path / "fake-rknn" / "rknn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "api.py").write_text(FAKE_RKNN_API)
    monkeypatch.setenv("PYTHONPATH", str(package.parent))
    staging = tmp_path / "staging"
    (staging / "onnx" / "g0").mkdir(parents=True)
    (staging / "onnx" / "g0" / "g0.onnx").write_bytes(b"")

    def build(mode: str, timeout: float = 60, events: list | None = None) -> dict:
        monkeypatch.setenv("FAKE_RKNN_MODE", mode)
        request = RknnRequest(model=TINY, out=tmp_path, dtype="fp16", build_timeout_s=timeout)
        return pipeline._build_graph(staging, "g0", request, None,
                                     on_event=events.append if events is not None else None)

    return build


def test_build_worker_events_reach_the_reporter(fake_rknn):
    events: list[dict] = []
    result = fake_rknn("ok", events=events)
    assert result["rknn"] == "g0.rknn" and result["rknn_bytes"] == 64 and result["dtype"] == "fp16"
    assert "I rknn-toolkit2 version: fake" in [e["line"] for e in events if e["type"] == "log"]
    calls = [(e["step"], e["state"]) for e in events if e["type"] == "progress"]
    assert calls[:2] == [("config", "start"), ("config", "done")] and ("export_rknn", "done") in calls
    lines: list[str] = []
    pipeline._build_events(lines.append)(events[0])
    assert lines, "the CLI reporter's log receives the worker's events"


def test_a_failing_build_worker_reports_the_toolkit_call_and_its_words(fake_rknn):
    with pytest.raises(ToolkitError, match="rknn-toolkit2 could not build g0: RuntimeError: rknn-toolkit2 build "
                                           "returned -1") as caught:
        fake_rknn("fails")
    assert "Meet unsupported op" in str(caught.value)


def test_a_hanging_build_worker_is_killed_with_its_process_group(fake_rknn, tmp_path, monkeypatch):
    import os

    child_file = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_RKNN_CHILD", str(child_file))
    started = time.monotonic()
    with pytest.raises(ToolkitError, match="did not finish within 3 s and was stopped \\(step: build\\)"):
        fake_rknn("hang", timeout=3)
    assert time.monotonic() - started < 30
    child = int(child_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the toolkit's own child went with the worker's process group


def test_a_sigkilled_build_worker_is_reported_as_out_of_memory(fake_rknn):
    with pytest.raises(ToolkitError, match="killed by SIGKILL during step build.*OOM killer.*F-11") as caught:
        fake_rknn("killed")
    assert "--graph-params" in caught.value.fix and "F-11" in caught.value.fix
