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


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Sends what native code prints to fd 1 to fd 2 for the duration (rknn-toolkit2 logs to stdout, which must
    stay clean for the chat's output and for --json)."""
    try:
        sys.stdout.flush()
    except (AttributeError, ValueError):
        pass
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        try:
            sys.stdout.flush()
        except (AttributeError, ValueError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def capture_native_output(*, echo: bool = False) -> Iterator[CapturedText]:
    """Both of native code's streams into one text (rknn-toolkit2 logs its progress to both). The text is echoed
    to stderr afterwards when ``echo`` is set or when the block raised (it is what explains the failure)."""
    captured = CapturedText()
    failed = True
    try:
        with capture_native_stderr() as inner, native_stdout_to_stderr():
            captured = inner
            yield captured
        failed = False
    finally:
        if echo or failed:
            echo_to_stderr(captured.text)
