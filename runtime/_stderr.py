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
from typing import TextIO


@dataclass
class CapturedText:
    text: str = ""


def _flush(stream: TextIO) -> None:
    try:
        stream.flush()
    except (AttributeError, ValueError):  # replaced or closed streams
        pass


@contextlib.contextmanager
def _redirected(fd: int, target: int, stream: TextIO) -> Iterator[None]:
    """File descriptor ``fd`` points at ``target`` for the duration; ``stream`` (Python's buffer over ``fd``) is
    flushed on the way in and out, so its text lands on the side it was written on."""
    _flush(stream)
    saved = os.dup(fd)
    os.dup2(target, fd)
    try:
        yield
    finally:
        _flush(stream)
        os.dup2(saved, fd)
        os.close(saved)


@contextlib.contextmanager
def capture_native_stderr() -> Iterator[CapturedText]:
    captured = CapturedText()
    with tempfile.TemporaryFile() as sink:
        try:
            with _redirected(2, sink.fileno(), sys.stderr):
                yield captured
        finally:
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
    with _redirected(1, 2, sys.stdout):
        yield


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
