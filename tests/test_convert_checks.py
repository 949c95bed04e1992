"""The planner: every known failure is caught on the host, with a finding that says why and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rkedge.convert.inspect import inspect_checkpoint
from rkedge.convert.planner import ConversionRequest, Input, plan
from rkedge.convert.rules import TOOLKIT_VERSIONS, rules_for

pytest.importorskip("transformers")
from tiny_models import make_checkpoint


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: make_checkpoint(root / kind, kind)
            for kind in ("llama", "qwen2", "gemma", "gemma2", "gemma3", "recurrent_gemma")}


def check(model: Path, version: str = "1.3.0", **options):
    request = ConversionRequest(model=model, out=model.parent / "out", **options)
    return plan(request, inspect_checkpoint(model), version, simulated_toolkit=True)


def ids(the_plan, severity="error"):
    return {f.id for f in the_plan.findings if f.severity == severity}


def test_a_valid_request_has_no_error(tiny):
    for kind in ("llama", "qwen2", "gemma", "gemma2", "gemma3"):
        result = check(tiny[kind])
        assert ids(result) == set(), [f.render() for f in result.findings]
        assert result.output_name == f"{kind}_w8a8_rk3588.rkllm"
        assert result.build_kwargs == {"do_quantization": True, "optimization_level": 0, "quantized_dtype": "w8a8",
                                       "target_platform": "rk3588", "quantized_algorithm": "normal",
                                       "num_npu_core": 3, "extra_qparams": None, "dataset": Input.CALIBRATION, "hybrid_rate": 0.0,
                                       "max_context": 4096}


def test_gemma2_grouped_dtype_on_toolkit_1_1_is_the_known_npu_malloc_failure(tiny):
    result = check(tiny["gemma2"], "1.1.1", dtype="w8a8_g128")
    finding = next(f for f in result.findings if f.id == "F-1.gemma2-rk3588-1.1")
    assert finding.severity == "error"
    assert "failed to malloc npu memory, size: 232128512" in finding.message
    assert "--dtype w8a8" in finding.fix
    assert "gemma-2-9b-it" in finding.source
    # plain w8a8 is the fix; hybrid mixes grouped types in, so it is not plain
    assert "F-1.gemma2-rk3588-1.1" not in ids(check(tiny["gemma2"], "1.1.1"))
    assert "F-1.gemma2-rk3588-1.1" in ids(check(tiny["gemma2"], "1.1.1", hybrid_rate=0.5))
    # newer toolkits and other architectures are not affected
    assert "F-1.gemma2-rk3588-1.1" not in ids(check(tiny["gemma2"], "1.2.1", dtype="w8a8_g128"))
    assert "F-1.gemma2-rk3588-1.1" not in ids(check(tiny["llama"], "1.1.1", dtype="w8a8_g128"))
    overridden = check(tiny["gemma2"], "1.1.1", dtype="w8a8_g128", allow_known_failure=True)
    assert "F-1.gemma2-rk3588-1.1" in ids(overridden, "warning") and not ids(overridden)


@pytest.mark.parametrize("dtype", ["w4a16", "w4a16_g32", "w4a16_g128"])
def test_w4a16_on_rk3588(tiny, dtype):
    result = check(tiny["llama"], dtype=dtype)
    finding = next(f for f in result.findings if f.id == "F-2")
    assert "not support quantized_dtype" in finding.message and "w8a8" in finding.fix
    assert ids(check(tiny["llama"], platform="rk3576", dtype=dtype)) == set(), "w4a16 is fine on RK3576"


@pytest.mark.parametrize(("value", "suggested"), [(5000, 5024), (20000, 16384), (100, 128)])
def test_max_context_rules(tiny, value, suggested):
    result = check(tiny["llama"], max_context=value)
    finding = next(f for f in result.findings if f.id == "F-7")
    assert "16384" in finding.message and f"--max-context {suggested}" in finding.fix
    assert ids(check(tiny["llama"], max_context=8192)) == set()
    assert "F-7" in ids(check(tiny["llama"], "1.1.4", max_context=8192)), "not settable before 1.2.0"


def test_recurrent_gemma_is_refused_with_the_reason_and_the_alternatives(tiny):
    result = check(tiny["recurrent_gemma"])
    finding = next(f for f in result.findings if f.id == "F-8")
    assert "RG-LRU" in finding.message and "no rkllm-toolkit version" in finding.message
    assert "--backend rknn" in finding.fix and "Gemma2ForCausalLM" in finding.fix


def test_an_unknown_architecture_lists_what_is_supported(tiny, tmp_path):
    folder = tmp_path / "mamba"
    shutil.copytree(tiny["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["MambaForCausalLM"], model_type="mamba")
    (folder / "config.json").write_text(json.dumps(config))
    finding = next(f for f in check(folder).findings if f.id == "F-8")
    assert "MambaForCausalLM" in finding.message and "Qwen2ForCausalLM" in finding.fix


def test_gemma3_needs_toolkit_1_2(tiny):
    finding = next(f for f in check(tiny["gemma3"], "1.1.4").findings if f.id == "F-8")
    assert "1.2.0" in finding.message and "Not support Gemma3ForCausalLM" in finding.message
    assert "F-8" not in ids(check(tiny["gemma3"], "1.2.0"))


def with_quantization_config(tiny, tmp_path, qc):
    folder = tmp_path / "quantized"
    shutil.copytree(tiny["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_bitsandbytes_checkpoints_are_refused_with_the_way_out(tiny, tmp_path):
    folder = with_quantization_config(tiny, tmp_path, {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                      "bnb_4bit_quant_type": "nf4"})
    finding = next(f for f in check(folder).findings if f.id == "F-9")
    assert "bitsandbytes" in finding.message and "dequantize" in finding.fix


def test_gptq_rules(tiny, tmp_path):
    good = {"quant_method": "gptq", "bits": 8, "group_size": 128, "sym": True, "desc_act": False}
    assert ids(check(with_quantization_config(tiny, tmp_path / "a", good))) == set()
    bad = dict(good, desc_act=True)
    assert "gptq.settings" in ids(check(with_quantization_config(tiny, tmp_path / "b", bad)))
    int4 = dict(good, bits=4, group_size=32)
    assert "F-2" in ids(check(with_quantization_config(tiny, tmp_path / "c", int4)))
    assert "gptq.version" in ids(check(with_quantization_config(tiny, tmp_path / "d", good), "1.1.4"))


def test_group_size_must_divide_the_input_dimension(tiny, tmp_path):
    folder = make_checkpoint(tmp_path / "odd", "llama", config_overrides={"intermediate_size": 320})
    result = check(folder, dtype="w8a8_g128")
    error = next(f for f in result.findings if f.id == "group-size.input")
    assert "down_proj in=320" in error.message
    warning = next(f for f in result.findings if f.id == "group-size.output")
    assert warning.severity == "warning" and "up_proj out=320" in warning.message
    assert "group-size.input" not in ids(check(folder, dtype="w8a8"))
    assert "group-size.input" in ids(check(folder, hybrid_rate=0.3)), "hybrid w8a8 mixes in w8a8_g512"


@pytest.mark.parametrize(("options", "expected"), [
    ({"hybrid_rate": 1.0}, "hybrid.range"),
    ({"npu_cores": 4}, "npu_cores.range"),
    ({"optimization_level": 2}, "optimization.range"),
    ({"algorithm": "grq", "dtype": "w8a8", "cuda_available": True}, "algorithm.dtype"),
    ({"algorithm": "grq", "platform": "rk3576", "dtype": "w4a16", "cuda_available": False}, "algorithm.cuda"),
    ({"algorithm": "normal_r99"}, "algorithm.rank"),
    ({"platform": "rk3566"}, "platform.unknown"),
])
def test_argument_rules(tiny, options, expected):
    assert expected in ids(check(tiny["llama"], **options))


def test_version_specific_arguments(tiny):
    old = check(tiny["llama"], "1.0.1")
    assert "num_npu_core" not in old.build_kwargs and "max_context" not in old.build_kwargs
    assert "hybrid.version" in ids(check(tiny["llama"], "1.0.1", hybrid_rate=0.2))
    assert "algorithm.unknown" in ids(check(tiny["llama"], "1.3.0", algorithm="gdq"))
    assert "algorithm.unknown" not in ids(check(tiny["llama"], "1.2.3", algorithm="normal_r16"))
    for version in TOOLKIT_VERSIONS:
        result = check(tiny["llama"], version)
        assert set(result.build_kwargs) <= set(rules_for(version).build_args)


def test_toolkit_python_version(tiny):
    request = ConversionRequest(model=tiny["llama"], out=tiny["llama"].parent / "o")
    found = plan(request, inspect_checkpoint(tiny["llama"]), "1.2.3", toolkit_python="3.8.10").findings
    assert any(f.id == "F-14" and "3.8" in f.message for f in found)


def prediction(weight_gib: float, embedding_gib: float = 0.25, kv_gib: float = 0.5):
    from rkedge.convert.perf_model import Prediction

    gib = 1 << 30
    return Prediction("w8a8", 4096, 128, int(weight_gib * gib), int(embedding_gib * gib), int(kv_gib * gib),
                      20 << 20, 10.0, 500.0)


def test_board_fit_and_iommu_domains(tiny):
    from rkedge.convert.planner import _check_board_fit

    request = ConversionRequest(model=tiny["llama"], out=Path("o"), board="orangepi-5")
    findings = {f.id: f for f in _check_board_fit(request, prediction(15, 2, 1))}
    assert findings["F-1.domains"].severity == "warning" and "base_domain_id=1" in findings["F-1.domains"].fix
    assert findings["board.ram"].severity == "error" and "Orange Pi 5" in findings["board.ram"].message
    assert [f.id for f in _check_board_fit(request, prediction(1))] == []
    warning = next(f for f in _check_board_fit(request, prediction(2.5)) if f.id == "board.ram")
    assert warning.severity == "warning" and "not the 4 GB one" in warning.message


def test_host_memory_check(tiny):
    from rkedge.convert.planner import _check_host_memory

    info = inspect_checkpoint(tiny["llama"])
    request = ConversionRequest(model=tiny["llama"], out=Path("o"))
    assert _check_host_memory(info, request, (10 << 30, 0)) == []
    tight = _check_host_memory(info, request, (1 << 20, 0))
    assert tight[0].id == "F-11" and tight[0].severity == "error" and "float16" in tight[0].fix


def test_export_carries_every_tokenizer_file(tiny, tmp_path):
    from rkedge.convert.export import export_checkpoint
    from rkedge.convert.inspect import TOKENIZER_FILES

    source = tmp_path / "source"
    shutil.copytree(tiny["llama"], source)
    (source / "added_tokens.json").write_text(json.dumps({"<tool>": 32000}))  # slow tokenizers need it
    out = export_checkpoint(inspect_checkpoint(source), tmp_path / "export", dtype=None, meta={})
    for name in TOKENIZER_FILES:
        assert (out / name).is_file() == (source / name).is_file(), name
    assert json.loads((out / "added_tokens.json").read_text()) == {"<tool>": 32000}


def test_a_gguf_header_is_read_with_gguf_py(tmp_path):
    """`rkedge inspect` and the simulated toolkit read GGUF files through one reader (gguf-py's GGUFReader)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from rkedge.convert.inspect import inspect_path, read_gguf_metadata
    from rkedge.errors import InputError

    path = tmp_path / "tiny-q4_k_m.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny")
    writer.add_file_type(15)
    writer.add_token_list(["a", "b", "c"])
    writer.add_bos_token_id(1)
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert inspect_path(path) == {"kind": "gguf", "path": str(path), "gguf_version": 3, "architecture": "qwen2",
                                  "name": "tiny", "file_type": "MOSTLY_Q4_K_M"}
    metadata = read_gguf_metadata(path)
    assert metadata["tokenizer.ggml.tokens"] == {"array_length": 3} and metadata["tokenizer.ggml.bos_token_id"] == 1
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(InputError, match="not a GGUF file"):
        inspect_path(not_gguf)


def test_layers_that_differ_by_design_are_not_taken_for_a_cut_checkpoint(tiny):
    # RecurrentGemma's recurrent and attention blocks hold different tensors; neither is a damaged copy.
    assert "weights.incomplete" not in ids(check(tiny["recurrent_gemma"]))


def test_a_layer_missing_one_tensor_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "cut"
    shutil.copytree(tiny["llama"], folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = "model.layers.1.self_attn.k_proj.weight"
    shard = folder / index["weight_map"].pop(victim)
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    findings = [f for f in check(folder).findings if f.id == "weights.incomplete"]
    assert findings and "layer 1 lacks self_attn.k_proj.weight" in findings[0].message
