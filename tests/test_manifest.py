"""The typed manifest: one reader for the .rkllm sidecar and the RKNN bundle.json, exact round trips, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rkedge.errors import ModelFileError
from rkedge.manifest import KEYS, Manifest, manifest_path, read_manifest


def rkllm_manifest(**changes: Any) -> dict[str, Any]:
    """Every key convert/pipeline.py writes, in its order, with values of the types it writes."""
    data: dict[str, Any] = {
        "schema": "rkedge-manifest", "schema_version": 1, "simulated": True, "name": "gemma_w8a8_rk3588",
        "model_file": "gemma_w8a8_rk3588.rkllm", "sha256": "ab" * 32, "size": 1234,
        "lora_file": {"file": "gemma_lora.rkllm", "sha256": "cd" * 32, "size": 56},
        "architecture": "GemmaForCausalLM", "model_type": "gemma", "platform": "rk3588", "dtype": "w8a8",
        "max_context_limit": 4096, "npu_cores": 3, "chat_family": "gemma", "chat_template": "{{ bos_token }}",
        "chat_template_parts": {"system_prompt": "", "prompt_prefix": "<start_of_turn>user\n",
                                "prompt_postfix": "<end_of_turn>\n<start_of_turn>model\n"},
        "bos_token_id": 2, "eos_token_id": 1, "special_tokens": {"bos_token": "<bos>", "eos_token": "<eos>"},
        "toolkit": {"kind": "mock", "version": "1.3.0", "label": "simulated", "python": "3.11.7",
                    "reported_version": "1.3.0"},
        "rkedge_version": "0.1.0",
        "inputs": {"model": {"path": "/m", "source": None, "revision": None, "sha256": {"config.json": "00"},
                             "parameters": 10},
                   "adapter": None,
                   "calibration": {"path": "/c.json", "sha256": "11", "items": 8, "generator": "g",
                                   "languages": {"en": 6, "zh": 1}}},
        "toolkit_calls": {"load_huggingface": {"model": "/m"}, "build": {"quantized_dtype": "w8a8"},
                          "export_rkllm": {"export_path": "x.rkllm"}},
        "request": {"algorithm": "normal", "hybrid_rate": 0.0, "optimization_level": 1, "board": None,
                    "allow_known_failure": False},
        "findings": [{"id": "F-1", "severity": "warning", "message": "m", "fix": "f", "source": "s"}],
        "estimate": {"weight_bytes": 10},
        "runtime": {"recommended": {"max_context_len": 4096, "runtime_version": "1.3.0", "min_rknpu_driver": "0.9.8"}},
        "host": {"python": "3.11.7"}, "created_at": "2026-12-01T09:00:00Z", "wall_time_s": 1.5,
    }
    data.update(changes)
    return data


def bundle_manifest() -> dict[str, Any]:
    graph = {"name": "chunk0", "layers": [0, 1], "inputs": ["x"], "outputs": ["x_out"], "shapes": {"x": [1, 1, 8]},
             "rknn": "chunk0.rknn", "dtype": "fp16", "rknn_bytes": 10, "simulator": {"onnx": "chunk0/graph.onnx"},
             "fp16_tensors": [], "build_seconds": 0.5}
    head = {**graph, "name": "head0", "rknn": "head0.rknn"}
    return {"schema": "rkedge-rknn-bundle", "schema_version": 1, "backend": "rknn", "name": "rg", "architecture":
            "RecurrentGemmaForCausalLM", "platform": "rk3588", "dtype": "fp16", "hybrid": {"enabled": False},
            "graphs": [graph], "heads": [head], "dims": {"hidden": 8}, "parameters": {"layers": 2, "per_layer": [1]},
            "embedding": {"file": "embedding.npy", "dtype": "float16"}, "lm_head": "on the NPU",
            "tokenizer": {"type": "bytes", "bos_token_id": 2}, "chat_family": "gemma",
            "verification": {"max_abs_diff": 1e-3}, "versions": {"rkedge": "0.1.0"},
            "inputs": {"model": "/m", "source": None, "lora": None}, "created_at": "2026-12-01T09:00:00Z",
            "quality": {"steps": 8}, "wall_time_s": 2.0}


def write_sidecar(tmp_path: Path, data: object) -> Path:
    model = tmp_path / "m.rkllm"
    model.write_bytes(b"\0" * 16)
    manifest_path(model).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return model


def test_every_key_the_writers_produce_round_trips_in_their_order(tmp_path: Path) -> None:
    for data in (rkllm_manifest(chat_template="你好 {{ messages }}"), rkllm_manifest(eos_token_id=[128001, 128009]),
                 bundle_manifest()):
        manifest = Manifest.from_dict(data)
        assert list(manifest.to_dict()) == list(data) == [k for k in KEYS[manifest.backend] if k in data]
        assert manifest.to_dict() == data and manifest == data
        ascii_only = manifest.backend == "rknn"
        assert manifest.to_json() == json.dumps(data, indent=1, ensure_ascii=ascii_only) + "\n"


def test_fields_are_typed_and_the_mapping_view_matches(tmp_path: Path) -> None:
    manifest = read_manifest(write_sidecar(tmp_path, rkllm_manifest()))
    assert manifest is not None and manifest.backend == "rkllm" and manifest.schema == "rkedge-manifest"
    assert manifest.toolkit is not None and manifest.toolkit["version"] == "1.3.0" == manifest["toolkit"]["version"]
    assert manifest.max_context_limit == 4096 and manifest.get("chat_family") == "gemma"
    assert manifest.recommended["max_context_len"] == 4096
    copied = manifest.to_dict()
    copied["toolkit"]["version"] = "changed"
    assert manifest["toolkit"]["version"] == "1.3.0", "to_dict hands out a copy"
    with pytest.raises(AttributeError):
        manifest.dtype = "w4a16"  # frozen


def test_hand_written_and_older_files_round_trip_too(tmp_path: Path) -> None:
    """Doctor's test fixtures write only some keys, and unknown keys survive."""
    minimal = {"schema": "rkedge-manifest", "schema_version": 1, "model_file": "m.rkllm", "sha256": "0", "size": 1,
               "platform": "rk3588", "dtype": "w8a8", "toolkit": {"version": "1.1.4"}, "max_context_limit": 4096,
               "toolkit_calls": {}, "from_the_future": {"x": 1}}
    manifest = Manifest.from_dict(minimal)
    assert manifest.to_dict() == minimal and manifest.extra == {"from_the_future": {"x": 1}}
    assert "simulated" not in manifest and manifest.simulated is False


