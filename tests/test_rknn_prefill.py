"""Chunked prefill for RecurrentGemma on RKNN: T tokens per graph, states carried (the graph and its conversion:
convert/rknn/prefill.py; what runs at inference: runtime/rknn/prefill.py, DecodeLoop.prefill, RknnModel).

Against transformers in torch (chunk boundaries, the 64-token attention window wrap, a chat turn after decode
steps), the host features against the decode step's, the TTFT prediction on the real recurrentgemma-2b-it config
(and what `rkedge plan` prints), the graph compiled fp16 by rknn-toolkit2 as one multi-shape model in the
simulator (100-token prompt), and a converted bundle end to end: `LLM` through the prefill graphs generates what
the decode step token by token generates, chat turns prefill only their new tokens, `--prefill-chunk 0` and an
older manifest without a ``prefill`` section run token by token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run_cli
from rknn_helpers import DATA, HELD_OUT, TINY, has_rknn_toolkit, held_out_tokens, needs_simulator

from rkedge.convert.rknn.prefill import choose_chunk, predict_prefill
from rkedge.convert.rknn.shape import GriffinShape
from rkedge.runtime.rknn.prefill import plan_prompt

CONFIG_2B = DATA / "configs" / "recurrentgemma-2b-it.json"


@pytest.fixture(scope="module")
def tiny_model():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()


# --- host side ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("tokens", "chunks", "expected"), [
    (100, (32,), [32, 32, 32, 1, 1, 1, 1]),
    (100, (16, 32, 1), [32, 32, 32, 1, 1, 1, 1]),
    (150, (64, 16), [64, 64, 16, 1, 1, 1, 1, 1, 1]),
    (5, (16,), [1, 1, 1, 1, 1]),
    (0, (16,), []),
])
def test_a_prompt_runs_as_the_longest_chunks_then_single_tokens(tokens, chunks, expected):
    assert plan_prompt(tokens, chunks) == expected


@pytest.mark.parametrize("position", [0, 1, 30, 63, 64, 200])
def test_a_one_token_chunk_has_the_decode_steps_features(position):
    np = pytest.importorskip("numpy")
    from rkedge.runtime.rknn.loop import position_features
    from rkedge.runtime.rknn.prefill import chunk_features

    ours = chunk_features(position, 1, rotary_dim=16, rope_theta=10000.0, window=64)
    theirs = position_features(position, rotary_dim=16, rope_theta=10000.0, window=64)
    for name in ("cos", "sin", "reset", "mask"):
        assert np.array_equal(ours[name], theirs[name]), name
    assert ours["scan"].shape == (1, 2, 1) and ours["causal"].tolist() == [[[1.0, 1.0]]]


def test_the_scan_matrices_sum_exactly_the_decays_between_two_tokens():
    np = pytest.importorskip("numpy")
    from rkedge.runtime.rknn.prefill import chunk_features

    length = 5
    features = chunk_features(10, length, rotary_dim=4, rope_theta=10000.0, window=8)
    log_a = np.arange(1, length + 1, dtype=np.float32)  # distinct powers make every sum identifiable
    decay = (features["scan"][0] @ log_a).reshape(length, length + 1)
    for t in range(length):
        for s in range(-1, length):
            want = log_a[s + 1:t + 1].sum() if s <= t else 0.0
            assert decay[t, s + 1] == want
            assert features["causal"][0, t, s + 1] == (1.0 if s <= t else 0.0)
    # query t sees W = 8 positions ending at its own, the older cached slots and the later new ones masked
    visible = features["mask"][0] == 0
    assert visible.sum(axis=1).tolist() == [8] * length
    assert not visible[0, 7 + 1:].any() and visible[length - 1, -1]


# --- the graph against transformers (torch) ----------------------------------------------------------------

@pytest.mark.parametrize("chunks", [(16,), (32, 16), (64,), (64, 16, 1)],
                         ids=["16", "32+16", "64", "64+16+one-token-shape"])
def test_chunked_prefill_reproduces_transformers_across_chunks_and_the_window_wrap(tiny_model, chunks):
    from rkedge.convert.rknn.prefill import verify_prefill_against_transformers

    tokens = held_out_tokens(150)  # window 64: the chunks cross it twice
    report = verify_prefill_against_transformers(tiny_model, tokens, chunks)
    assert report["position"] == 150
    assert report["max_abs_diff"] < 1e-4
    assert report["min_centred_cosine"] > 0.9999
    assert report["argmax_agreement"] == 1.0
    assert report["max_state_diff"] < 1e-5  # the same states as the decode step fed token by token


def test_a_chat_turn_after_decode_steps_prefills_from_the_current_position(tiny_model):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    from rkedge.convert.rknn.prefill import torch_prefill
    from rkedge.convert.rknn.torch_graphs import torch_loop
    from rkedge.runtime.rknn.prefill import run_prefill

    tokens = held_out_tokens(160, skip=500)
    first, replies, turn = tokens[:40], tokens[40:47], tokens[47:]
    loop = torch_loop(tiny_model)
    graphs, runner = torch_prefill(tiny_model, loop)
    run_prefill(loop, graphs, runner, first, (16,))
    for token in replies:  # generated tokens go through the decode step
        loop.step(token)
    last = run_prefill(loop, graphs, runner, turn, (32,))  # the next turn starts at position 47, mid-window
    with torch.no_grad():
        reference = tiny_model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].float().numpy()
    assert loop.position == len(tokens)
    assert np.abs(last - reference).max() < 1e-4


def test_an_abort_stops_the_prefill_between_chunks(tiny_model):
    from rkedge.convert.rknn.prefill import torch_prefill
    from rkedge.convert.rknn.torch_graphs import torch_loop
    from rkedge.runtime.rknn.prefill import run_prefill

    loop = torch_loop(tiny_model)
    graphs, runner = torch_prefill(tiny_model, loop)
    asked = []

    def stop() -> bool:
        asked.append(loop.position)
        return loop.position >= 32

    assert run_prefill(loop, graphs, runner, held_out_tokens(100), (16,), stop=stop) is None
    assert loop.position == 32 and asked == [0, 16, 32]


class _Recorder:
    """A runner that records which graph ran with which inputs and answers with outputs of the right shapes."""

    def __init__(self, hidden: int, vocab: int) -> None:
        self.calls: list[tuple[int, int]] = []
        self.hidden, self.vocab = hidden, vocab

    def run(self, index, inputs):
        np = pytest.importorskip("numpy")
        self.calls.append((index, len(inputs)))
        x = inputs[0]
        if len(inputs) == 1:  # a head graph: logits
            return [np.zeros((1, self.vocab), dtype=np.float32)]
        return [x + 1, inputs[-1] + 1]  # x_out, new_h0


def _fake_bundle(folder: Path, *, serves_decode: bool) -> dict:
    np = pytest.importorskip("numpy")
    np.save(folder / "embedding.npy", np.zeros((8, 4), dtype=np.float16))
    decode = {"name": "chunk0", "layers": [0], "inputs": ["x", "reset", "h0"], "outputs": ["x_out", "new_h0"],
              "shapes": {"x": [1, 1, 4], "reset": [1, 1, 1], "h0": [1, 4]}, "rknn": "chunk0.rknn"}
    head = {"name": "head", "inputs": ["x"], "outputs": ["logits"], "shapes": {"x": [1, 1, 4]}, "rknn": "head.rknn"}
    prefill = {"name": "prefill0", "layers": [0], "inputs": ["x", "reset", "scan", "causal", "h0"],
               "outputs": ["x_out", "new_h0"], "shapes": {"x": [1, 4, 4], "h0": [1, 4]}, "rknn": "prefill0.rknn"}
    return {"graphs": [decode], "heads": [head], "embedding": {"file": "embedding.npy"},
            "dims": {"rotary_dim": 2, "rope_theta": 10000.0, "window": 4},
            "prefill": {"chunk": 4, "lengths": [4, 1] if serves_decode else [4], "serves_decode": serves_decode,
                        "graphs": [prefill]}}


@pytest.mark.parametrize("serves_decode", [False, True], ids=["separate", "shared"])
def test_a_bundle_loop_numbers_the_prefill_graphs_after_what_it_loads(tmp_path, serves_decode):
    from rkedge.runtime.rknn.loop import DecodeLoop, bundle_graphs

    bundle = _fake_bundle(tmp_path, serves_decode=serves_decode)
    names = [g["name"] for g in bundle_graphs(bundle, prefill=True)]
    assert names == (["prefill0", "head"] if serves_decode else ["chunk0", "head", "prefill0"])
    assert [g["name"] for g in bundle_graphs(bundle)] == ["chunk0", "head"], "without prefill: as before"
    runner = _Recorder(hidden=4, vocab=8)
    loop = DecodeLoop.from_bundle(tmp_path, bundle, runner, prefill=True)
    assert loop.prefill(list(range(6))) is not None  # one chunk of 4, then two single tokens
    chunk_graph = 0 if serves_decode else 2
    single = (0, 5) if serves_decode else (0, 3)  # the one-token step: through the prefill graph when shared
    assert runner.calls == [(chunk_graph, 5), single, single, (1, 1)]
    assert loop.position == 6 and float(loop.states["h0"][0, 0]) == 3.0
    assert DecodeLoop.from_bundle(tmp_path, bundle, runner).prefill_set is None, "opt-in: the quality report"


# --- the TTFT prediction -----------------------------------------------------------------------------------

def test_prefill_ttft_of_recurrentgemma_2b_meets_the_bar_and_follows_its_formula():
    from rkedge.convert.perf_model import load_perf_model
    from rkedge.convert.rknn_plan import predict_griffin

    shape = GriffinShape.from_dict(json.loads(CONFIG_2B.read_text()))
    chunk = choose_chunk(shape)
    p = predict_prefill(shape, 128)
    plan = predict_griffin(shape)
    token_by_token = plan.ttft_token_by_token_ms
    assert 16 <= chunk <= 64 and p.chunk == chunk == plan.prefill_chunk
    assert p.ttft_ms <= 2000 < token_by_token  # issue 16 acceptance, against the ~11.5 s of the decode step
    assert plan.ttft_ms == pytest.approx(p.ttft_ms), "rkedge plan's TTFT is the chunked prefill's"
    assert token_by_token == pytest.approx(128 * p.decode_step_ms)
    # a chunk costs at least its weight read and its matmuls at the fitted rate
    model = load_perf_model()
    assert p.weight_read_ms == pytest.approx(shape.layer_params * 1.0015 / model.bandwidth_gbs / 1e6)
    assert p.compute_ms == pytest.approx(2 * shape.layer_params * chunk / model.matmul_tops / 1e9)
    assert p.chunk_ms >= max(p.weight_read_ms, p.compute_ms)
    chunks = p.plan.count(chunk)
    assert p.ttft_ms == pytest.approx(chunks * p.chunk_ms + p.plan.count(1) * p.decode_step_ms
                                      + (p.head_ms if 1 not in p.plan else 0))
    # the remainder of a prompt goes token by token, at the decode step's cost
    assert predict_prefill(shape, 130).ttft_ms == pytest.approx(p.ttft_ms - p.head_ms + 2 * p.decode_step_ms)


# --- compiled by rknn-toolkit2, in the simulator -----------------------------------------------------------

SHAPES = (1, 16, 32)  # the decode step and two chunk lengths, in one model



class SimulatorGraphs:
    """The prefill model (every layer, all SHAPES) and the decode step's LM head, fp16, in the simulator."""

    def __init__(self, model, folder: Path) -> None:
        import torch
        from rknn.api import RKNN

        from rkedge.convert.rknn.decode_step import HeadStep
        from rkedge.convert.rknn.prefill import dynamic_axes, dynamic_input, prefill_graph, prefill_module

        dims = GriffinShape.from_transformers(model.config)
        module = prefill_module(model, dims, range(dims.layers)).eval()
        head = HeadStep(model, dims).eval()
        self.graph = prefill_graph(module)
        self.sims = []
        for name, mod, example, sets, axes in [
            ("prefill", module, module.input_shapes(SHAPES[1]), dynamic_input(module, SHAPES), dynamic_axes(module)),
            ("head", head, head.input_shapes(), None, None),
        ]:
            onnx = folder / f"{name}.onnx"
            torch.onnx.export(mod, tuple(torch.zeros(s) for s in example.values()), str(onnx), opset_version=17,
                              dynamo=False, input_names=mod.input_names(), output_names=mod.output_names(),
                              dynamic_axes=axes)
            sim = RKNN(verbose=False)
            assert sim.config(target_platform="rk3588", **({"dynamic_input": sets} if sets else {})) == 0
            assert sim.load_onnx(model=str(onnx)) == 0
            assert sim.build(do_quantization=False) == 0
            assert sim.init_runtime() == 0
            self.sims.append(sim)

    def run(self, index, inputs):
        return self.sims[index].inference(inputs=list(inputs))

    def release(self):
        for sim in self.sims:
            sim.release()


