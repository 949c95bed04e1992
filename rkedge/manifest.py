"""The manifest: one JSON file beside every ``.rkllm`` (``<file>.json``), shared by host and board.

The host writes it when a conversion finishes; the board (``LLM``, ``doctor``) reads the chat template
family, BOS/EOS ids, context limit and recommended runtime settings from it, and ``doctor`` checks the
model's toolkit version against the runtime (F-3/F-4). Every argument that reached the toolkit is recorded,
with the inputs' hashes and every version involved, so a file can be traced back to its source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rkedge.errors import ModelFileError

SCHEMA = "rkedge-manifest"
SCHEMA_VERSION = 1
REQUIRED = ("schema", "schema_version", "model_file", "sha256", "size", "platform", "dtype", "toolkit",
            "max_context_limit", "toolkit_calls")


def manifest_path(model_file: str | Path) -> Path:
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


def validate(manifest: dict[str, Any], where: str = "manifest") -> dict[str, Any]:
    if manifest.get("schema") != SCHEMA:
        raise ModelFileError(f"{where} is not an rkedge manifest (schema {manifest.get('schema')!r}).")
    if int(manifest.get("schema_version", 0)) > SCHEMA_VERSION:
        raise ModelFileError(f"{where} uses manifest schema {manifest['schema_version']}, newer than this rkedge "
                             f"understands ({SCHEMA_VERSION}).", fix="upgrade rkedge on this machine")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise ModelFileError(f"{where} lacks {', '.join(missing)}.", fix="reconvert, or restore the manifest")
    return manifest


def read_manifest(model_file: str | Path) -> dict[str, Any] | None:
    """The validated manifest beside ``model_file``, or None when there is none."""
    path = manifest_path(model_file)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelFileError(f"{path} is not valid JSON ({exc}).") from exc
    return validate(data, str(path))
