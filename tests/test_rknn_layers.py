"""RKNN layers and CPU fallbacks per built graph (convert/rknn/layers.py) and their cost in the decode prediction.

The counts come from rknn-toolkit2's own layer table, read by the build worker while the toolkit builds. Without
the toolkit, a stand-in rknn.api that prints a table in the toolkit's format drives the worker; with it, real
builds of the tiny RecurrentGemma and of a graph with an op rk3588 runs on the CPU (Exp).
"""

from __future__ import annotations

import json

import pytest
from rknn_helpers import DATA, HELD_OUT, TINY, needs_simulator

from rkedge.convert import rknn_plan
from rkedge.convert.rknn.layers import count_layers, is_raised_level_line, rows_by_layer
from rkedge.convert.rknn_plan import (
    RKNN_CPU_OP_MS,
    RKNN_LAYER_MS,
    decode_layer_count,
    griffin_shape,
    predict_griffin,
)

CONFIG_2B = DATA / "configs" / "recurrentgemma-2b-it.json"

# The table as librknnc prints it at RKNN_LOG_LEVEL=3 (rknn-toolkit2 2.5.0; rows of a tiny decode step's build,
# shortened): colour codes and timestamps included.
TABLE = """\
D RKNN: [12:18:38.966] --------------------------------------------------------------------------------------------
D RKNN: [12:18:38.966]                                  Network Layer Information Table
D RKNN: [12:18:38.966] --------------------------------------------------------------------------------------------
D RKNN: [12:18:38.966] ID   OpType             DataType Target InputShape                               OutputShape            Cycles(DDR/NPU/Total)    RW(KB)       FullName
D RKNN: [12:18:38.966] --------------------------------------------------------------------------------------------
D RKNN: [12:18:38.966] 0    InputOperator      FLOAT16  CPU    \\                                        (1,1,128)              0/0/0                    0            InputOperator:x
D RKNN: [12:18:38.966] 5    InputOperator      FLOAT16  CPU    \\                                        (1,3,128)              0/0/0                    0            InputOperator:conv0
D RKNN: [12:18:38.966] 12   exNorm             FLOAT16  NPU    (1,128,1,1),(1,128,1,1),(1,128,1,1)      (1,128,1,1)            0/0/0                    0            exNorm:/blocks.0/ReduceMean_2rmsn
D RKNN: [12:18:38.966] 13   Conv               FLOAT16  NPU    (1,128,1,1),(128,128,1,1),(128)          (1,128,1,1)            1429/512/1429            32           Conv:/blocks.0/linear_x/MatMul#2
D RKNN: [12:18:38.966] 16   Reshape            FLOAT16  NPU    (1,3,128),(4)                            (1,3,1,128)            0/0/0                    0            Reshape:conv0_rs
D RKNN: [12:18:38.966] 30   Exp                FLOAT16  CPU    (1,1,1,128)                              (1,1,1,128)            0/0/0                    2            Exp:/blocks.0/rg_lru/Exp
D RKNN: [12:18:38.966] 36   Reshape            FLOAT16  NPU    (1,3,1,128),(3)                          (1,3,128)              0/0/0                    2            Reshape:new_conv0-rs
D RKNN: [12:18:38.966] 37   OutputOperator     FLOAT16  CPU    (1,3,128)                                \\                      0/0/0                    0            OutputOperator:new_conv0
D RKNN: [12:18:38.966] 142  Reshape            FLOAT16  NPU    (1,128,1,1),(3)                          (1,1,128)              0/0/0                    0            Reshape:x_out-rs
D RKNN: [12:18:38.966] --------------------------------------------------------------------------------------------
D RKNN: [12:18:38.972]                                  Feature Tensor Information Table
D RKNN: [12:18:38.972] ID  User           Tensor          DataType  DataFormat   OrigShape    NativeShape   |  [Start  End)  Size
D RKNN: [12:18:38.972] 11  Reshape        x               FLOAT16   UNDEFINED    (1,1,128)    (1,1,128)     | 0x00000000 0x00000100 0x00000100
"""




# --- the table ------------------------------------------------------------------------------------------------

def test_the_table_is_counted_by_target_with_the_graph_io_apart():
    count = count_layers(TABLE)
    assert count is not None
    assert (count.npu, count.cpu, count.io) == (5, 1, 3)
    assert count.cpu_ops == ["Exp:/blocks.0/rg_lru/Exp"]
    assert count.op_types == {"exNorm": 1, "Conv": 1, "Reshape": 3, "Exp": 1}
    assert count.to_dict()["source"].startswith("rknn-toolkit2's Network Layer Information Table")


