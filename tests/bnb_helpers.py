"""bitsandbytes checkpoints for the tests: tiny models quantized by transformers + bitsandbytes on CPU and saved as
the Hub uploads are (``save_pretrained`` of the quantized model), and bitsandbytes' own dequantization of them
(the reference rkedge's must equal). torch, transformers and bitsandbytes are imported inside the functions."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

TINY: dict[str, dict[str, Any]] = {
    "llama": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 320},
    "gemma": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 320},
    "recurrent_gemma": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
                        "num_attention_heads": 4, "num_key_value_heads": 1, "lru_width": 128, "vocab_size": 320,
                        "attention_window_size": 16},
}
SCHEMES: dict[str, dict[str, Any]] = {
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "fp4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
#: What a quantized upload carries besides its weights and config (copied from the float checkpoint).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")


def quantize(folder: Path, scheme: str, out: Path, *, dtype: Any = None, max_shard_size: str | None = None) -> Any:
    """The float checkpoint ``folder`` quantized by bitsandbytes (``SCHEMES[scheme]``, compute dtype bfloat16),
    saved to ``out`` with ``folder``'s tokenizer files; returns the quantized model (eval mode). ``dtype``: what
    the float weights are loaded in first (their dtype in the checkpoint by default)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.bfloat16, **SCHEMES[scheme]),
        device_map="cpu", **({"dtype": dtype} if dtype is not None else {}))
    quantized.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    return quantized.eval()


def bnb_dequantized_weights(model: Any, int8_dtype: Any = None) -> dict[str, Any]:
    """Each quantized Linear's weight as bitsandbytes itself dequantizes it (an int8 weight cast to
    ``int8_dtype``, bfloat16 by default)."""
    import bitsandbytes as bnb
    import torch

    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[f"{name}.weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            dequantized = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
            weights[f"{name}.weight"] = dequantized.to(int8_dtype or torch.bfloat16)
    return weights


def bnb_reference_model(float_folder: Path, weights: dict[str, Any], dtype: Any) -> Any:
    """bitsandbytes' dequantized model: the float checkpoint's architecture holding bitsandbytes' dequantized
    weights (transformers' own ``model.dequantize()`` fails in 5.24 on CPU: it passes the dtype name where a
    device is expected)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_folder, dtype=dtype).eval()
    loaded = model.load_state_dict(weights, strict=False)
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    return model


def cosine(a: Any, b: Any) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()))