def test_a_manifest_built_in_code_writes_every_key_of_its_backend() -> None:
    data = rkllm_manifest()
    fields = {k: v for k, v in data.items() if k != "schema"}
    assert Manifest(**fields).to_dict() == data
    with pytest.raises(ModelFileError, match="lacks model_file"):
        Manifest(**{**fields, "model_file": None})


def test_read_manifest_finds_the_bundle_of_a_folder(tmp_path: Path) -> None:
    (tmp_path / "bundle.json").write_text(json.dumps(bundle_manifest()))
    for where in (tmp_path, tmp_path / "bundle.json"):
        manifest = read_manifest(where)
        assert manifest is not None and manifest.backend == "rknn" and manifest.graphs is not None
        assert manifest.graphs[0]["rknn"] == "chunk0.rknn"


def test_no_manifest_is_none(tmp_path: Path) -> None:
    model = tmp_path / "vendor.rkllm"
    model.write_bytes(b"\0")
    assert read_manifest(model) is None


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"schema": "something-else"}), "not an rkedge manifest"),
    (json.dumps(rkllm_manifest(schema_version=99)), "newer than this rkedge understands"),
    (json.dumps(rkllm_manifest(schema_version="one")), "schema_version that is not a number"),
    (json.dumps({k: v for k, v in rkllm_manifest().items() if k != "sha256"}), "lacks sha256"),
    (json.dumps(rkllm_manifest(max_context_limit="4096")), "max_context_limit is str"),
    (json.dumps(rkllm_manifest(toolkit="1.3.0")), "toolkit is str"),
    (json.dumps(rkllm_manifest(simulated=1)), "simulated is int"),
    (json.dumps(bundle_manifest()), "not an rkedge manifest"),
])
def test_corrupt_or_incompatible_files_are_refused_with_a_fix(tmp_path: Path, content: str, message: str) -> None:
    model = tmp_path / "m.rkllm"
    manifest_path(model).write_text(content)
    with pytest.raises(ModelFileError, match=message) as caught:
        read_manifest(model)
    assert caught.value.fix, "every refusal says what to do"