def test_the_last_table_counts_and_no_table_is_no_count():
    other = TABLE.replace("Exp                FLOAT16  CPU", "Elu                FLOAT16  NPU").replace(
        "Exp:/blocks.0/rg_lru/Exp", "Elu:/blocks.0/rg_lru/Elu")
    count = count_layers(TABLE + "I some line between builds\n" + other)
    assert count is not None and (count.npu, count.cpu) == (6, 0)
    assert count_layers("I rknn building ...\nI rknn building done.\n") is None


def test_rows_are_attributed_to_their_model_layer():
    from rkedge.convert.rknn.layers import LayerTableReader

    reader = LayerTableReader()
    for line in TABLE.splitlines():
        reader.feed(line)
    by_layer = rows_by_layer(reader.tables[-1])
    assert sorted(by_layer, key=str) == [0, None]
    assert [r[2] for r in by_layer[None]] == ["InputOperator:x", "InputOperator:conv0", "OutputOperator:new_conv0",
                                              "Reshape:x_out-rs"]
    assert len(by_layer[0]) == 5


def test_only_the_lines_of_the_raised_log_level_are_held_back():
    assert is_raised_level_line("D RKNN: [12:18:38.966] 30   Exp ...")
    assert is_raised_level_line("\x1b[1;33mW\x1b[0m RKNN: [12:19:00.558] LayoutMatchManager: ...")
    assert is_raised_level_line("D base_optimize ...")
    assert not is_raised_level_line("I rknn building done.")
    assert not is_raised_level_line("\x1b[1;33mW\x1b[0m \x1b[1;33mload_onnx: The config.mean_values is None\x1b[0m")
    assert not is_raised_level_line("E RKNN: [12:19:00.558] Meet unsupported op")


# --- the build worker, with a stand-in toolkit that prints a table --------------------------------------------

FAKE_RKNN_API = '''
import sys

TABLE = open(__file__.replace("api.py", "table.txt")).read()

class RKNN:
    def __init__(self, verbose=False, verbose_file=None):
        pass

    def config(self, **kwargs):
        print("I rknn-toolkit2 version: fake")
        return 0

    def load_onnx(self, model):
        return 0

    def build(self, do_quantization=False):
        sys.stdout.write("I OpFusing 0 :   0%|   | 0/100\\r")  # a progress bar leaves its line open
        sys.stdout.flush()
        print(TABLE, end="")
        return 0

    def export_rknn(self, path):
        with open(path, "wb") as out:
            out.write(b"RKNN" + bytes(60))
        return 0

    def release(self):
        pass
'''


def test_the_worker_reports_the_toolkit_table_as_an_event_and_keeps_its_debug_lines_out_of_the_log(
        tmp_path, monkeypatch):
    from rkedge.convert.rknn import pipeline
    from rkedge.convert.rknn.pipeline import RknnRequest

    package = tmp_path / "fake-rknn" / "rknn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "api.py").write_text(FAKE_RKNN_API)
    (package / "table.txt").write_text(TABLE)
    monkeypatch.setenv("PYTHONPATH", str(package.parent))
    staging = tmp_path / "staging"
    (staging / "onnx" / "g0").mkdir(parents=True)
    (staging / "onnx" / "g0" / "g0.onnx").write_bytes(b"")
    events: list[dict] = []
    result = pipeline._build_graph(staging, "g0", RknnRequest(model=TINY, out=tmp_path, dtype="fp16"), None,
                                   on_event=events.append)
    assert result["rknn_layers"]["npu"] == 5 and result["rknn_layers"]["cpu_ops"] == ["Exp:/blocks.0/rg_lru/Exp"]
    reported = [e for e in events if e["type"] == "layers"]
    assert len(reported) == 1 and reported[0]["graph"] == "g0" and reported[0]["cpu"] == 1
    lines = [e["line"] for e in events if e["type"] == "log"]
    assert "I rknn-toolkit2 version: fake" in lines
    assert not any("RKNN: [" in line for line in lines), "the table's debug lines stay out of the log"


# --- real builds (rknn-toolkit2) ---------------------------------------------------------------------------------

