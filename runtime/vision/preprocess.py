"""Image preprocessing on the board, equal to the Hugging Face image processor at the encoder's fixed size.

Steps, as ``Qwen2VLImageProcessorPil`` / ``Gemma3ImageProcessorPil`` (transformers' PIL backend) do them: convert to
RGB, resize with PIL (the processors resize with PIL too, so the pixels are the same), rescale in float64 and cast
to float32, normalise per channel in float32, then (Qwen2-VL) cut into flat patches in merge-block order with the
frame repeated ``temporal_patch_size`` times. Before that, "pad" centres the image on a square of the background
colour, as Rockchip's demos do, so a fixed-size encoder keeps the aspect ratio (the HF processor instead picks a
size per image; a fixed .rknn cannot). Needs numpy and Pillow, imported when called; no torch.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Union

from rkedge.errors import InputError
from rkedge.runtime.vision.bundle import Preprocessing

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    FloatArray = np.ndarray[Any, np.dtype[np.float32]]

#: What :func:`load_image` accepts: encoded bytes (PNG, JPEG...), a path, a PIL image, or an HxWx3 uint8 array.
ImageSource = Union[bytes, str, Path, "Image.Image", "np.ndarray[Any, Any]"]

#: Decoded images larger than this are refused before decoding (a PNG bomb can hold gigapixels in kilobytes).
MAX_PIXELS = 64 * 1024 * 1024
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _pil() -> ModuleType:
    try:
        from PIL import Image
    except ImportError:
        raise InputError("image input needs Pillow, which is not installed.",
                         fix="pip install pillow (it is in rkedge's convert and rknn-board extras)") from None
    return Image


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """``source`` decoded to an RGB PIL image (the HF processors' ``convert_rgb``)."""
    import numpy as np

    _pil()  # the error with the fix when Pillow is missing
    from PIL import Image as image_module

    image: Image.Image
    if isinstance(source, image_module.Image):
        image = source
    elif isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise InputError(f"an image array must be HxWx3 uint8 RGB, not {source.shape} {source.dtype}.",
                             fix="pass the image file's bytes or path instead")
        image = image_module.fromarray(source)
    else:
        data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
        try:
            image = image_module.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise InputError(f"the image is {image.width}x{image.height} pixels, more than {max_pixels}.",
                                 fix="send a smaller image; the encoder sees it at a fixed size anyway")
            image.load()
        except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
            raise InputError(f"cannot decode the image ({exc}).",
                             fix="send a PNG, JPEG, WebP, GIF or BMP file") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def to_square(image: Image.Image, background: Sequence[int]) -> Image.Image:
    """``image`` centred on a square of ``background`` (Rockchip's ``expand2square``)."""
    if image.width == image.height:
        return image
    side = max(image.width, image.height)
    canvas: Image.Image = _pil().new("RGB", (side, side), tuple(background))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def resize(image: Image.Image, spec: Preprocessing) -> Image.Image:
    """PIL's resize to the encoder's size with the family's filter (what the HF PIL backend calls)."""
    if spec.resample not in _RESAMPLE:
        raise InputError(f"unknown resample filter {spec.resample!r}.", fix=f"use one of {', '.join(_RESAMPLE)}")
    if image.size == (spec.width, spec.height):
        return image
    resized: Image.Image = image.resize((spec.width, spec.height), resample=_RESAMPLE[spec.resample])
    return resized


def normalize(image: Image.Image, spec: Preprocessing) -> FloatArray:
    """CHW float32 pixels, rescaled and normalised exactly as transformers' ``rescale`` and ``normalize`` do."""
    import numpy as np

    chw = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    scaled = (chw.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean, std = np.asarray(spec.mean, dtype=np.float32), np.asarray(spec.std, dtype=np.float32)
    result: FloatArray = ((scaled.T - mean) / std).T
    return result


def patchify(pixels: FloatArray, spec: Preprocessing) -> FloatArray:
    """Qwen2-VL's flat patches [grid_h x grid_w, 3 x T x P x P] from CHW pixels, in merge-block order."""
    import numpy as np

    channels, height, width = pixels.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    patches = pixels.reshape(channels, grid_h // m, m, p, grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, *patches.shape[5:]))
    result: FloatArray = np.ascontiguousarray(patches.reshape(grid_h * grid_w, channels * t * p * p))
    return result


def preprocess(source: ImageSource, spec: Preprocessing) -> FloatArray:
    """One image as the encoder's input (shape ``spec.input_shape``)."""
    image = load_image(source)
    if spec.square == "pad":
        image = to_square(image, spec.background)
    pixels = normalize(resize(image, spec), spec)
    if spec.patching == "qwen2_vl":
        return patchify(pixels, spec)
    result: FloatArray = pixels[None]
    return result
