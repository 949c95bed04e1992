"""Converting tiny vision-language models: the language model through rkedge's rkllm pipeline (simulated
rkllm-toolkit), the vision tower through ONNX and the real rknn-toolkit2 (fp16 and w8a8, verified in its
simulator against transformers on 8 varied images), one vlm.json naming both."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_vlms import make_qwen2_vl, png_bytes, varied_images
from vlm_helpers import converted

from rkedge.convert.vlm import FAMILIES, MIN_COSINE, VlmRequest, convert_vlm, is_vlm_checkpoint
from rkedge.convert.vlm.convert import preprocessing_for
from rkedge.convert.vlm.families import family_of
from rkedge.errors import InputError, ModelFileError
from rkedge.manifest import read_manifest
from rkedge.runtime.vision import VisionEncoder, read_vlm

pytest.importorskip("rknn.api")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return converted(tmp_path_factory.getbasetemp(), "qwen2_vl")


def test_a_tiny_qwen2_vl_becomes_an_rkllm_and_a_vision_rknn_named_by_one_manifest(qwen):
    source, result = qwen
    folder, manifest = read_vlm(result.manifest_file.parent)
    assert (folder / manifest.llm_file).is_file() and manifest.llm_file == result.llm_file.name
    assert result.llm_file.name.startswith(source.name)
    llm = read_manifest(folder / manifest.llm_file)
    assert llm["architecture"] == "Qwen2ForCausalLM" and llm["simulated"] is True
    assert set(manifest.encoders) == {"fp16", "w8a8"} and manifest.default_dtype == "fp16"
    for encoder in manifest.encoders.values():
        assert (folder / encoder.rknn).stat().st_size == encoder.size > 0
    # 112 px / 14 px patches = 8 x 8 patches, merged 2 x 2: 16 image tokens of the text model's width.
    spec = manifest.preprocessing
    assert (spec.width, spec.height, spec.patching, spec.resample) == (112, 112, "qwen2_vl", "bicubic")
    assert (manifest.image_tokens, manifest.hidden_size) == (16, 128)
    assert manifest.tags.as_tuple() == ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
    assert manifest.tags.placeholder == "<image>" and manifest.min_toolkit == "1.1.4"
    assert manifest.verification["language_model_text_logit_gap"] < 1e-4


def test_the_compiled_encoder_matches_transformers_on_eight_varied_images(qwen):
    _, result = qwen
    verification = result.manifest.verification
    assert verification["images"] >= 8 and verification["reference"] == "transformers get_image_features"
    assert verification["onnx"]["cosine_min"] > 0.99999
    for dtype, bar in MIN_COSINE.items():
        figures = verification["encoders"][dtype]
        assert figures["images"] >= 8
        assert figures["cosine_min"] >= bar and figures["meets_bar"] is True, (dtype, figures)
        assert 0 < figures["max_abs_error"] < figures["reference_max_abs"]
    fp16, w8a8 = verification["encoders"]["fp16"], verification["encoders"]["w8a8"]
    assert fp16["max_abs_error"] < w8a8["max_abs_error"]  # int8 is lossier: the figures are measured, not set


def test_the_simulator_encoder_matches_the_hf_processor_and_vision_tower_on_png_files(qwen):
    import torch
    from transformers import AutoImageProcessor, Qwen2VLForConditionalGeneration

    source, result = qwen
    images = varied_images(3, size=(112, 112), seed=99)  # square at the fixed size: the HF processor's own path
    processor = AutoImageProcessor.from_pretrained(source)
    model = Qwen2VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    with VisionEncoder.open(result.manifest_file.parent, backend="simulator") as encoder:
        ours = encoder.encode([png_bytes(image) for image in images])
    assert ours.rows.shape == (3, 16, 128) and ours.rows.dtype == np.float32
    for image, rows in zip(images, ours.rows, strict=True):
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            expected = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        reference = expected.pooler_output[0].numpy()
        cosine = float((reference * rows).sum() / np.linalg.norm(reference) / np.linalg.norm(rows))
        assert cosine >= 0.999


def test_the_w8a8_encoder_runs_from_its_hybrid_quantization_files(qwen):
    _, result = qwen
    with VisionEncoder.open(result.manifest_file.parent, dtype="w8a8", backend="simulator") as encoder:
        embeddings = encoder.encode(varied_images(2, seed=5))
    with VisionEncoder.open(result.manifest_file.parent, backend="simulator") as encoder:
        reference = encoder.encode(varied_images(2, seed=5))
    a, b = embeddings.rows.ravel(), reference.rows.ravel()
    assert 0.99 < float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) < 1.0


def test_a_vlm_folder_with_a_missing_encoder_is_refused(qwen, tmp_path):
    import shutil

    _, result = qwen
    copy = tmp_path / "copy"
    shutil.copytree(result.manifest_file.parent, copy)
    (copy / result.manifest.encoders["w8a8"].rknn).unlink()
    with pytest.raises(ModelFileError, match="missing from the VLM folder"):
        read_vlm(copy)
    data = json.loads((copy / "vlm.json").read_text())
    (copy / "vlm.json").write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ModelFileError, match="schema version 99"):
        read_vlm(copy)


def test_families_whose_tower_has_no_exporter_are_refused_with_the_reason(tmp_path):
    folder = tmp_path / "internvl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"]}))
    assert is_vlm_checkpoint(folder)
    with pytest.raises(InputError, match="InternViT with pixel shuffle"):
        convert_vlm(VlmRequest(model=folder, out=tmp_path / "o"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert not is_vlm_checkpoint(folder)
    with pytest.raises(InputError, match="not a vision-language checkpoint"):
        convert_vlm(VlmRequest(model=folder, out=tmp_path / "o"))


def test_a_toolkit_older_than_the_familys_llm_part_is_refused(tmp_path):
    source = make_qwen2_vl(tmp_path / "qwen")
    with pytest.raises(InputError, match=r"first listed in 1\.1\.4"):
        convert_vlm(VlmRequest(model=source, out=tmp_path / "o", toolkit="mock", toolkit_version="1.1.2"))


def test_image_sizes_must_fit_the_patch_grid(tmp_path):
    source = make_qwen2_vl(tmp_path / "qwen")
    family = family_of("Qwen2VLForConditionalGeneration")
    assert family is not None
    assert preprocessing_for(family, source, None).width == 112  # the processor's fixed pixel count
    assert preprocessing_for(family, source, 224).input_shape == (256, 1176)
    with pytest.raises(InputError, match="multiple of 28"):
        preprocessing_for(family, source, 100)


def test_every_family_row_names_its_sources_and_tags():
    for family in FAMILIES:
        assert family.sources and all(family.tags[:3]) and family.min_toolkit.count(".") == 2
        assert (family.vision_refusal is None) == (family.key in ("qwen2_vl", "gemma3"))


@pytest.mark.slow
def test_a_tiny_gemma3_with_a_siglip_tower_converts_too(tmp_path_factory):
    _, result = converted(tmp_path_factory.getbasetemp(), "gemma3")
    manifest = result.manifest
    assert manifest.family == "gemma3" and (manifest.image_tokens, manifest.hidden_size) == (4, 128)
    assert manifest.preprocessing.input_shape == (1, 3, 64, 64) and manifest.preprocessing.square == "stretch"
    assert read_manifest(result.llm_file)["architecture"] == "Gemma3ForCausalLM"
    assert manifest.encoders["w8a8"].fp16_tensors  # the projector kept in fp16 (hybrid)
    for dtype, bar in MIN_COSINE.items():
        assert manifest.verification["encoders"][dtype]["cosine_min"] >= bar
