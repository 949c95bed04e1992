"""bitsandbytes checkpoints as inputs: rkedge's streaming dequantization against bitsandbytes' own, on CPU.

Tiny Llama, Gemma and RecurrentGemma models are made in code, saved in bf16, quantized by transformers +
bitsandbytes (4-bit nf4 and fp4, each with and without double quantization; 8-bit LLM.int8 with SCB) and saved
again; ``rkedge.convert.bnb.dequantize_checkpoint`` must give back exactly the weights bitsandbytes dequantizes
to, and the same logits as the quantized model after ``model.dequantize()`` (cosine >= 0.9999).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

from rkedge.convert.bnb import (  # noqa: E402
    SourceQuantization,
    base_model_name,
    dequantize_checkpoint,
    quality_warning,
    quantization_of,
)
from rkedge.errors import InputError  # noqa: E402

TINY = {
    "llama": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 320},
    "gemma": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 320},
    "recurrent_gemma": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
                        "num_attention_heads": 4, "num_key_value_heads": 1, "lru_width": 128, "vocab_size": 320,
                        "attention_window_size": 16},
}
SCHEMES = {
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "fp4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}


@pytest.fixture(scope="module", params=list(TINY))
def float_checkpoint(request, tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    kind = request.param
    config = AutoConfig.for_model(kind, **TINY[kind])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    with torch.no_grad():  # small random norms and biases, so a wrong scale or offset shows in the logits
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp(f"float-{kind}")
    model.save_pretrained(folder)
    return kind, folder


def quantize(folder: Path, scheme: str, out: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.bfloat16, **SCHEMES[scheme]),
        device_map="cpu")
    quantized.save_pretrained(out)
    return quantized.eval()


def bnb_dequantized_weights(model) -> dict[str, object]:
    """Each quantized Linear's weight as bitsandbytes itself dequantizes it."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[f"{name}.weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            dequantized = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
            weights[f"{name}.weight"] = dequantized.to(torch.bfloat16)
    return weights


def cosine(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_dequantized_checkpoint_equals_bitsandbytes(float_checkpoint, scheme, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    kind, folder = float_checkpoint
    quantized = quantize(folder, scheme, tmp_path / "quantized")
    source = quantization_of(tmp_path / "quantized")
    assert source is not None and source.dequantizable
    assert (source.bits, source.quant_type, source.double_quant) == (
        (8, "int8", False) if scheme == "int8" else (4, scheme.split("-")[0], scheme.endswith("double")))

    lines: list[str] = []
    info = dequantize_checkpoint(tmp_path / "quantized", tmp_path / "plain", progress=lines.append,
                                 shard_bytes=60_000)  # several output shards from one input file
    expected = bnb_dequantized_weights(quantized)
    assert info.tensors_dequantized == len(expected) > 0
    assert len(info.shards) > 1 and lines
    ours = {}
    for shard in info.shards:
        ours.update(load_file(str(tmp_path / "plain" / shard)))
    for name, weight in expected.items():
        assert ours[name].dtype == weight.dtype == torch.bfloat16, name
        assert torch.equal(ours[name], weight), f"{name} differs from bitsandbytes' dequantization"
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert config["rkedge_source_quantization"]["quant_type"] == source.quant_type
    assert quantization_of(tmp_path / "plain") is None

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16).eval()
    # bitsandbytes' dequantized model: the architecture with bitsandbytes' weights (transformers' own
    # model.dequantize() fails in 5.24 on CPU: it passes the dtype name where a device is expected)
    reference_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    missing = reference_model.load_state_dict(expected, strict=False)
    assert not missing.unexpected_keys
    tokens = torch.randint(3, TINY[kind]["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = reference_model(input_ids=tokens).logits.float()
        logits = plain(input_ids=tokens).logits.float()
    assert cosine(reference, logits) >= 0.9999
    assert torch.equal(reference.argmax(-1), logits.argmax(-1))


def test_a_plain_checkpoint_is_not_quantized(float_checkpoint, tmp_path):
    _, folder = float_checkpoint
    assert quantization_of(folder) is None
    with pytest.raises(InputError, match="not a bitsandbytes"):
        dequantize_checkpoint(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_quantization_methods_are_recognised_but_not_dequantized(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    source = quantization_of(tmp_path)
    assert source == SourceQuantization("gptq") and not source.dequantizable
    with pytest.raises(InputError, match="gptq"):
        dequantize_checkpoint(tmp_path, tmp_path / "out")


def test_the_warning_names_the_source():
    source = SourceQuantization("bitsandbytes", 4, "nf4", True, "bfloat16")
    assert source.describe() == "bitsandbytes 4-bit nf4 with double quantization"
    assert "bounded by" in quality_warning(source) and source.describe() in quality_warning(source)


def test_the_base_model_comes_from_the_card_or_the_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "google/gemma-2b-it"}))
    assert base_model_name(tmp_path) == "google/gemma-2b-it"
    (tmp_path / "README.md").write_text("---\nlicense: gemma\nbase_model:\n- google/recurrentgemma-2b-it\n---\n# x\n")
    assert base_model_name(tmp_path) == "google/recurrentgemma-2b-it"
    (tmp_path / "README.md").write_text("no front matter")
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "/tmp/some/folder"}))
    assert base_model_name(tmp_path) is None
