"""bitsandbytes checkpoints as inputs: rkedge's streaming dequantization against bitsandbytes' own, on CPU.

Tiny Llama, Gemma and RecurrentGemma models are made in code, saved in bf16, quantized by transformers +
bitsandbytes (4-bit nf4 and fp4, each with and without double quantization; 8-bit LLM.int8 with SCB) and saved
again; ``rkedge.convert.bnb.dequantize_checkpoint`` must give back exactly the weights bitsandbytes dequantizes
to, and the same logits as the quantized model after ``model.dequantize()`` (cosine >= 0.9999).
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

from bnb_helpers import SCHEMES, TINY, bnb_dequantized_weights, bnb_reference_model, cosine, quantize  # noqa: E402

from rkedge.convert.bnb import (  # noqa: E402
    SourceQuantization,
    base_model_name,
    dequantize_4bit,
    dequantize_checkpoint,
    dequantize_int8,
    dequantized_view,
    quality_warning,
    quantization_of,
)
from rkedge.convert.inspect import inspect_checkpoint  # noqa: E402
from rkedge.errors import InputError  # noqa: E402


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
    # what the planner sees before anything is written is what the dequantization then writes
    planned = dequantized_view(inspect_checkpoint(tmp_path / "quantized")).tensors
    written = inspect_checkpoint(tmp_path / "plain").tensors
    assert {n: (t.dtype, t.shape, t.nbytes) for n, t in planned.items()} == \
        {n: (t.dtype, t.shape, t.nbytes) for n, t in written.items()}
    assert config["rkedge_source_quantization"]["quant_type"] == source.quant_type
    assert quantization_of(tmp_path / "plain") is None

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16).eval()
    reference_model = bnb_reference_model(folder, expected, torch.bfloat16)
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


def test_dequantizing_in_chunks_changes_nothing():
    """Each weight is dequantized a few blocks at a time (bounded memory); every element's arithmetic is the same,
    so any chunking gives the same bits, including a last block cut short."""
    bnb_functional = bnb.functional
    torch.manual_seed(3)
    weight = torch.randn(40, 99, dtype=torch.bfloat16)  # 3960 elements: 61 blocks of 64 and a short one
    for quant_type, double in (("nf4", True), ("fp4", False)):
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type,
                                                     compress_statistics=double)
        parts = {f".{k}": v for k, v in state.as_dict(packed=True).items()}  # as saved beside <m>.weight
        expected = bnb_functional.dequantize_4bit(packed, state)
        for chunk in (1, 128, 1000, 1 << 22):
            assert torch.equal(dequantize_4bit(packed, parts, chunk_elements=chunk), expected), (quant_type, chunk)
    int8 = torch.randint(-127, 128, (37, 50), dtype=torch.int8)
    scb = torch.rand(37) * 3
    expected = bnb_functional.int8_vectorwise_dequant(int8, scb).to(torch.float16)
    for chunk in (1, 60, 1 << 22):
        assert torch.equal(dequantize_int8(int8, scb, torch.float16, chunk_elements=chunk), expected)
