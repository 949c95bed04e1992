"""Operations (issue 11 item 11): shutdown aborts in-flight runs after a grace period, Retry-After comes from
measured service times, one access-log line per request, a taken port fails before any "listening" line."""

from __future__ import annotations

import json
import logging
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

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from server_helpers import LOOPBACK, LiveServer, chat_body, make_app, wait_for, write_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(model: Path, port: int, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "rkedge", "serve", str(model), "--mock", "--port", str(port),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_a_taken_port_fails_before_any_listening_line(tmp_path):
    model = write_model(tmp_path / "served.rkllm")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = serve(model, taken.getsockname()[1])
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert "already in use" in stderr and "fix:" in stderr
    assert "rkedge serve:" not in stderr and "Traceback" not in stderr


def test_shutdown_aborts_in_flight_runs_after_the_grace_period(tmp_path, call_log):
    model = write_model(tmp_path / "served.rkllm", pace="2000,20")  # the 200-token reply takes 10 s
    port = free_port()
    proc = serve(model, port, "--shutdown-grace", "1", env={"RKEDGE_MOCK_CALL_LOG": str(call_log.path)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url), timeout=60)
        outcomes: list[Any] = []

        def client(stream: bool) -> None:
            try:
                outcomes.append(httpx.post(url + "/v1/chat/completions", timeout=30,
                                           json=chat_body("long", stream=stream)).status_code)
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=client, args=(stream,)) for stream in (True, False)]
        for thread in threads:
            thread.start()
        wait_for(lambda: call_log.runs())
        time.sleep(0.3)
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - stopped_at
        for thread in threads:
            thread.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 6, f"stopped {took:.1f} s after SIGTERM (grace 1 s), not at the end of the 10 s reply"
    ends = call_log.entries("run_end")
    assert ends and all(end["aborted"] for end in ends), ends
    assert len(outcomes) == 2
    assert '"GET /health" 200' in stderr, "the access log has a line per request"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_retry_after_comes_from_measured_service_times(tmp_path, monkeypatch):
    app, llm = make_app(write_model(tmp_path / "served.rkllm", pace="100000,100"), max_queue=0)
    server = LiveServer(app)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for _ in range(3):  # about 0.4 s each: measured
                assert http.post("/v1/chat/completions", json=chat_body("long", max_tokens=40)).status_code == 200
            busy = threading.Thread(target=http.post, args=("/v1/chat/completions",),
                                    kwargs={"json": chat_body("long", max_tokens=150)})
            busy.start()
            wait_for(lambda: app.state.engine.running)
            with httpx.Client(base_url=server.url, timeout=60) as other:
                refused = other.post("/v1/chat/completions", json=chat_body("hi"))
            busy.join()
    finally:
        server.stop()
        llm.close()
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    assert refused.headers["Retry-After"] == "1", "a place frees when the running ~0.4 s generation ends"


def test_one_access_log_line_per_request(tmp_path, caplog):
    app, llm = make_app(write_model(tmp_path / "served.rkllm"))
    with caplog.at_level(logging.INFO, logger="rkedge.serve.access"), TestClient(app, base_url=LOOPBACK) as client:
        client.post("/v1/chat/completions", json=chat_body())
        client.get("/no/such/page")
        client.post("/api/chat", content=json.dumps({"messages": [{"role": "assistant", "content": "x"}]}))
    llm.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "rkedge.serve.access"]
    assert len(lines) == 3, lines
    assert '"POST /v1/chat/completions" 200' in lines[0] and '"GET /no/such/page" 404' in lines[1]
    assert '"POST /api/chat" 400' in lines[2]


def test_the_listening_socket_says_tcp_so_asyncio_turns_nagle_off():
    """With proto 0 asyncio leaves TCP_NODELAY off and every small response waits ~40 ms for a delayed ACK."""
    from rkedge.runtime.server.run import bind

    listener = bind("127.0.0.1", 0)
    try:
        assert listener.proto == socket.IPPROTO_TCP
    finally:
        listener.close()


def test_a_request_that_waits_too_long_gets_503_with_retry_after(tmp_path):
    app, llm = make_app(write_model(tmp_path / "served.rkllm", pace="100000,100"), queue_timeout_s=0.3)
    server = LiveServer(app)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            busy = threading.Thread(target=http.post, args=("/v1/chat/completions",),
                                    kwargs={"json": chat_body("long", max_tokens=150)})
            busy.start()
            wait_for(lambda: app.state.engine.running)
            with httpx.Client(base_url=server.url, timeout=60) as other:
                waited = other.post("/v1/chat/completions", json=chat_body("hi"))
                ollama = other.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}]})
            busy.join()
    finally:
        server.stop()
        llm.close()
    assert waited.status_code == 503 and waited.json()["error"]["code"] == "busy"
    assert int(waited.headers["Retry-After"]) >= 1
    assert ollama.status_code == 503 and "waited" in ollama.json()["error"], "Ollama's error shape"
