"""The vision encoder of a converted VLM: its ``.rknn`` through RKNNLite on the board, or the same graph rebuilt
in the rknn-toolkit2 simulator on x86 (a ``.rknn`` cannot run in the simulator; the bundle keeps the ONNX or the
hybrid-quantization files it came from). The engines are the RKNN backend's (:mod:`rkedge.runtime.rknn.engine`).

    encoder = VisionEncoder.open("out/")            # RKNNLite if installed, else the simulator
    images = encoder.encode([png_bytes, "cat.jpg"])  # ImageEmbeddings [2, image tokens, hidden]
    llm_input = images.media("1.3.0"), images.prompt("What differs?")
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rkedge.errors import GenerationError, InputError, LibraryNotFoundError
from rkedge.runtime.vision.bundle import VlmManifest, read_vlm
from rkedge.runtime.vision.multimodal import ImageEmbeddings
from rkedge.runtime.vision.preprocess import ImageSource, preprocess

if TYPE_CHECKING:
    from rkedge.runtime.rknn.engine import _GraphSet

Backend = Literal["auto", "rknnlite", "simulator"]


def _has_rknnlite() -> bool:
    import importlib.util

    return importlib.util.find_spec("rknnlite") is not None


class VisionEncoder:
    """One encoder context; :meth:`encode` runs the images of a message one after another (the graph has batch 1)."""

    def __init__(self, folder: Path, manifest: VlmManifest, *, dtype: str | None = None,
                 backend: Backend = "auto") -> None:
        from rkedge.runtime.rknn.engine import LiteGraphs, SimulatorGraphs

        self.folder = folder
        self.manifest = manifest
        self.file = manifest.encoder(dtype)
        spec = [self.file.graph_spec("vision")]
        if backend == "auto":
            backend = "rknnlite" if _has_rknnlite() else "simulator"
        if backend == "rknnlite" and not _has_rknnlite():
            raise LibraryNotFoundError("RKNNLite (rknn-toolkit-lite2) is not installed.",
                                       fix="on the board: pip install rknn-toolkit-lite2; on x86 use the simulator")
        self.backend = backend
        self._graphs: _GraphSet | None = LiteGraphs(folder, spec) if backend == "rknnlite" \
            else SimulatorGraphs(folder, spec)
        self.last_latency_ms: list[float] = []

    @classmethod
    def open(cls, path: str | Path, *, dtype: str | None = None, backend: Backend = "auto") -> VisionEncoder:
        folder, manifest = read_vlm(path)
        return cls(folder, manifest, dtype=dtype, backend=backend)

    def run_pixels(self, pixels: Any) -> Any:
        """The encoder on one preprocessed input (``preprocessing.input_shape``): [image tokens, hidden] float32."""
        import numpy as np

        if self._graphs is None:
            raise GenerationError("the vision encoder was closed.", fix="open it again")
        expected = self.manifest.preprocessing.input_shape
        if tuple(pixels.shape) != expected:
            raise InputError(f"the encoder takes {expected}, not {tuple(pixels.shape)}.",
                             fix="preprocess the image with rkedge.runtime.vision.preprocess")
        started = time.perf_counter()
        out = self._graphs.run(0, [np.ascontiguousarray(pixels, dtype=np.float32)])[0]
        self.last_latency_ms.append((time.perf_counter() - started) * 1000)
        rows = np.asarray(out, dtype=np.float32)
        if rows.size != self.manifest.embedding_floats:
            raise GenerationError(f"the encoder returned {rows.size} floats, not image tokens x hidden = "
                                  f"{self.manifest.image_tokens} x {self.manifest.hidden_size}.",
                                  fix="reconvert the model: the .rknn does not match vlm.json")
        return rows.reshape(self.manifest.image_tokens, self.manifest.hidden_size)

    def encode(self, images: Sequence[ImageSource]) -> ImageEmbeddings:
        """The images of one message, preprocessed (as the HF processor) and encoded."""
        import numpy as np

        if not images:
            raise InputError("no image to encode.", fix="pass at least one image")
        self.last_latency_ms = []
        spec = self.manifest.preprocessing
        rows = np.stack([self.run_pixels(preprocess(image, spec)) for image in images])
        return ImageEmbeddings(rows, self.manifest.tags, spec.width, spec.height)

    def close(self) -> None:
        if self._graphs is not None:
            self._graphs.release()
            self._graphs = None

    def __enter__(self) -> VisionEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_images(bundle: str | Path | VisionEncoder, images: Sequence[ImageSource], *,
                  dtype: str | None = None) -> ImageEmbeddings:
    """``images`` through the VLM folder's encoder (opened and closed here unless an open encoder is given)."""
    if isinstance(bundle, VisionEncoder):
        return bundle.encode(images)
    try:
        with VisionEncoder.open(bundle, dtype=dtype) as encoder:
            return encoder.encode(images)
    except ImportError as exc:  # numpy missing on a minimal install
        raise LibraryNotFoundError(f"image input needs numpy ({exc}).", fix="pip install 'rkedge[rknn-board]'") \
            from None
