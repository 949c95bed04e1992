"""rkedge.lora.adapter: inspection from headers and validation against a base (no merges here)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from lora_helpers import make_adapter, q_proj_pair, save_tiny, write_adapter  # noqa: E402

from rkedge._fs import sha256_file  # noqa: E402
from rkedge.errors import InputError  # noqa: E402
from rkedge.lora.adapter import get_pattern_key, inspect_adapter, module_rank_alpha, validate_adapter  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("base") / "tiny-llama-tied", tie=True)


def ids(findings: list) -> dict[str, str]:
    return {f.id: f.severity for f in findings}


def test_inspect_reads_config_and_headers(llama: Path, tmp_path: Path) -> None:
    make_adapter(llama, tmp_path / "ad", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"],
                 modules_to_save=["lm_head"], rank_pattern={"v_proj": 2},
                 alpha_pattern={"layers.1.self_attn.q_proj": 4})
    info = inspect_adapter(tmp_path / "ad")
    assert info.peft_type == "LORA" and info.r == 4 and info.lora_alpha == 16 and not info.use_dora
    assert info.base_model_name_or_path == str(llama)
    assert info.weights_sha256 == sha256_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert info.total_bytes == (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size
    by_name = {m.name: m for m in info.modules}
    q0, q1 = by_name["model.layers.0.self_attn.q_proj"], by_name["model.layers.1.self_attn.q_proj"]
    v0 = by_name["model.layers.0.self_attn.v_proj"]
    assert (q0.kind, q0.rank, q0.in_features, q0.out_features, q0.dtype) == ("linear", 4, 64, 64, "F32")
    assert q0.scaling == 16 / 4 and q1.scaling == 4 / 4
    assert (v0.rank, v0.out_features, v0.scaling) == (2, 32, 16 / 2)
    emb = by_name["model.embed_tokens"]
    assert (emb.kind, emb.rank, emb.in_features, emb.out_features) == ("embedding", 4, 256, 64)
    assert [m.name for m in info.embedding_loras] == ["model.embed_tokens"]
    saved = {s.target: s.origin for s in info.saved}
    assert saved["lm_head.weight"] == "modules_to_save"
    assert saved["model.embed_tokens.weight"] == "base_layer"  # peft's save_embedding_layers copy
    assert json.loads(json.dumps(info.to_dict()))["modules"]
    assert json.loads(json.dumps(asdict(info), default=str))["modules"]  # what `rkedge inspect` prints
    assert ids(validate_adapter(info, llama)).keys() <= {"lora.dtype"}


def test_pattern_matching_is_peft_s() -> None:
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    patterns = ["q_proj", r"layers\.1\..*v_proj", "model.layers.0.mlp.down_proj", "proj", "^model.layers.1.mlp"]
    for key in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj",
                "model.layers.1.mlp.up_proj", "lm_head", "model.layers.0.self_attn.xq_proj", "q_proj"]:
        assert get_pattern_key(patterns, key) == peft_get_pattern_key(patterns, key), key
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4},
              "alpha_pattern": {"layers.0.self_attn.v_proj": 2}}
    assert module_rank_alpha(config, "model.layers.0.self_attn.v_proj") == (4, 2)
    assert module_rank_alpha(config, "model.layers.1.self_attn.v_proj") == (4, 16)
    assert module_rank_alpha(config, "model.layers.1.self_attn.xv_proj") == (8, 16)  # suffixes match at dots only


def test_pickled_adapter_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}), encoding="utf-8")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(InputError) as err:
        inspect_adapter(tmp_path)
    assert "pickle" in err.value.message and "safetensors" in (err.value.fix or "")


def test_missing_adapter_config_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        inspect_adapter(tmp_path)


def test_bad_pattern_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="regular expression"):
        inspect_adapter(write_adapter(tmp_path / "ad", q_proj_pair(0), rank_pattern={"q_proj(": 8}))


def test_dora_is_an_error(llama: Path, tmp_path: Path) -> None:
    make_adapter(llama, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    info = inspect_adapter(tmp_path / "dora")
    assert info.use_dora and any("DoRA" in u for u in info.unrecognised)
    found = {f.id: f for f in validate_adapter(info, llama)}
    assert found["lora.dora"].severity == "error" and found["lora.dora"].fix
    assert "lora.unsupported-tensor" not in found  # the magnitude vectors are reported once, as DoRA


def test_other_peft_type_is_an_error(llama: Path, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "ia3", {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l":
                                              torch.ones(32, 1)}, peft_type="IA3")
    info = inspect_adapter(folder)
    findings = validate_adapter(info, llama)
    assert [(f.id, f.severity) for f in findings] == [("lora.peft-type", "error")]
    assert "F-10" in findings[0].source


def test_modifying_inits_and_variants_are_errors(llama: Path, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "pissa", q_proj_pair(), init_lora_weights="pissa_niter_4",
                           alora_invocation_tokens=[1, 2])
    found = ids(validate_adapter(inspect_adapter(folder), llama))
    assert found["lora.init"] == "error" and found["lora.variant"] == "error"


def test_target_missing(llama: Path, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "ad", {**q_proj_pair(0), **q_proj_pair(5)}, base_model_name_or_path=str(llama))
    found = {f.id: f for f in validate_adapter(inspect_adapter(folder), llama)}
    assert found["lora.target-missing"].severity == "error"
    assert "model.layers.5.self_attn.q_proj" in found["lora.target-missing"].message
    assert "F-10" in found["lora.target-missing"].source


def test_shape_mismatch_and_base_mismatch(llama: Path, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "ad", q_proj_pair(0, in_features=96), base_model_name_or_path="org/other-model")
    found = {f.id: f for f in validate_adapter(inspect_adapter(folder), llama)}
    assert found["lora.shape"].severity == "error" and "[64, 96]" in found["lora.shape"].message
    assert found["lora.base-mismatch"].severity == "error"  # another name and the shapes do not fit


def test_rank_mismatch_between_config_and_weights(llama: Path, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "ad", q_proj_pair(0, rank=4), r=8)
    assert ids(validate_adapter(inspect_adapter(folder), llama))["lora.shape"] == "error"


def test_base_name_mismatch_with_fitting_shapes_is_refused_unless_allowed(llama: Path, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "ad", q_proj_pair(0), base_model_name_or_path="org/other-model")
    refused = {f.id: f for f in validate_adapter(inspect_adapter(folder), llama)}["lora.base-mismatch"]
    assert refused.severity == "error" and refused.fix and "--allow-base-mismatch" in refused.fix
    found = ids(validate_adapter(inspect_adapter(folder), llama, allow_base_mismatch=True))
    assert found["lora.base-mismatch"] == "warning"
    for same in (str(llama), llama.name, f"someone/{llama.name}"):
        folder = write_adapter(tmp_path / "ad2", q_proj_pair(0), base_model_name_or_path=same)
        assert "lora.base-mismatch" not in ids(validate_adapter(inspect_adapter(folder), llama)), same


def test_quantized_base_is_an_error(llama: Path, tmp_path: Path) -> None:
    base = tmp_path / "quantized"
    shutil.copytree(llama, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4"}
    (base / "config.json").write_text(json.dumps(config))
    folder = write_adapter(tmp_path / "ad", q_proj_pair(0), base_model_name_or_path=str(base))
    found = {f.id: f for f in validate_adapter(inspect_adapter(folder), base)}
    assert found["lora.quantized-base"].severity == "error"
    assert "fp16/bf16 copy of the base" in (found["lora.quantized-base"].fix or "")
    assert "F-9" in found["lora.quantized-base"].source


def test_modules_to_save_must_match_the_base(llama: Path, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "ad", {**q_proj_pair(0), "base_model.model.lm_head.weight": torch.zeros(300, 64),
                                             "base_model.model.model.extra.weight": torch.zeros(4)},
                           modules_to_save=["lm_head", "extra"])
    found = {f.id: f for f in validate_adapter(inspect_adapter(folder), llama)}
    assert "lm_head.weight" in found["lora.shape"].message and "resized" in found["lora.shape"].message
    assert "model.extra.weight" in found["lora.target-missing"].message


def test_tied_base_with_lm_head_lora_is_flagged_not_refused(tied_llama: Path, tmp_path: Path) -> None:
    make_adapter(tied_llama, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    found = ids(validate_adapter(inspect_adapter(tmp_path / "ad"), tied_llama))
    assert found["lora.tied-embeddings"] == "warning"
    assert "lora.target-missing" not in found  # lm_head exists (as the tied embedding) although not stored


def test_unreadable_base_is_an_input_error(tmp_path: Path, llama: Path) -> None:
    folder = write_adapter(tmp_path / "ad", q_proj_pair(0))
    (tmp_path / "bin-base").mkdir()
    (tmp_path / "bin-base" / "config.json").write_text("{}")
    (tmp_path / "bin-base" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="pickled"):
        validate_adapter(inspect_adapter(folder), tmp_path / "bin-base")
