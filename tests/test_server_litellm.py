"""Outgrowing one board (issue 14, item 9): LiteLLM's router in front of two `rkedge serve` processes spreads the
requests over both, and when one is stopped mid-run the rest are still answered by the other."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of LiteLLM's price list at import
litellm = pytest.importorskip("litellm")

from rkedge.runtime.simmodel import build_cli_manifest, write_simulated_model  # noqa: E402

REPLY = "an answer of several words from board {board}, streamed at board-like pace"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Board:
    """One `rkedge serve --mock` process (a board), its stderr (the access log) in a file."""

    def __init__(self, folder: Path, board: str) -> None:
        model = folder / f"board-{board}" / "served.rkllm"
        model.parent.mkdir()
        write_simulated_model(model, build_cli_manifest(chat_family="gemma", name="served", toolkit_version="1.2.1",
                                                        pace="2000,40", responses=(REPLY.format(board=board),)))
        self.port = free_port()
        self.log = folder / f"board-{board}.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "rkedge", "serve", str(model), "--mock", "--port",
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=self._log_file)
        deadline = time.monotonic() + 60
        while "rkedge serve:" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self._log_file.close()


@pytest.fixture
def boards(tmp_path: Path) -> Any:
    started = [Board(tmp_path, "A"), Board(tmp_path, "B")]
    yield started
    for board in started:
        board.stop()


def router_for(boards: list[Board]) -> Any:
    deployments = [{"model_name": "rk", "litellm_params": {"model": "openai/served", "api_base": b.url,
                                                           "api_key": "unused", "timeout": 120}} for b in boards]
    return litellm.Router(model_list=deployments, routing_strategy="simple-shuffle", num_retries=4, retry_after=0,
                          allowed_fails=0, cooldown_time=60)


def ask(router: Any, out: list[str], errors: list[BaseException]) -> None:
    try:
        reply = router.completion(model="rk", messages=[{"role": "user", "content": "hi"}], max_tokens=40)
        out.append(reply.choices[0].message.content)
    except BaseException as exc:  # collected: the test says which failed
        errors.append(exc)


def test_requests_spread_over_two_boards_and_survive_one_stopped_mid_run(boards):
    a, b = boards
    router = router_for(boards)
    answers: list[str] = []
    errors: list[BaseException] = []
    for _ in range(16):  # shuffled: all on one board has a chance of 2 in 65,536
        ask(router, answers, errors)
    assert not errors, errors
    assert {"A" if "board A" in t else "B" for t in answers} == {"A", "B"}, "both boards answered"

    answers.clear()
    threads = [threading.Thread(target=lambda: [ask(router, answers, errors) for _ in range(3)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 90
    while '"POST /v1/chat/completions"' not in b.log.read_text().split("rkedge serve:")[-1][-2000:] or \
            len(answers) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)  # runs are in flight on both boards (a reply takes ~1 s at 40 tokens/s)
    b.stop(signal.SIGKILL)  # the board is gone mid-run: no goodbye
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(answers) == 12, "every request was answered, the ones cut off on B by A"
    assert all(t.startswith("an answer of several words") for t in answers)
    access = [line for line in a.log.read_text().splitlines() if '"POST /v1/chat/completions"' in line]
    assert access and all(" 200 " in line for line in access), "one access-log line per request on board A"
