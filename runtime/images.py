"""Images on the way into :class:`~rkedge.runtime.llm.LLM` and chat sessions: which vision encoder a model has,
encoding a message's images, and chat messages that carry images.

A model has eyes when it is a VLM folder (``vlm.json``, written by ``rkedge convert`` for a vision-language model),
when its ``.rkllm`` is the language model a ``vlm.json`` beside it names, or when the caller passes the encoder (or
its folder). The encoder is opened at the first image (text-only use of a VLM never loads it).

In a chat, an image becomes one placeholder (``<image>``) in its message's text, where the user put it (a content
part's position, or a placeholder they typed), else in front, as Rockchip's demos send it; the runtime expands each
placeholder into start tag + image rows + end tag. The chat template renders the placeholder as plain text, so the
KV-cache bookkeeping (text already prefilled) holds for images too.

Nothing heavy is imported here: numpy, Pillow and the encoder's engine come with the first image.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from rkedge.errors import InputError, RkedgeError

if TYPE_CHECKING:
    from rkedge.runtime.vision.bundle import VlmManifest
    from rkedge.runtime.vision.encoder import VisionEncoder
    from rkedge.runtime.vision.multimodal import ImageEmbeddings
    from rkedge.runtime.vision.preprocess import ImageSource

log = logging.getLogger("rkedge.runtime")

#: What ``vision=`` takes: an open encoder (the caller keeps owning it) or a VLM folder / its ``vlm.json``.
VisionChoice = Union["VisionEncoder", str, Path]
#: The images of one input: image sources (bytes, paths, PIL images, HxWx3 uint8 arrays) or embeddings already made.
Images = Union[Sequence["ImageSource"], "ImageEmbeddings"]
Message = dict[str, Any]

#: Content-part types that carry an image: Hugging Face's ``{"type": "image", "image": ...}`` (also ``url`` or
#: ``path``) and OpenAI's ``{"type": "image_url", "image_url": {"url": "data:..."}}``.
IMAGE_PARTS = ("image", "image_url")
#: Content-part types of media rkedge has no encoder for (refused with the reason, never dropped).
OTHER_MEDIA_PARTS = {"video": "video", "video_url": "video", "audio": "audio", "input_audio": "audio"}


class VisionSide:
    """The vision half of a loaded VLM: its manifest, and the encoder (opened on first use unless given)."""

    def __init__(self, folder: Path, manifest: VlmManifest, encoder: VisionEncoder | None = None, *,
                 dtype: str | None = None) -> None:
        self.folder = folder
        self.manifest = manifest
        self._encoder = encoder
        self._owned = encoder is None  # an encoder the caller passed is the caller's to close
        self._dtype = dtype
        if dtype is not None:
            manifest.encoder(dtype)  # refuses an unknown dtype now, not at the first image

    @property
    def encoder(self) -> VisionEncoder:
        if self._encoder is None:
            from rkedge.runtime.vision.encoder import VisionEncoder

            self._encoder = VisionEncoder(self.folder, self.manifest, dtype=self._dtype)
        return self._encoder

    def encode(self, images: Images) -> ImageEmbeddings:
        """The embeddings of one input's images (encoded here unless already embeddings)."""
        from rkedge.runtime.vision.multimodal import ImageEmbeddings

        if isinstance(images, ImageEmbeddings):
            if images.hidden_size != self.manifest.hidden_size:
                raise InputError(f"these image embeddings have hidden size {images.hidden_size}; the model takes "
                                 f"{self.manifest.hidden_size}.", fix="encode the images with this model's encoder")
            return images
        if isinstance(images, (str, bytes, Path)):
            raise InputError("images must be a list of images, not one image.", fix="pass images=[image]")
        return self.encoder.encode(list(images))

    def close(self) -> None:
        if self._owned and self._encoder is not None:
            self._encoder.close()
        self._encoder = None


def locate_vision(model_path: Path, vision: VisionChoice | None, dtype: str | None = None
                  ) -> tuple[Path, VisionSide | None]:
    """The language model file to load and the vision side, if the model has one (see the module's text)."""
    from rkedge.runtime.vision.bundle import is_vlm, read_vlm
    from rkedge.runtime.vision.encoder import VisionEncoder

    side: VisionSide | None = None
    if isinstance(vision, VisionEncoder):
        side = VisionSide(vision.folder, vision.manifest, vision)
    elif vision is not None:
        folder, manifest = read_vlm(vision)
        side = VisionSide(folder, manifest, dtype=dtype)
    if is_vlm(model_path):  # the VLM folder itself: its language model is the file to load
        folder, manifest = read_vlm(model_path)
        if side is None:
            side = VisionSide(folder, manifest, dtype=dtype)
        return folder / manifest.llm_file, side
    if side is None and model_path.is_file() and is_vlm(model_path.parent):
        try:
            folder, manifest = read_vlm(model_path.parent)
        except RkedgeError as exc:  # the model still runs on text; say why it has no eyes
            log.warning("ignoring %s beside %s: %s", model_path.parent / "vlm.json", model_path.name, exc.message)
            return model_path, None
        if manifest.llm_file == model_path.name:
            side = VisionSide(folder, manifest, dtype=dtype)
    return model_path, side


