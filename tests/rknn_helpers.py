"""What the RKNN backend's tests share: the trained tiny RecurrentGemma fixture, its held-out text, and whether
rknn-toolkit2 (its simulator) is installed here."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny-recurrentgemma"
HELD_OUT = DATA / "rknn" / "heldout.txt"
CALIBRATION = DATA / "rknn" / "calibration.json"
BYTE_OFFSET = 3  # the fixture's byte-level ids: 0 pad, 1 eos, 2 bos; byte b -> b + 3


def has_rknn_toolkit() -> bool:
    try:
        import rknn.api  # noqa: F401
    except Exception:  # any import failure means no usable toolkit
        return False
    return True


needs_simulator = pytest.mark.skipif(not has_rknn_toolkit(),
                                     reason="rknn-toolkit2 is not installed (x86_64, CPython 3.6-3.12 only; "
                                            "scripts/install-rknn-toolkit2.sh)")


def held_out_tokens(count: int, skip: int = 0) -> list[int]:
    """BOS, then ``count - 1`` byte tokens of the held-out text from byte ``skip``."""
    return [2] + [b + BYTE_OFFSET for b in HELD_OUT.read_bytes()[skip:skip + count - 1]]