@needs_simulator
def test_an_op_rk3588_runs_on_the_cpu_is_found_in_a_built_graph(tmp_path):
    torch = pytest.importorskip("torch")
    from rkedge.convert.rknn import pipeline
    from rkedge.convert.rknn.pipeline import RknnRequest

    class Gate(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(-torch.sigmoid(x)) * x  # Exp: the op the RG-LRU had on the CPU

    onnx = pipeline._onnx_path(tmp_path, "g0")
    onnx.parent.mkdir(parents=True)
    torch.onnx.export(Gate(), (torch.zeros(1, 1, 64),), str(onnx), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"])
    result = pipeline._build_graph(tmp_path, "g0", RknnRequest(model=TINY, out=tmp_path, dtype="fp16"), None)
    layers = result["rknn_layers"]
    assert layers["cpu"] == 1 and layers["cpu_ops"][0].startswith("Exp:")
    assert layers["npu"] >= 2 and layers["io"] == 2  # Sigmoid and Mul on the NPU; x in, y out
    assert not list(tmp_path.glob("check*.onnx")), "the table is had without verbose's model dumps"


@needs_simulator
def test_a_tiny_conversion_records_its_layers_per_graph_and_none_falls_back_to_the_cpu(tmp_path):
    pytest.importorskip("torch")
    from rkedge.convert.rknn.pipeline import RknnRequest, convert_rknn

    # no prefill graphs (prefill_chunk 0): the decode-step graphs are the ones counted here, and it saves time
    result = convert_rknn(RknnRequest(model=TINY, out=tmp_path, dtype="fp16", eval_steps=16,
                                      eval_text=str(HELD_OUT), prefill_chunk=0))
    assert result.bundle is not None
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    assert manifest["verification"]["max_abs_diff"] < 1e-4
    graphs = [*manifest["graphs"], *manifest["heads"]]
    for graph in graphs:
        layers = graph["rknn_layers"]
        assert layers["npu"] > 0 and layers["io"] > 0
        assert layers["cpu"] == 0 and layers["cpu_ops"] == [], "Exp -> Elu and the head's layout left no CPU op"
    assert "Exp" not in graphs[0]["rknn_layers"]["op_types"] and "Elu" in graphs[0]["rknn_layers"]["op_types"]
    assert manifest["quality"]["top1_agreement"] >= 0.99


def test_the_decode_step_graph_has_no_exp():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    onnx = pytest.importorskip("onnx")
    import io

    from transformers import AutoModelForCausalLM

    from rkedge.convert.rknn.torch_graphs import build_torch_graphs

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    _, chunks, _ = build_torch_graphs(model)
    buffer = io.BytesIO()
    example = tuple(torch.zeros(shape) for shape in chunks[0].input_shapes().values())
    torch.onnx.export(chunks[0], example, buffer, opset_version=17, dynamo=False,
                      input_names=chunks[0].input_names(), output_names=chunks[0].output_names())
    ops = [node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node]
    assert "Exp" not in ops and ops.count("Elu") == 2 * sum(k == "recurrent" for k in chunks[0].dims.kinds)


# --- the decode prediction --------------------------------------------------------------------------------------

def test_the_decode_time_is_bytes_over_bandwidth_plus_the_layer_term():
    from rkedge.convert.perf_model import load_perf_model

    shape = griffin_shape(json.loads(CONFIG_2B.read_text()))
    p = predict_griffin(shape)
    assert p.bandwidth_ms == pytest.approx(p.bytes_per_token / (load_perf_model().bandwidth_gbs * 1e9) * 1000)
    assert 500 < p.rknn_layers < 3000 and p.cpu_ops == 0
    assert p.layer_ms == pytest.approx(p.rknn_layers * RKNN_LAYER_MS + p.cpu_ops * RKNN_CPU_OP_MS)
    assert 1000 / p.decode_tokens_per_s == pytest.approx(p.bandwidth_ms + p.layer_ms)
    assert p.layer_ms > 0.1 * p.bandwidth_ms, "~1,400 layers: over a tenth of the token time at the assumed cost"


def test_cpu_fallbacks_and_more_graphs_cost_decode_time(monkeypatch):
    shape = griffin_shape(json.loads(CONFIG_2B.read_text()))
    fewer, _ = decode_layer_count(shape, chunk_graphs=1)
    more, _ = decode_layer_count(shape, chunk_graphs=4)
    assert more > fewer, "every chunk graph has its own input and output rows"
    base = predict_griffin(shape)
    monkeypatch.setitem(rknn_plan.RKNN_CPU_OPS, "recurrent", 2)  # the Exp pair, as before the rewrite
    slower = predict_griffin(shape)
    assert slower.cpu_ops == 2 * shape.recurrent_layers
    assert slower.layer_ms == pytest.approx(base.layer_ms + slower.cpu_ops * RKNN_CPU_OP_MS)
    assert slower.decode_tokens_per_s < base.decode_tokens_per_s


def test_rkedge_plan_prints_the_layer_count_and_its_cost():
    from rkedge.convert.plan import plan_model

    report = plan_model(CONFIG_2B, ram_gb=8)
    p = predict_griffin(griffin_shape(json.loads(CONFIG_2B.read_text())))
    note = next(n for n in report.notes if "RKNN layers" in n)
    assert f"{p.rknn_layers} RKNN layers" in note and f"+{p.layer_ms:.1f} ms" in note and "assumed" in note
    assert report.prediction["rknn_layers"] == p.rknn_layers
