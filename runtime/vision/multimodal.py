"""Image embeddings as the runtime's multimodal input, per ABI (ABI.md, ``RKLLMMultiModalInput``):

- ABI 1.1 and 1.2.0: ``prompt``, ``image_embed``, ``n_image_tokens``: one image per input; the tags are set once,
  in ``RKLLMParam.img_start/img_end/img_content`` at init.
- ABI 1.2.1 - 1.2.3: + ``n_image``, ``image_width``, ``image_height`` (several images per input); tags still at init.
- ABI 1.3.0 and 1.3.1: the image block carries its own ``image_start/end/content``; video (1.3.0) and audio (1.3.1)
  blocks beside it. 1.3.1's input is 48 bytes larger (audio); the ABI layer sends each ABI's own struct.

The prompt holds one ``<image>`` per image; the runtime expands each into start + content x n_image_tokens + end
(Rockchip's demos send ``"<image>What is in the image?"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rkedge.errors import InputError
from rkedge.runtime.vision.bundle import ImageTags, VlmManifest
from rkedge.versions import version_key

if TYPE_CHECKING:
    import numpy as np

    from rkedge.runtime.abi._native import MultimodalInput


def tags_at_init(abi: str) -> bool:
    """Up to ABI 1.2.3 the image tags are ``RKLLMParam`` fields, set once at init (ABI.md)."""
    return version_key(abi) < (1, 3, 0)


def images_per_input(abi: str) -> int | None:
    """The most images one input can carry: 1 before ABI 1.2.1 (no ``n_image``), otherwise no fixed limit."""
    return 1 if version_key(abi) < (1, 2, 1) else None


def init_image_tags(manifest: VlmManifest, abi: str) -> tuple[str, str, str] | None:
    """What to pass as ``NativeModel(image_tags=...)``: the tags for ABIs that take them at init, else None."""
    return manifest.tags.as_tuple() if tags_at_init(abi) else None


def refuse_media(kind: str, manifest: VlmManifest, abi: str) -> InputError:
    """The error for video or audio input to a converted VLM: rkedge converts image encoders only, and the ABI
    must have the block (video from 1.3.0, audio from 1.3.1)."""
    needs = {"video": (1, 3, 0), "audio": (1, 3, 1)}.get(kind)
    if needs is None:
        return InputError(f"unknown media kind {kind!r}.", fix="send images")
    if version_key(abi) < needs:
        return InputError(f"{kind} input needs runtime ABI {'.'.join(map(str, needs))} or newer (this is {abi}).",
                          fix="send images, or update librkllmrt.so on the board")
    return InputError(f"{manifest.name} ({manifest.family}) was converted with an image encoder only; rkedge does "
                      f"not convert {kind} encoders yet.",
                      fix="send the frames as images" if kind == "video" else "send a transcript as text")


def image_prompt(text: str, images: int, placeholder: str = ImageTags("", "", "").placeholder) -> str:
    """``text`` with one placeholder per image: kept where the user put them, else all in front (as the demos do).

    Raises:
        InputError: the text holds placeholders, but not one per image.
    """
    found = text.count(placeholder)
    if found == images:
        return text
    if found:
        raise InputError(f"the prompt holds {found} {placeholder} placeholders for {images} images.",
                         fix=f"put one {placeholder} per image in the text, or none (they then go in front)")
    return placeholder * images + text


@dataclass(frozen=True)
class ImageEmbeddings:
    """The encoder's output for the images of one message: ``rows`` is [images, image tokens, hidden] float32."""

    rows: np.ndarray[Any, np.dtype[np.float32]]
    tags: ImageTags
    width: int
    height: int

    @property
    def count(self) -> int:
        return int(self.rows.shape[0])

    @property
    def tokens_per_image(self) -> int:
        return int(self.rows.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.rows.shape[2])

    def prompt(self, text: str) -> str:
        return image_prompt(text, self.count, self.tags.placeholder)

    def media(self, abi: str) -> MultimodalInput:
        """The ABI layer's multimodal input (:class:`rkedge.runtime.abi._native.MultimodalInput`) for ``abi``.

        Raises:
            InputError: more images than this ABI takes in one input.
        """
        from array import array

        from rkedge.runtime.abi._native import MediaEmbeddings, MultimodalInput

        limit = images_per_input(abi)
        if limit is not None and self.count > limit:
            raise InputError(f"ABI {abi} takes {limit} image per input; this message has {self.count}.",
                             fix="send one image per message, or use a runtime of 1.2.1 or newer")
        floats = array("f")
        floats.frombytes(self.rows.astype("<f4", copy=False).tobytes())
        per_input = not tags_at_init(abi)
        block = MediaEmbeddings(floats, self.count, self.tokens_per_image,
                                start=self.tags.start if per_input else None,
                                end=self.tags.end if per_input else None,
                                content=self.tags.content if per_input else None,
                                width=self.width, height=self.height)
        return MultimodalInput(image=block)


def multimodal_run(images: ImageEmbeddings, text: str, abi: str) -> tuple[bytes, MultimodalInput]:
    """The prompt bytes and media of one ``RKLLM_INPUT_MULTIMODAL`` run: what ``NativeModel.run(request=
    RunRequest(prompt=...), media=...)`` takes. The prompt is the user's text with the placeholders; the chat
    template is the runtime's (or the caller's) as for any prompt."""
    from rkedge.runtime.types import c_text

    return c_text(images.prompt(text), "the prompt"), images.media(abi)