@needs_simulator
def test_fp16_chunked_prefill_in_the_simulator_matches_transformers_on_a_100_token_prompt(tiny_model, tmp_path):
    from rkedge.convert.rknn.prefill import verify_prefill_against_transformers
    from rkedge.runtime._stderr import capture_native_output

    sims = None

    class HeadOnSimulator:
        def __init__(self, loop, inner):
            self.inner, self.heads_from = inner, len(loop.chunks)

        def run(self, index, inputs):
            return sims.run(1, inputs) if index >= self.heads_from else self.inner.run(index, inputs)

    def simulator(loop):
        loop.runner = HeadOnSimulator(loop, loop.runner)
        return [sims.graph], _PrefillOnly(sims)

    with capture_native_output():
        sims = SimulatorGraphs(tiny_model, tmp_path)
        try:
            # 100 = 3 x 32 + 4 x 1: every shape of the one model, the decode step's among them
            report = verify_prefill_against_transformers(tiny_model, held_out_tokens(100), SHAPES, simulator)
        finally:
            sims.release()
    print("simulator, fp16, 100-token prompt:", report)
    assert report["position"] == 100
    assert report["min_cosine"] >= 0.999  # issue 16 acceptance
    assert report["min_centred_cosine"] >= 0.999  # without the logits' common offset, which flatters cosine
    assert report["argmax_agreement"] >= 0.98


