"""The RKNN model bundle: a folder with ``bundle.json`` and the files it names.

``bundle.json`` (schema ``rkedge-rknn-bundle``) lists the graphs in the order a decode step runs them (layer
chunks in ``graphs``, then the LM head, split by vocabulary rows, in ``heads``), their input and output names and shapes, the host-side tables (embedding, tokenizer),
the dtype and hybrid layers, and the verification and quality figures. ``<graph>.rknn`` files are what the board
runs; the ONNX graphs and the hybrid-quantization artifacts (``.model``/``.data``/``.quantization.cfg``) let the
rknn-toolkit2 simulator rebuild the same graphs on x86 (a ``.rknn`` cannot run in the simulator).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rkedge.errors import ModelFileError

SCHEMA = "rkedge-rknn-bundle"
SCHEMA_VERSION = 1
BUNDLE_FILE = "bundle.json"


def bundle_file(path: str | Path) -> Path | None:
    """``bundle.json`` of a bundle folder (or the file itself), or None when ``path`` is not a bundle."""
    path = Path(path)
    candidate = path / BUNDLE_FILE if path.is_dir() else path
    if candidate.name == BUNDLE_FILE and candidate.is_file():
        return candidate
    return None


def is_rknn_bundle(path: str | Path) -> bool:
    return bundle_file(path) is not None


def read_bundle(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The bundle folder and its validated ``bundle.json``."""
    file = bundle_file(path)
    if file is None:
        raise ModelFileError(f"{path} is not an rkedge RKNN bundle (no {BUNDLE_FILE}).",
                             fix="pass the folder rkedge convert --backend rknn wrote")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelFileError(f"{file} is not valid JSON ({exc}).") from exc
    if data.get("schema") != SCHEMA:
        raise ModelFileError(f"{file} is not an RKNN bundle manifest (schema {data.get('schema')!r}).")
    if int(data.get("schema_version", 0)) > SCHEMA_VERSION:
        raise ModelFileError(f"{file} uses bundle schema {data['schema_version']}; this rkedge reads {SCHEMA_VERSION}.",
                             fix="upgrade rkedge on this machine")
    folder = file.parent
    for graph in [*data["graphs"], *data["heads"]]:
        if not (folder / graph["rknn"]).is_file():
            raise ModelFileError(f"{folder / graph['rknn']} is missing from the bundle.", fix="copy the whole folder")
    return folder, data
