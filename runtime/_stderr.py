"""Capturing what a native library writes to file descriptor 2.

``rkllm_init`` on 1.1.x returns 0 after some failures and only its stderr tells (SEMANTICS.md), so init
runs under :func:`capture_native_stderr` and the text is scanned for known failure lines. The capture is
process-wide while it lasts (anything else written to fd 2 meanwhile is captured too and re-emitted).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class CapturedText:
    text: str = ""


@contextlib.contextmanager
def capture_native_stderr() -> Iterator[CapturedText]:
    captured = CapturedText()
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace")


def echo_to_stderr(text: str) -> None:
    if text:
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.flush()
