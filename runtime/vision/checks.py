"""What ``rkedge doctor`` and ``rkedge plan`` need to know about a VLM folder: its files present and intact, the
board's ``librknnrt.so`` (RKNNLite runs the encoder through it), and the encoder's memory (its weights, read from
the ``.rknn`` size, and the embedding buffer handed to the runtime)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rkedge._fs import sha256_file
from rkedge.errors import RkedgeError
from rkedge.runtime.vision.bundle import VlmManifest, read_vlm

#: Where RKNNLite's loader looks for the NPU runtime on Rockchip's images (rknn-toolkit-lite2 docs; the board
#: image's /usr/lib is the usual place).
LIBRKNNRT_PATHS = ("/usr/lib/librknnrt.so", "/usr/lib64/librknnrt.so", "/usr/lib/aarch64-linux-gnu/librknnrt.so",
                   "/usr/local/lib/librknnrt.so")


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    fix: str | None = None


def find_librknnrt(paths: tuple[str, ...] = LIBRKNNRT_PATHS) -> Path | None:
    return next((Path(p) for p in paths if Path(p).is_file()), None)


def check_vlm(path: str | Path, *, on_board: bool = True, verify_hashes: bool = True) -> list[Check]:
    """The doctor's checks of a VLM folder (``on_board``: also look for librknnrt.so)."""
    try:
        folder, manifest = read_vlm(path)
    except RkedgeError as exc:
        return [Check(False, exc.message, exc.fix)]
    checks = [Check(True, f"{manifest.llm_file}: the language model ({manifest.family}) is present")]
    for dtype, encoder in manifest.encoders.items():
        file = folder / encoder.rknn
        intact = file.stat().st_size == encoder.size and (not verify_hashes or sha256_file(file) == encoder.sha256)
        checks.append(Check(intact, f"{encoder.rknn}: the {dtype} vision encoder is "
                                    + ("intact" if intact else "changed since conversion (size or sha256)"),
                            None if intact else "copy the folder again from the conversion's output"))
    if on_board:
        lib = find_librknnrt()
        checks.append(Check(lib is not None, f"librknnrt.so (RKNNLite's NPU runtime): {lib or 'not found'}",
                            None if lib else "install Rockchip's librknnrt.so (rknn-toolkit2 "
                                             "rknpu2/runtime/Linux/librknn_api/aarch64) into /usr/lib"))
    return checks


@dataclass(frozen=True)
class EncoderFootprint:
    weights_bytes: int  # the .rknn file: weights plus the compiled graph (an upper bound for its weights)
    embedding_bytes_per_image: int  # image tokens x hidden size float32, handed to the runtime per image

    def total(self, images: int) -> int:
        return self.weights_bytes + images * self.embedding_bytes_per_image


def encoder_footprint(manifest: VlmManifest, dtype: str | None = None) -> EncoderFootprint:
    """Memory of the encoder for ``rkedge plan``. UNKNOWN: librknnrt's own working buffers (activations) are not
    in the file; on a board ``rknn_query(RKNN_QUERY_MEM_SIZE)`` reports them."""
    return EncoderFootprint(manifest.encoder(dtype).size, manifest.embedding_floats * 4)
