"""Tiny Hugging Face checkpoints for tests and the demo: random weights from real configs, a tiny byte-level BPE
trained in memory, and the real chat template of the family. Nothing is downloaded.

Dimensions are multiples of 128 so the grouped dtypes' divisibility rules hold unless a test breaks them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent.parent / "tests" / "data" / "chat_templates"

SPECIAL_TOKENS = {
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
              {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
              "gemma-2-2b-it.jinja"),
    "gemma3": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
               {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
               "gemma-3-1b-it.jinja"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "llama-3-8b-instruct.jinja"),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "qwen2-0.5b-instruct.jinja"),
}

CORPUS = [
    "The RK3588 has an NPU with three cores.", "Hello, how are you today?", "What is the capital of France?",
    "Quantization turns float weights into int8.", "请用一句话介绍一下你自己。", "Erkläre kurz, was ein Mikrocontroller ist.",
    "def square(x): return x * x", "The quick brown fox jumps over the lazy dog.", "日本の首都はどこですか？",
] * 4

COMMON = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048)


def make_tokenizer(family: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, roles, template = SPECIAL_TOKENS[family]
    backend = Tokenizer(models.BPE(unk_token=roles.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    tokenizer.chat_template = (TEMPLATES / template).read_text(encoding="utf-8")
    return tokenizer


def make_config(kind: str) -> Any:
    import transformers as t

    if kind == "llama":
        return t.LlamaConfig(**COMMON, tie_word_embeddings=False)
    if kind == "qwen2":
        return t.Qwen2Config(**COMMON, tie_word_embeddings=True)
    if kind == "gemma":
        return t.GemmaConfig(**COMMON, head_dim=32)
    if kind == "gemma2":
        return t.Gemma2Config(**COMMON, head_dim=32, sliding_window=256)
    if kind == "gemma3":
        return t.Gemma3TextConfig(**COMMON, head_dim=32, sliding_window=256)
    if kind == "recurrent_gemma":
        return t.RecurrentGemmaConfig(vocab_size=512, hidden_size=128, lru_width=128, intermediate_size=256,
                                      num_hidden_layers=3, num_attention_heads=4, attention_window_size=64)
    raise ValueError(kind)


FAMILY_OF = {"llama": "llama3", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma3",
             "recurrent_gemma": "gemma"}


def make_checkpoint(folder: Path, kind: str, *, seed: int = 0, shard_size: str = "200KB",
                    config_overrides: dict[str, Any] | None = None) -> Path:
    """Writes a tiny checkpoint of ``kind`` (llama, qwen2, gemma, gemma2, gemma3, recurrent_gemma)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(kind)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    config._name_or_path = f"tiny-random/{kind}"
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard_size)
    make_tokenizer(FAMILY_OF[kind]).save_pretrained(folder)
    return folder


def train_lora(base: Path, out: Path, *, steps: int = 3, targets: tuple[str, ...] = ("q_proj", "v_proj"),
               r: int = 4) -> Path:
    """A LoRA adapter trained a few SGD steps with peft (so its B matrices are not zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 300, (2, 16))
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(out)
    return out
