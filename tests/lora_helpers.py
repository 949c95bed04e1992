"""Tiny seeded models and peft adapters for the LoRA tests (imported only after torch/peft are known present)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

TOKENS = torch.tensor([[1, 5, 9, 33, 200, 7, 64, 128]])


def _quiet() -> None:
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", module="transformers")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def save_tiny(kind: str, path: Path, *, tie: bool = False, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """A seeded random tiny ``llama``, ``qwen2`` (q/k/v biases) or ``gpt2`` (Conv1D), saved sharded (100KB)."""
    _quiet()
    torch.manual_seed(seed)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=256,
                                             intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=tie))
    elif kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_hidden_layers=2, vocab_size=256,
                                             intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=tie))
        with torch.no_grad():  # freshly initialised biases are zero; make them count
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.02)
    elif kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
    else:
        raise ValueError(kind)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}), encoding="utf-8")
    (path / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    return path


def load_base(path: Path, dtype: torch.dtype | None = None) -> Any:
    _quiet()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")


def make_adapter(base_dir: Path, out_dir: Path, *, seed: int = 1, scale: float = 0.1, **lora: Any) -> Any:
    """A peft LoRA on ``base_dir`` with every trainable tensor set to seeded random values, saved to ``out_dir``.

    Returns the (unmerged) peft model. B is zero at init, so without the randomisation the merge is a no-op.
    """
    _quiet()
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_base(base_dir), LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:  # LoRA A/B, modules_to_save copies, biases per `bias=`
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.eval()
    model.save_pretrained(out_dir)
    return model


def reference_merge(peft_model: Any) -> dict[str, torch.Tensor]:
    """peft's own merge, as a state dict (tensors cloned)."""
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def worst(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], *, atol: float, rtol: float
          ) -> tuple[float, str]:
    """Largest (|ours - ref| - atol - rtol*|ref|) over every tensor (<= 0 means within tolerance), and where."""
    worst_excess, where = -float("inf"), ""
    for name, mine in ours.items():
        theirs = ref[name].to(mine.dtype)
        diff = (mine.double() - theirs.double()).abs()
        excess = float((diff - atol - rtol * theirs.double().abs()).max()) if diff.numel() else -atol
        if excess > worst_excess:
            worst_excess, where = excess, name
    return worst_excess, where


def logits(model: Any, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config: Any) -> Path:
    """A hand-made adapter folder: ``adapter_config.json`` (LoRA defaults + ``config``) and the weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", "use_rslora": False, "use_dora": False,
                "target_modules": ["q_proj"], "modules_to_save": None, "fan_in_fan_out": False,
                "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": None}
    settings.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(settings), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return folder


def q_proj_pair(layer: int = 0, *, rank: int = 4, in_features: int = 64, out_features: int = 64
                ) -> dict[str, torch.Tensor]:
    prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
    generator = torch.Generator().manual_seed(layer)
    return {f"{prefix}.lora_A.weight": torch.randn(rank, in_features, generator=generator) * 0.1,
            f"{prefix}.lora_B.weight": torch.randn(out_features, rank, generator=generator) * 0.1}
