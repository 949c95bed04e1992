"""The RKNN model bundle: a folder with ``bundle.json`` and the files it names.

``bundle.json`` (schema ``rkedge-rknn-bundle``, read by :func:`rkedge.manifest.read_manifest` like every manifest)
lists the graphs in the order a decode step runs them (layer chunks in ``graphs``, then the LM head, split by
vocabulary rows, in ``heads``), their input and output names and shapes, the host-side tables (embedding,
tokenizer), the dtype and hybrid layers, and the verification and quality figures. An optional ``prefill`` section
names the chunked-prefill graphs (:mod:`rkedge.runtime.rknn.prefill`); a bundle without it runs prompts token by
token. ``<graph>.rknn`` files are what
the board runs; the ONNX graphs and the hybrid-quantization artifacts (``.model``/``.data``/``.quantization.cfg``)
let the rknn-toolkit2 simulator rebuild the same graphs on x86 (a ``.rknn`` cannot run in the simulator).
"""

from __future__ import annotations

from pathlib import Path

from rkedge.errors import ModelFileError
from rkedge.manifest import BUNDLE_FILE, BUNDLE_SCHEMA, BUNDLE_SCHEMA_VERSION, Manifest, bundle_file, read_manifest

# The converter imports these names from here.
SCHEMA = BUNDLE_SCHEMA
SCHEMA_VERSION = BUNDLE_SCHEMA_VERSION


def is_rknn_bundle(path: str | Path) -> bool:
    return bundle_file(path) is not None


def read_bundle(path: str | Path) -> tuple[Path, Manifest]:
    """The bundle folder and its validated ``bundle.json``, every graph file present."""
    file = bundle_file(path)
    manifest = read_manifest(path) if file is not None else None
    if file is None or manifest is None:
        raise ModelFileError(f"{path} is not an rkedge RKNN bundle (no {BUNDLE_FILE}).",
                             fix="pass the folder rkedge convert --backend rknn wrote")
    folder = file.parent
    prefill = (manifest.prefill or {}).get("graphs") or []
    for graph in [*(manifest.graphs or []), *(manifest.heads or []), *prefill]:
        if not (folder / graph["rknn"]).is_file():
            raise ModelFileError(f"{folder / graph['rknn']} is missing from the bundle.", fix="copy the whole folder")
    return folder, manifest


__all__ = ["BUNDLE_FILE", "SCHEMA", "SCHEMA_VERSION", "bundle_file", "is_rknn_bundle", "read_bundle"]
