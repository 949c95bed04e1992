# mypy: allow-subclassing-any
"""The torch side of a VLM conversion: load the checkpoint, save its language model alone (the toolkit's "LLM
part"), wrap the vision tower (+ merger / projector) as a fixed-size graph, export it to ONNX, and compute
transformers' own image features as the reference the compiled encoder is verified against.

torch and transformers are imported inside the functions (host side only).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkedge.convert.vlm.families import VlmFamily
from rkedge.runtime.vision.bundle import Preprocessing

if TYPE_CHECKING:
    import numpy as np

    FloatArray = np.ndarray[Any, np.dtype[np.float32]]

INPUT_NAME = "pixels"
OUTPUT_NAME = "image_embeds"
#: Tokenizer and template files copied beside the saved language model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


def load_vlm(model_dir: Path) -> Any:
    """The checkpoint in float32 with eager attention (the graph ONNX export traces)."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def text_hidden_size(model: Any) -> int:
    return int(model.config.get_text_config().hidden_size)


def save_language_model(model: Any, family: VlmFamily, source: Path, out: Path) -> Path:
    """The language model alone, as ``family.llm_architecture``, with the source's tokenizer files: what rkedge's
    pipeline (and rkllm-toolkit) load as a causal LM."""
    import torch
    import transformers

    text_config = model.config.get_text_config()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if family.key == "qwen2_vl":
        theta = (getattr(text_config, "rope_parameters", None) or {}).get("rope_theta", 1_000_000.0)
        config = transformers.Qwen2Config(
            vocab_size=text_config.vocab_size, hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size, num_hidden_layers=text_config.num_hidden_layers,
            num_attention_heads=text_config.num_attention_heads, num_key_value_heads=text_config.num_key_value_heads,
            max_position_embeddings=text_config.max_position_embeddings, rms_norm_eps=text_config.rms_norm_eps,
            hidden_act=text_config.hidden_act, tie_word_embeddings=tied,
            rope_parameters={"rope_type": "default", "rope_theta": theta},
            bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id)
        llm = transformers.Qwen2ForCausalLM(config)
    elif family.key == "gemma3":
        config = transformers.Gemma3TextConfig(**{**text_config.to_dict(), "tie_word_embeddings": tied})
        config.architectures = ["Gemma3ForCausalLM"]
        llm = transformers.Gemma3ForCausalLM(config)
    else:
        raise ValueError(f"no language-model extraction for {family.key}")
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = llm.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not tied]:
        raise RuntimeError(f"language model weights do not map: missing {missing}, unexpected {unexpected}")
    llm.config._name_or_path = str(getattr(model.config, "_name_or_path", "")) + ":language_model"
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        llm.eval().save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return out


def language_model_gap(model: Any, llm_dir: Path, token_ids: list[int]) -> float:
    """Max |logit difference| between the VLM and its saved language model on a text-only input."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        ours, theirs = llm(input_ids=ids).logits, model(input_ids=ids).logits
    return float((ours - theirs).abs().max())


def vision_module(model: Any, family: VlmFamily, spec: Preprocessing) -> Any:
    """The vision tower + merger/projector as a module of one fixed-size input (``spec.input_shape``)."""
    import torch

    class QwenVision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = model.model.visual
            self.register_buffer("grid", torch.tensor([[1, spec.height // spec.patch_size,
                                                        spec.width // spec.patch_size]]), persistent=False)

        def forward(self, pixels: Any) -> Any:
            return self.visual(pixels, grid_thw=self.grid).pooler_output

    class GemmaVision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model.model

        def forward(self, pixels: Any) -> Any:
            return self.inner.get_image_features(pixels).pooler_output[0]

    if family.key == "qwen2_vl":
        return QwenVision().eval()
    if family.key == "gemma3":
        return GemmaVision().eval()
    raise ValueError(f"no vision export for {family.key}")


def reference_features(model: Any, family: VlmFamily, pixels: FloatArray, spec: Preprocessing) -> FloatArray:
    """transformers' own image features (``get_image_features``) for one preprocessed image: [tokens, hidden]."""
    import torch

    tensor = torch.from_numpy(pixels)
    with torch.no_grad():
        if family.key == "qwen2_vl":
            grid = torch.tensor([[1, spec.height // spec.patch_size, spec.width // spec.patch_size]])
            features = model.model.get_image_features(tensor, image_grid_thw=grid).pooler_output[0]
        else:
            features = model.model.get_image_features(tensor).pooler_output[0]
    result: FloatArray = features.float().numpy()
    return result


def export_onnx(module: Any, spec: Preprocessing, path: Path) -> dict[str, Any]:
    """``module`` to ONNX (opset 17, TorchScript exporter, fixed shapes), then checked with onnxruntime against torch
    on a random input: the figures are returned."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(np.random.default_rng(0).standard_normal(spec.input_shape).astype(np.float32))
    with torch.no_grad():
        expected = module(example).numpy()
        torch.onnx.export(module, (example,), str(path), opset_version=17, dynamo=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: example.numpy()})[0]
    return {"file": path.name, "nodes": len(graph.graph.node), "bytes": path.stat().st_size,
            "output_shape": list(expected.shape), "onnxruntime_max_abs_error": float(np.abs(got - expected).max())}
