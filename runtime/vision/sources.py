"""Images as the APIs receive them, decoded to bytes with limits and clear refusals (for the server and the CLI):
OpenAI ``image_url`` content parts (``data:`` URLs; remote URLs only when the caller allows them, since boards
are often offline), Ollama's ``images`` (bare base64), and local paths.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from rkedge.errors import InputError

#: Encoded image bytes accepted per image (before decoding; pixels are limited by preprocess.MAX_PIXELS).
MAX_IMAGE_BYTES = 20 * 1024 * 1024
#: MIME types accepted in data: URLs (what Pillow decodes without extra plugins).
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
#: File signatures of those formats, checked before decoding so a wrong payload gets a precise message.
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def _check(data: bytes, max_bytes: int, where: str) -> bytes:
    if len(data) > max_bytes:
        raise InputError(f"{where} is {len(data)} bytes, more than the {max_bytes} allowed.",
                         fix="send a smaller or more compressed image")
    if not (data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
        raise InputError(f"{where} is not a PNG, JPEG, WebP, GIF or BMP image.", fix="send one of those formats")
    return data


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where} is not valid base64.", fix="encode the image file's bytes with base64") from None


def from_data_url(url: str, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The image bytes of ``data:image/png;base64,...``."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise InputError("an image data URL must look like data:image/png;base64,<data>.",
                         fix="send the image as a base64 data: URL")
    mime = head[5:-7].lower()
    if mime not in IMAGE_TYPES:
        raise InputError(f"image type {mime or '(none)'} is not accepted.", fix=f"use one of {', '.join(IMAGE_TYPES)}")
    if len(payload) > max_bytes * 4 // 3 + 4:  # refuse before decoding a huge payload
        raise InputError(f"the image is larger than the {max_bytes} bytes allowed.", fix="send a smaller image")
    return _check(_b64(payload, "the data URL"), max_bytes, "the image")


def from_base64(text: str, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """An Ollama ``images`` entry (bare base64, or a data URL as some clients send)."""
    if text.startswith("data:"):
        return from_data_url(text, max_bytes=max_bytes)
    if len(text) > max_bytes * 4 // 3 + 4:
        raise InputError(f"the image is larger than the {max_bytes} bytes allowed.", fix="send a smaller image")
    return _check(_b64(text, "the image"), max_bytes, "the image")


def from_image_url(url: str, *, allow_remote: bool = False, max_bytes: int = MAX_IMAGE_BYTES,
                   timeout_s: float = 10.0) -> bytes:
    """An OpenAI ``image_url.url``: a data URL, or (with ``allow_remote``) an http(s) URL fetched here."""
    if url.startswith("data:"):
        return from_data_url(url, max_bytes=max_bytes)
    if not url.startswith(("http://", "https://")):
        raise InputError("an image URL must be a data: URL (or http(s) when the server allows remote images).",
                         fix="send the image inline as data:image/png;base64,...")
    if not allow_remote:
        raise InputError("remote image URLs are off on this server (boards are often offline).",
                         fix="send the image inline as a data: URL, or start the server with remote images allowed")
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=timeout_s) as response:  # http(s) only: the scheme is checked above
            data = response.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot fetch the image at {url} ({exc}).", fix="send it inline as a data: URL") from None
    return _check(data, max_bytes, "the fetched image")


def from_path(path: str | Path, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """A local image file (the chat CLI's ``/image PATH``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"{file} is not a file.", fix="give the path of a PNG or JPEG image")
    if file.stat().st_size > max_bytes:
        raise InputError(f"{file} is larger than the {max_bytes} bytes allowed.", fix="use a smaller image")
    return _check(file.read_bytes(), max_bytes, str(file))
