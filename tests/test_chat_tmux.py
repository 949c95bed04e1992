"""`rkedge chat --mock` in a real terminal (tmux): streaming is visible, Ctrl-C stops a reply, the REPL goes on."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt install tmux)")

LONG = " ".join(f"token{i}" for i in range(300))


def pane(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-200"], capture_output=True,
                          text=True).stdout


def wait_for(session: str, predicate, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = pane(session)
        if predicate(text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"timed out; pane was:\n{pane(session)}")


def test_chat_in_a_terminal(tmp_path: Path):
    model = tmp_path / "chat.rkllm"
    rkedge = [sys.executable, "-m", "rkedge"]
    subprocess.run([*rkedge, "mock-model", "--out", str(model), "--template", "gemma", "--pace", "400,40",
                    "--response", f"long=>{LONG}", "--response", "short=>A short answer."], check=True,
                   capture_output=True)
    session = f"rkedge-{uuid.uuid4().hex[:8]}"
    command = " ".join([*rkedge, "chat", str(model), "--mock"])
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50",
                    f"HOME={tmp_path} {command}"], check=True)
    try:
        wait_for(session, lambda t: ">>>" in t)
        subprocess.run(["tmux", "send-keys", "-t", session, "please write something long", "Enter"], check=True)
        first = wait_for(session, lambda t: "token5 " in t)
        assert "token299" not in first, "the reply streams: it is visible before it is complete"
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        stopped = wait_for(session, lambda t: "[stopped]" in t and t.rstrip().endswith(">>>"))
        assert "token299" not in stopped
        subprocess.run(["tmux", "send-keys", "-t", session, "a short one", "Enter"], check=True)
        wait_for(session, lambda t: "A short answer." in t)
        subprocess.run(["tmux", "send-keys", "-t", session, "/exit", "Enter"], check=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            alive = subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0
            if not alive:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("chat did not exit on /exit")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
