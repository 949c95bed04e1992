"""Running the `rkedge` command as a user would: a child process of this interpreter."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``rkedge ARGS...``, its output captured; ``env`` adds to this process's environment."""
    return subprocess.run([sys.executable, "-m", "rkedge", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