class _PrefillOnly:
    def __init__(self, sims: SimulatorGraphs) -> None:
        self.sims = sims

    def run(self, index, inputs):
        assert index == 0
        return self.sims.run(0, inputs)


def test_rkedge_plan_prints_the_chunked_ttft_of_recurrentgemma_2b_and_counts_the_prefill_graphs():
    proc = run_cli("plan", str(CONFIG_2B), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    p = json.loads(proc.stdout)["prediction"]
    assert p["prompt_tokens"] == 128 and p["ttft_ms"] <= 2000  # issue 16 acceptance
    # w8a8 (hybrid) keeps a second, fixed-T copy of the layer weights for prefill, counted in the memory
    assert p["prefill_bytes"] >= p["weight_bytes"] - 256_000 * 2560 * 1.0015 - 1e6
    assert p["total_bytes"] == (p["weight_bytes"] + p["hybrid_extra_bytes"] + p["host_embedding_bytes"]
                                + p["state_bytes"] + p["prefill_bytes"])
    text = run_cli("plan", str(CONFIG_2B)).stdout
    assert f"{p['ttft_ms']:.0f} ms for a 128-token prompt" in text
    assert f"chunks of {p['prefill_chunk']} tokens" in text
    fp16 = json.loads(run_cli("plan", str(CONFIG_2B), "--dtype", "fp16", "--json").stdout)["prediction"]
    assert fp16["ttft_ms"] <= 2000
    assert fp16["prefill_bytes"] < fp16["weight_bytes"] / 100, "fp16 prefill shares the decode step's weights"


def test_a_one_token_prefill_chunk_is_refused(tmp_path):
    from rkedge.convert.rknn.pipeline import RknnRequest, check

    _, findings = check(RknnRequest(model=TINY, out=tmp_path, prefill_chunk=1))
    assert [f.id for f in findings if f.severity == "error" and f.id == "rknn.prefill_chunk"] == ["rknn.prefill_chunk"]
    _, findings = check(RknnRequest(model=TINY, out=tmp_path, prefill_chunk=0))
    assert not [f for f in findings if f.id == "rknn.prefill_chunk"]


# --- a converted bundle with prefill graphs, through LLM (simulator) ----------------------------------------

CHUNK = 16  # several chunk boundaries and the 64-token window wrap within a short prompt


@pytest.fixture(scope="module")
def prefill_bundle(tmp_path_factory) -> Path:
    """fp16, two layer graphs (layers 0 and 1-2: two prefill graphs sharing the decode graphs' weights), one head."""
    if not has_rknn_toolkit():
        pytest.skip("rknn-toolkit2 is not installed")
    from rkedge.convert.rknn.pipeline import RknnRequest, convert_rknn

    out = tmp_path_factory.mktemp("rknn-prefill")
    result = convert_rknn(RknnRequest(model=TINY, out=out, dtype="fp16", graph_params=300_000, eval_steps=16,
                                      eval_text=str(HELD_OUT), prefill_chunk=CHUNK))
    assert result.bundle is not None
    assert any(line.startswith(f"chunked prefill (T = {CHUNK}, weights shared) vs transformers: max logit")
               for line in result.render())
    return result.bundle


@pytest.fixture(scope="module")
def old_bundle(prefill_bundle, tmp_path_factory) -> Path:
    """The same bundle as an older rkedge wrote it: no ``prefill`` section (prompts run token by token)."""
    import shutil

    copy = tmp_path_factory.mktemp("rknn-old") / prefill_bundle.name
    shutil.copytree(prefill_bundle, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    del manifest["prefill"]
    (copy / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return copy


def _prompt(length: int, skip: int = 0) -> str:
    return HELD_OUT.read_bytes()[skip:skip + length].decode("ascii")


@needs_simulator
@pytest.mark.timeout(900)  # a conversion: ~1 minute on an idle 2-core host
def test_the_bundle_holds_verified_prefill_graphs_that_share_the_decode_weights(prefill_bundle):
    manifest = json.loads((prefill_bundle / "bundle.json").read_text())
    prefill = manifest["prefill"]
    assert prefill["chunk"] == CHUNK and prefill["lengths"] == [CHUNK, 1]
    assert prefill["weights"] == "shared" and prefill["serves_decode"]
    assert [g["layers"] for g in prefill["graphs"]] == [g["layers"] for g in manifest["graphs"]] == [[0], [1, 2]]
    for graph in prefill["graphs"]:
        assert (prefill_bundle / graph["rknn"]).stat().st_size == graph["rknn_bytes"] > 0
        assert graph["simulator"]["dynamic_input"], "one model for T and 1"
    assert prefill["extra_bytes"] == (sum(g["rknn_bytes"] for g in prefill["graphs"])
                                      - sum(g["rknn_bytes"] for g in manifest["graphs"]))
    checked = prefill["verification"]
    assert checked["tokens"] > 64 + 2 * CHUNK and checked["max_abs_diff"] < 1e-4  # past the window, torch
    assert "chunked prefill" in (prefill_bundle / "README.md").read_text()


@needs_simulator
def test_llm_through_the_prefill_graphs_generates_what_token_by_token_generates(prefill_bundle, old_bundle):
    from rkedge.manifest import read_manifest
    from rkedge.runtime import LLM

    prompt = _prompt(150)  # 151 tokens with BOS: 9 chunks of 16 (across the 64-token window) + 7 decode steps
    old = read_manifest(old_bundle)
    assert old is not None and old.prefill is None and "prefill" in old.omitted
    texts = {}
    for name, bundle in (("prefill", prefill_bundle), ("token by token", old_bundle)):
        with LLM(bundle, library="mock", max_new_tokens=24, ignore_eos_token=True) as llm:
            prefill_set = llm.backend.loop.prefill_set
            assert (prefill_set is not None) == (name == "prefill")
            result = llm.generate(prompt, stream=False)
            assert result.stats.prompt_tokens == 151 and result.stats.completion_tokens == 24
            texts[name] = result.text
    assert texts["prefill"] == texts["token by token"]


@needs_simulator
def test_a_chat_turn_prefills_only_its_new_tokens_from_the_kept_state(prefill_bundle):
    from rkedge.runtime import LLM

    first_text, second_text = _prompt(40, skip=300), _prompt(45, skip=900)
    with LLM(prefill_bundle, library="mock", max_new_tokens=10, ignore_eos_token=True) as llm:
        loop = llm.backend.loop
        session = llm.chat_session()
        first = session.send(first_text, stream=False)
        after_first = loop.position
        second = session.send(second_text, stream=False)
        # only the new turn went in (not the whole conversation again), from the state the first turn left
        assert 45 <= second.stats.prompt_tokens < after_first
        assert loop.position == after_first + second.stats.prompt_tokens + 10
        whole = llm.generate(first_text + first.text + second_text, stream=False)
    assert whole.text == second.text, "the second turn continued from the kept state"


@needs_simulator
def test_the_chunked_path_in_the_simulator_matches_transformers_on_a_100_token_prompt(prefill_bundle, tiny_model):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    from rkedge.runtime._stderr import capture_native_output
    from rkedge.runtime.rknn.bundle import read_bundle
    from rkedge.runtime.rknn.engine import SimulatorGraphs
    from rkedge.runtime.rknn.loop import DecodeLoop, bundle_graphs
    from rkedge.runtime.rknn.prefill import run_prefill

    folder, manifest = read_bundle(prefill_bundle)
    tokens = held_out_tokens(100)  # 6 chunks of 16 through the window wrap, then 4 decode steps at T = 1
    with capture_native_output():
        runner = SimulatorGraphs(folder, bundle_graphs(manifest, prefill=True))
        try:
            loop = DecodeLoop.from_bundle(folder, manifest, runner, prefill=True)
            prefill = loop.prefill_set
            assert prefill is not None and prefill.first_index == 0
            ours = run_prefill(loop, prefill.graphs, runner, tokens, prefill.lengths, all_logits=True)
        finally:
            runner.release()
    with torch.no_grad():
        reference = tiny_model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float().numpy()
    cosine = (reference * ours).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(ours, axis=-1))
    ref_c, ours_c = reference - reference.mean(-1, keepdims=True), ours - ours.mean(-1, keepdims=True)
    centred = (ref_c * ours_c).sum(-1) / (np.linalg.norm(ref_c, axis=-1) * np.linalg.norm(ours_c, axis=-1))
    print(f"bundle in the simulator, fp16, 100 tokens: min cosine {cosine.min():.7f}, centred {centred.min():.7f}")
    assert loop.position == 100
    assert cosine.min() >= 0.999 and centred.min() >= 0.999  # issue 16 acceptance
    assert (reference.argmax(-1) == ours.argmax(-1)).mean() >= 0.98


@needs_simulator
@pytest.mark.timeout(900)  # a conversion: ~1 minute on an idle 2-core host
def test_prefill_chunk_0_converts_a_bundle_without_prefill_that_still_runs(tmp_path, old_bundle):
    from rkedge.runtime import LLM

    proc = run_cli("convert", str(TINY), "--backend", "rknn", "--dtype", "fp16", "--out", str(tmp_path),
                   "--prefill-chunk", "0", "--eval-steps", "8", "--eval-text", str(HELD_OUT), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = Path(json.loads(proc.stdout)["output"])
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert "prefill" not in manifest and not list(bundle.glob("prefill*"))
    prompt = _prompt(100, skip=2000)
    with LLM(bundle, library="mock", max_new_tokens=12, ignore_eos_token=True) as llm:
        assert llm.backend.loop.prefill_set is None
        text = llm.generate(prompt, stream=False).text
    with LLM(old_bundle, library="mock", max_new_tokens=12, ignore_eos_token=True) as llm:
        assert text == llm.generate(prompt, stream=False).text