def image_key(image: Any) -> str:
    """A fingerprint of one image source, to tell whether the KV cache holds this very image (a conversation
    resent with another picture at the same place must not continue on the old one)."""
    if isinstance(image, bytes):
        data = image
    elif isinstance(image, (str, Path)):
        return f"path:{Path(image).expanduser().resolve()}"
    elif hasattr(image, "tobytes"):  # numpy arrays, PIL images
        data = bytes(str(getattr(image, "shape", getattr(image, "size", ""))), "ascii") + image.tobytes()
    else:
        return f"object:{id(image)}"
    return "sha1:" + hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _part_image(part: Mapping[str, Any]) -> Any:
    """The image source of one content part."""
    from rkedge.runtime.vision.sources import from_image_url

    if part.get("type") == "image_url":
        found = part.get("image_url")
        url = found.get("url") if isinstance(found, Mapping) else found
        if not isinstance(url, str):
            raise InputError("an image_url part needs image_url.url.", fix="send {'image_url': {'url': 'data:...'}}")
        return from_image_url(url)  # data: URLs only here; a server that allows remote images fetches them first
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            value = part[key]
            if isinstance(value, str) and value.startswith(("data:", "http://", "https://")):
                return from_image_url(value)
            return value
    raise InputError("an image content part carries no image.", fix="send {'type': 'image', 'image': <bytes or path>}")


def flatten_images(message: Mapping[str, Any], placeholder: str) -> tuple[Message, list[Any]]:
    """``message`` with its images as placeholders in a text ``content``, and the images in order.

    Images come from an ``images`` list (Ollama's shape; decoded image sources) and from image content parts,
    which keep their place in the text. A message with no image is returned unchanged. A placeholder typed into a
    message without images is refused: the runtime would look for an image that is not there.

    Raises:
        InputError: video or audio parts (no encoder for them), a malformed part, placeholders that do not match.
    """
    from rkedge.runtime.vision.multimodal import image_prompt

    listed = message.get("images")
    extra = list(listed) if isinstance(listed, Sequence) and not isinstance(listed, (str, bytes)) else []
    if listed is not None and not isinstance(listed, Sequence):
        raise InputError("a message's images must be a list.", fix="send images=[...]")
    content = message.get("content")
    images: list[Any] = []
    if isinstance(content, list):
        has_media = any(isinstance(p, Mapping) and (p.get("type") in IMAGE_PARTS or p.get("type") in OTHER_MEDIA_PARTS)
                        for p in content)
        if not has_media and not extra:
            return dict(message), []
        pieces: list[str] = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                pieces.append(str(part.get("text") or ""))
            elif kind in IMAGE_PARTS:
                images.append(_part_image(part))
                pieces.append(placeholder)
            elif kind in OTHER_MEDIA_PARTS:
                raise media_refusal(OTHER_MEDIA_PARTS[str(kind)])
            else:
                raise InputError(f"unknown content part {kind!r} in a message with images.",
                                 fix="send text and image parts only")
        text = "".join(pieces)
    else:
        text = content if isinstance(content, str) else ""
        if content is not None and not isinstance(content, str):
            raise InputError("a message's content must be text or a list of parts.", fix="send text")
    if not images and not extra:
        if placeholder in text and message.get("role") != "assistant":
            raise InputError(f"the message holds {placeholder} but carries no image.",
                             fix=f"attach the image, or remove {placeholder} from the text")
        return dict(message), []
    if extra and not images:  # Ollama's images: at the placeholders the user typed, else in front
        text = image_prompt(text, len(extra), placeholder)
    elif extra:  # both kinds: the listed ones in front of the parts' own
        text = placeholder * len(extra) + text
    images = extra + images
    if text.count(placeholder) != len(images):
        raise InputError(f"the message holds {text.count(placeholder)} {placeholder} placeholders for {len(images)} "
                         "images.", fix=f"put one {placeholder} per image in the text, or none")
    flattened = {k: v for k, v in message.items() if k != "images"}
    flattened["content"] = text
    return flattened, images


def media_refusal(kind: str, manifest: VlmManifest | None = None, abi: str | None = None,
                  name: str = "this model") -> InputError:
    """The refusal for video or audio input: rkedge converts image encoders only; the ABI must have the block."""
    if manifest is not None and abi is not None and abi[:1].isdigit():
        from rkedge.runtime.vision.multimodal import refuse_media

        return refuse_media(kind, manifest, abi)
    return InputError(f"{kind} input needs a model converted with a {kind} encoder; {name} has none.",
                      fix="send text (and images, for a vision-language model)")


__all__ = ["IMAGE_PARTS", "Images", "VisionChoice", "VisionSide", "flatten_images", "image_key", "locate_vision",
           "media_refusal"]