def test_the_file_convert_writes_reads_back_byte_for_byte(tmp_path: Path, calibration_prompts: Path) -> None:
    pytest.importorskip("transformers")
    from tiny_models import make_checkpoint

    from rkedge.convert.pipeline import convert
    from rkedge.convert.planner import ConversionRequest

    checkpoint = make_checkpoint(tmp_path / "gemma", "gemma")
    result = convert(ConversionRequest(model=checkpoint, out=tmp_path / "out", toolkit="mock", toolkit_version="1.3.0",
                                       calibration=str(calibration_prompts)))
    assert result.model_file is not None
    manifest = read_manifest(result.model_file)
    assert manifest is not None and not manifest.omitted and not manifest.extra, "the typed fields cover every key"
    assert manifest.to_json() == manifest_path(result.model_file).read_text(encoding="utf-8")


@pytest.fixture
def calibration_prompts(tmp_path: Path) -> Path:
    """Prompts with targets given: the float-model generation step is skipped."""
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps([{"prompt": p, "target": "ok"} for p in ("Hello!", "What is an NPU?", "你好", "2+2?")]))
    return path


def test_the_runtime_reads_the_manifest_and_ignores_a_broken_one_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from rkedge.runtime.rkllm_backend import load_model_metadata

    model = write_sidecar(tmp_path, rkllm_manifest())
    metadata = load_model_metadata(model)
    assert metadata["chat_family"] == "gemma" and metadata["recommended"]["max_context_len"] == 4096, \
        "the recommended runtime settings are merged in, as before"
    for broken in ("{not json", json.dumps(rkllm_manifest(schema_version=99)), json.dumps({"chat_family": "gemma"})):
        manifest_path(model).write_text(broken)
        caplog.clear()
        with caplog.at_level("WARNING", logger="rkedge.runtime"):
            assert load_model_metadata(model) == {}
        assert "ignoring the manifest" in caplog.text, "the model still loads; the warning says why"


def test_special_tokens_reach_the_runtime_template(tmp_path: Path) -> None:
    """The manifest's Hugging Face template and special tokens are what LLM renders with (load_model_metadata)."""
    from rkedge.runtime.rkllm_backend import load_model_metadata

    data = {**rkllm_manifest(), "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}
    model = tmp_path / "m.rkllm"
    model.write_bytes(b"x")
    (tmp_path / "m.rkllm.json").write_text(json.dumps(data))
    meta = load_model_metadata(model)
    assert meta["special_tokens"] == {"bos_token": "<bos>", "eos_token": "<eos>"}
    bad = {**data, "special_tokens": ["<bos>"]}
    with pytest.raises(ModelFileError, match="special_tokens"):
        Manifest.from_dict(bad)


def test_inspect_reads_a_model_manifest_through_the_one_reader(tmp_path: Path) -> None:
    from rkedge.convert.inspect import inspect_rkllm
    from rkedge.runtime.simmodel import simulated_manifest, write_simulated_model

    model = write_simulated_model(tmp_path / "m.rkllm", simulated_manifest())
    sidecar = tmp_path / "m.rkllm.json"
    sidecar.write_text("[1, 2]")  # not a manifest: reported, not shown as if it were one
    info = inspect_rkllm(model)
    assert info["manifest"] is None and "manifest" in info["manifest_problem"]
