"""What a ``.rkllm`` file is, from its first and last bytes: rkedge's simulated model, a vendor model, or a file
the runtime will refuse. Host (``rkedge inspect``) and board (``rkedge doctor``) read model files through here.

The simulated-file magics are rkedge's own format (runtime/simmodel.py writes it, the simulated NPU in
runtime/mock/rkllm_mock.c reads it); the vendor trailer is what one observed 1.1.4 file ends with (charsiu
provenance notes). UNKNOWN: the vendor header layout is not documented, so no other field is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rkedge.errors import ModelFileError
from rkedge.failures import vendor_text

if TYPE_CHECKING:
    from rkedge.manifest import Manifest

#: The first line of a simulated model, simulated LoRA and simulated prompt cache (the C simulator spells the same).
SIMULATED_MODEL_MAGIC = b"RKEDGE-SIMULATED-RKLLM-MODEL/1\n"
SIMULATED_LORA_MAGIC = b"RKEDGE-SIMULATED-RKLLM-LORA/1\n"
SIMULATED_CACHE_MAGIC = b"RKEDGE-SIMULATED-PROMPT-CACHE/1\n"
#: The 8 bytes every rkedge simulated file starts with (enough to tell one from a vendor file).
SIMULATED_FILE_PREFIX = SIMULATED_MODEL_MAGIC[:8]
#: The trailer observed at the end of a vendor .rkllm (one 1.1.4 file; charsiu provenance notes).
VENDOR_TRAILER = re.compile(rb"rkllm-toolkit version: ?v?(\d+\.\d+\.\d+\w*)")
_TRAILER_BYTES = 128
#: rkllama's fabricated layout: "RKLL" then a little-endian uint32 1 (F-13, rkllama#55).
_RKLLAMA_HEAD = b"RKLL" + (1).to_bytes(4, "little")


@dataclass(frozen=True)
class RkllmFile:
    path: Path
    size: int
    simulated: bool
    toolkit_version_trailer: str | None  # vendor files only
    problem: str | None  # why the runtime will refuse it, when the bytes already tell


def read_head(path: str | Path, length: int = 64) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(length)


def is_simulated_model(path: str | Path) -> bool:
    try:
        return read_head(path, len(SIMULATED_MODEL_MAGIC)) == SIMULATED_MODEL_MAGIC
    except OSError:
        return False


def is_simulated_file(path: str | Path) -> bool:
    """Any rkedge simulated file (model, LoRA, prompt cache)."""
    try:
        return read_head(path, len(SIMULATED_FILE_PREFIX)) == SIMULATED_FILE_PREFIX
    except OSError:
        return False


def sniff_rkllm(path: str | Path) -> RkllmFile:
    """Reads the head and the last 128 bytes of a model file (never the whole file: models are gigabytes)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(64)
        handle.seek(max(size - _TRAILER_BYTES, 0))
        tail = handle.read()
    if head.startswith(SIMULATED_MODEL_MAGIC):
        return RkllmFile(path, size, True, None, None)
    trailer = VENDOR_TRAILER.search(tail)
    problem = None
    if head.startswith(_RKLLAMA_HEAD):
        problem = ("F-13: this looks like rkllama's fabricated layout ('RKLL' + version 1), which the runtime "
                   f"rejects with '{vendor_text('runtime.F-13')}'; convert with rkllm-toolkit instead")
    return RkllmFile(path, size, False, trailer.group(1).decode() if trailer else None, problem)


def toolkit_version_trailer(path: str | Path) -> str | None:
    """The toolkit version a vendor file names in its trailer, if it carries one."""
    return sniff_rkllm(path).toolkit_version_trailer


def check_model_file(manifest: Manifest, model_file: str | Path, *, verify_sha256: bool = False) -> None:
    """Refuses a model file that is not the one ``manifest`` describes (a re-conversion that left an old
    ``.rkllm`` beside a new manifest, a copy cut short, another model renamed onto the name).

    The name and size are always compared (a stat, free on the board); ``verify_sha256`` also hashes the whole
    file (seconds per GB on the board: for ``doctor``, not for every load). A manifest without a size or digest
    (older rkedge) is not checked on that point.

    Raises:
        ModelFileError: the file and the manifest disagree; the fix says to reconvert or fetch the pair again.
    """
    from rkedge._fs import sha256_file

    path = Path(model_file)
    fix = "convert again into an empty --out, or copy the .rkllm together with its manifest (.rkllm.json)"
    if manifest.model_file and manifest.model_file != path.name:
        raise ModelFileError(f"the manifest beside {path} describes {manifest.model_file}, not {path.name}.", fix=fix)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelFileError(f"cannot read {path} ({exc.strerror or exc}).",
                             fix="check the path; the manifest is there but its model is not") from None
    if manifest.size is not None and size != manifest.size:
        raise ModelFileError(f"{path} is {size} bytes, but its manifest says {manifest.size}: the two come from "
                             "different conversions (or the copy is incomplete).", fix=fix)
    if verify_sha256 and manifest.sha256 and sha256_file(path) != manifest.sha256:
        raise ModelFileError(f"{path} does not have the sha256 its manifest records: the two come from different "
                             "conversions (or the file is damaged).", fix=fix)
