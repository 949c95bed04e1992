"""Board-side preprocessing (numpy + Pillow) against the Hugging Face image processors (their PIL backends),
on varied images: the same pixels, bit for bit or within float32 rounding."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from tiny_vlms import png_bytes, varied_images

from rkedge.errors import InputError
from rkedge.runtime.vision.bundle import Preprocessing
from rkedge.runtime.vision.preprocess import load_image, patchify, preprocess, resize, to_square

pytest.importorskip("PIL")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
QWEN = Preprocessing(width=112, height=112, mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic", square="pad",
                     patching="qwen2_vl", patch_size=14, temporal_patch_size=2, merge_size=2)
GEMMA = Preprocessing(width=64, height=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample="bilinear",
                      square="stretch")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return varied_images(8, size=(150, 97), seed=3)


def test_qwen2_vl_patches_equal_the_hf_processor_at_the_fixed_size(images):
    from transformers import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=112 * 112, max_pixels=112 * 112)
    for image in images:
        # The encoder's size is fixed: both sides see the image padded to square and resized to 112x112 by PIL
        # (the HF processor's own resize is then the identity: smart_resize keeps a 112x112 image).
        square = resize(to_square(load_image(image), QWEN.background), QWEN)
        hf = processor(images=np.asarray(square), return_tensors="np")
        ours = preprocess(png_bytes(image), QWEN)
        assert hf["image_grid_thw"].tolist() == [[1, 8, 8]]
        assert ours.shape == hf["pixel_values"].shape == QWEN.input_shape
        np.testing.assert_array_equal(ours, hf["pixel_values"])


def test_our_resize_is_the_hf_resize(images):
    from transformers.image_transforms import resize as hf_resize
    from transformers.image_utils import PILImageResampling

    for image in images:
        hf = hf_resize(image, (112, 112), resample=PILImageResampling.BICUBIC)
        ours = np.asarray(resize(load_image(image), QWEN))
        np.testing.assert_array_equal(ours, hf)


def test_gemma3_pixels_equal_the_hf_processor_including_its_resize(images):
    from transformers import Gemma3ImageProcessorPil

    processor = Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    for image in images:
        hf = processor(images=image, return_tensors="np")["pixel_values"]
        ours = preprocess(image, GEMMA)
        assert ours.shape == hf.shape == (1, 3, 64, 64)
        np.testing.assert_allclose(ours, hf, rtol=0, atol=1e-6)


def test_padding_keeps_the_aspect_ratio_on_the_background_colour():
    wide = np.full((20, 60, 3), 255, np.uint8)
    square = np.asarray(to_square(load_image(wide), (128, 128, 128)))
    assert square.shape == (60, 60, 3)
    assert (square[:20] == 128).all() and (square[20:40] == 255).all() and (square[40:] == 128).all()


def test_patch_order_is_merge_blocks_of_patches():
    # Pixel value = its column index: the first 4 patches are one 2x2 merge block (rows 0-1, columns 0-1).
    pixels = np.broadcast_to(np.arange(112, dtype=np.float32), (3, 112, 112)).copy()
    patches = patchify(pixels, QWEN).reshape(64, 3, 2, 14, 14)
    first_columns = [int(p[0, 0, 0, 0]) for p in patches[:6]]
    assert first_columns == [0, 14, 0, 14, 28, 42]
    np.testing.assert_array_equal(patches[:, :, 0], patches[:, :, 1])  # the frame repeated in time


def test_undecodable_and_oversized_images_are_refused_with_a_fix():
    with pytest.raises(InputError, match="cannot decode"):
        load_image(b"not an image")
    big = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (300, 300)).save(big, format="PNG")
    with pytest.raises(InputError, match="more than"):
        load_image(big.getvalue(), max_pixels=300 * 299)
    with pytest.raises(InputError, match="HxWx3 uint8"):
        load_image(np.zeros((4, 4), np.float32))


def test_modes_other_than_rgb_are_converted():
    gray = io.BytesIO()
    from PIL import Image

    Image.new("L", (30, 20), 77).save(gray, format="PNG")
    assert preprocess(gray.getvalue(), GEMMA).shape == (1, 3, 64, 64)


def test_preprocessing_imports_no_torch():
    code = ("import sys; from rkedge.runtime.vision.preprocess import preprocess; "
            "from rkedge.runtime.vision.bundle import Preprocessing; import numpy as np; "
            "preprocess(np.zeros((9, 7, 3), np.uint8), Preprocessing(28, 28, (0.5,) * 3, (0.5,) * 3, "
            "patching='qwen2_vl', temporal_patch_size=2, merge_size=2)); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
