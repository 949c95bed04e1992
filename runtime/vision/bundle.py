"""The VLM manifest, ``vlm.json``: one file naming the language model (``.rkllm``) and the vision encoder
(``.rknn``, one per dtype built), with everything the board needs to turn an image into ``RKLLM_INPUT_MULTIMODAL``:
the fixed image size, the preprocessing (equal to the Hugging Face image processor at that size), the image token
count, the hidden size and the prompt tags. Written by :func:`rkedge.convert.vlm.convert_vlm`, read here (board
side: no torch, no numpy needed to read it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rkedge._fs import atomic_write_text
from rkedge.errors import ModelFileError

SCHEMA = "rkedge-vlm"
SCHEMA_VERSION = 1
VLM_FILE = "vlm.json"
#: The placeholder a prompt carries once per image; the runtime expands it into start + content x tokens + end
#: (Rockchip's multimodal demos: ``"<image>What is in the image?"``).
IMAGE_PLACEHOLDER = "<image>"
_FIX = "reconvert the model with rkedge convert (a VLM folder), or restore vlm.json from the conversion's output"


@dataclass(frozen=True)
class ImageTags:
    """The strings around and inside an image's rows in the prompt (``RKLLMParam.img_*`` up to ABI 1.2.3, each
    multimodal input's ``image_start/end/content`` from 1.3.0)."""

    start: str
    end: str
    content: str
    placeholder: str = IMAGE_PLACEHOLDER

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.start, self.end, self.content)


@dataclass(frozen=True)
class Preprocessing:
    """What turns a decoded RGB image into the encoder's input, step for step as the HF image processor does it.

    ``square``: "pad" centres the image on a square of ``background`` first (Rockchip's demos do this so the
    fixed-size encoder does not distort the aspect ratio), "stretch" resizes as is. ``resample`` is a PIL filter
    name (the HF processor resizes with PIL). ``patching``: "qwen2_vl" (flat patches, ``patch_size`` x
    ``temporal_patch_size``, in ``merge_size`` blocks, the processor's ``pixel_values``) or "none" (NCHW pixels).
    """

    width: int
    height: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"
    square: str = "pad"
    background: tuple[int, int, int] = (127, 127, 127)
    patching: str = "none"
    patch_size: int = 14
    temporal_patch_size: int = 1
    merge_size: int = 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The encoder's input for one image."""
        if self.patching == "qwen2_vl":
            patches = (self.height // self.patch_size) * (self.width // self.patch_size)
            return (patches, 3 * self.temporal_patch_size * self.patch_size * self.patch_size)
        return (1, 3, self.height, self.width)


@dataclass(frozen=True)
class EncoderFile:
    """One compiled encoder: the ``.rknn`` the board runs and what the simulator rebuilds it from."""

    dtype: str
    rknn: str
    sha256: str
    size: int
    simulator: Mapping[str, Any]
    fp16_tensors: tuple[str, ...] = ()

    def graph_spec(self, name: str) -> dict[str, Any]:
        """The graph description the RKNN engines take (:mod:`rkedge.runtime.rknn.engine`)."""
        return {"name": name, "rknn": self.rknn, "simulator": dict(self.simulator)}


@dataclass(frozen=True)
class VlmManifest:
    name: str
    family: str
    architecture: str
    llm_file: str
    llm_manifest: str
    hidden_size: int
    image_tokens: int
    preprocessing: Preprocessing
    tags: ImageTags
    encoders: Mapping[str, EncoderFile]
    default_dtype: str
    input_name: str
    output_name: str
    min_toolkit: str
    verification: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, Any] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    created_at: str = ""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    @property
    def embedding_floats(self) -> int:
        """Floats one image contributes to ``image_embed``: image tokens x hidden size."""
        return self.image_tokens * self.hidden_size

    def encoder(self, dtype: str | None = None) -> EncoderFile:
        dtype = dtype or self.default_dtype
        if dtype not in self.encoders:
            raise ModelFileError(f"this VLM has no {dtype} vision encoder (it has {', '.join(self.encoders)}).",
                                 fix=f"pick one of: {', '.join(self.encoders)}")
        return self.encoders[dtype]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["encoders"] = {k: asdict(v) for k, v in self.encoders.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VlmManifest:
        if data.get("schema") != SCHEMA:
            raise ModelFileError(f"not a VLM manifest (schema {data.get('schema')!r}, expected {SCHEMA}).", fix=_FIX)
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ModelFileError(f"VLM manifest schema version {data.get('schema_version')} is not supported "
                                 f"(this rkedge reads {SCHEMA_VERSION}).", fix="use the rkedge that wrote it")
        try:
            pre = dict(data["preprocessing"])
            for key in ("mean", "std", "background"):
                pre[key] = tuple(pre[key])
            encoders = {k: EncoderFile(**{**v, "fp16_tensors": tuple(v.get("fp16_tensors", ()))})
                        for k, v in data["encoders"].items()}
            fields = {k: data[k] for k in ("name", "family", "architecture", "llm_file", "llm_manifest", "hidden_size",
                                           "image_tokens", "default_dtype", "input_name", "output_name",
                                           "min_toolkit")}
            return cls(**fields, preprocessing=Preprocessing(**pre), tags=ImageTags(**data["tags"]),
                       encoders=encoders, verification=data.get("verification", {}),
                       versions=data.get("versions", {}), sources=tuple(data.get("sources", ())),
                       created_at=data.get("created_at", ""))
        except (KeyError, TypeError) as exc:
            raise ModelFileError(f"the VLM manifest is incomplete or malformed ({type(exc).__name__}: {exc}).",
                                 fix=_FIX) from None


def vlm_file(path: str | Path) -> Path | None:
    """``vlm.json`` for a VLM folder, the file itself, or None."""
    path = Path(path)
    candidate = path / VLM_FILE if path.is_dir() else path
    return candidate if candidate.name == VLM_FILE and candidate.is_file() else None


def is_vlm(path: str | Path) -> bool:
    return vlm_file(path) is not None


def read_vlm(path: str | Path) -> tuple[Path, VlmManifest]:
    """The VLM folder and its manifest, every file it names present."""
    file = vlm_file(path)
    if file is None:
        raise ModelFileError(f"{path} is not an rkedge VLM folder (no {VLM_FILE}).",
                             fix="pass the folder rkedge convert wrote for a vision-language model")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read {file}: {exc}", fix=_FIX) from None
    manifest = VlmManifest.from_dict(data)
    folder = file.parent
    named = [manifest.llm_file, manifest.llm_manifest, *(e.rknn for e in manifest.encoders.values())]
    for name in named:
        if not (folder / name).is_file():
            raise ModelFileError(f"{folder / name} is missing from the VLM folder.", fix="copy the whole folder")
    return folder, manifest


def write_vlm(folder: Path, manifest: VlmManifest) -> Path:
    path = folder / VLM_FILE
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path
