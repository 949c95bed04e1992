"""The RKNN quality report runs each graph's simulation in its own child process (convert/rknn/quality_worker.py).

Its figures equal the in-process simulation's, and a simulator that dies in native code (SIGSEGV) becomes an
error naming the graph, with no bundle written. Needs rknn-toolkit2 (skips where it has no wheel).
"""

from __future__ import annotations

import json
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
np = pytest.importorskip("numpy")

from rknn_helpers import HELD_OUT, TINY, has_rknn_toolkit, held_out_tokens  # noqa: E402

from rkedge.convert.rknn import quality_worker  # noqa: E402
from rkedge.convert.rknn.pipeline import RknnRequest, convert_rknn  # noqa: E402
from rkedge.convert.rknn.quality import compare, measure_quality, simulator_loop  # noqa: E402
from rkedge.convert.rknn.torch_graphs import torch_loop  # noqa: E402
from rkedge.errors import ToolkitError  # noqa: E402

pytestmark = pytest.mark.skipif(not has_rknn_toolkit(),
                                reason="rknn-toolkit2 is not installed (x86_64, CPython 3.6-3.12 only; "
                                       "scripts/install-rknn-toolkit2.sh)")


def test_child_process_quality_equals_the_in_process_simulation(tmp_path):
    # Two chunk graphs and two head slices: states chained across children, logits concatenated.
    result = convert_rknn(RknnRequest(model=TINY, out=tmp_path, dtype="fp16", graph_params=30_000, eval_steps=4,
                                      eval_text=str(HELD_OUT)))
    assert result.bundle is not None
    bundle = json.loads((result.bundle / "bundle.json").read_text())
    assert len(bundle["graphs"]) >= 2 and len(bundle["heads"]) == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    tokens = held_out_tokens(25)
    reference = torch_loop(model).teacher_forced_logits(tokens[:-1])
    children = measure_quality(result.bundle, bundle, reference, tokens)
    in_process = compare(reference, simulator_loop(result.bundle, bundle, lazy=True), tokens)
    assert children["steps"] == 24
    assert {k: children[k] for k in in_process} == in_process
    assert not list(result.bundle.glob(".quality-*")), "the children's input and output files are removed"


def test_a_simulator_crash_is_an_error_naming_the_graph_and_leaves_no_bundle(tmp_path, monkeypatch):
    crash = "import os, signal, sys; print('simulating', file=sys.stderr); os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(quality_worker, "WORKER_COMMAND", [sys.executable, "-c", crash, "--job"])
    with pytest.raises(ToolkitError) as caught:
        convert_rknn(RknnRequest(model=TINY, out=tmp_path, dtype="fp16", eval_steps=4, eval_text=str(HELD_OUT)))
    message = str(caught.value)
    assert "graph chunk0" in message and "SIGSEGV" in message and "simulating" in message
    assert "--graph-params" in caught.value.fix and "--eval-steps" in caught.value.fix
    assert [p.name for p in tmp_path.iterdir()] == [], "neither a partial nor a complete-looking bundle"


def test_a_child_that_fails_without_a_result_is_an_error(tmp_path):
    folder = tmp_path / "bundle"
    folder.mkdir()
    inputs = folder / "x.npy"
    np.save(inputs, np.zeros((2, 1, 1, 8), np.float32))
    graph = {"name": "head0", "inputs": ["x"], "outputs": ["logits"], "shapes": {"x": [1, 1, 8]},
             "simulator": {"build": "float", "onnx": "missing.onnx"}}
    dims = {"rotary_dim": 4, "rope_theta": 10000.0, "window": 4}
    with pytest.raises(ToolkitError, match="could not simulate graph head0") as caught:
        quality_worker.run_graph(folder, graph, "head", dims, inputs, folder / "out.npy")
    assert "rknn-toolkit2 version" in caught.value.fix
