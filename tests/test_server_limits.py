"""Limits enforced while reading, before anything is held: body size, the key before the body, read timeouts,
connections, bounded metrics (issue 11, items 4 and 5)."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

from fastapi.testclient import TestClient  # noqa: E402
from server_helpers import LiveServer, chat_body, make_app, raw_request, write_model  # noqa: E402

MB = 2**20


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "served.rkllm")


@pytest.fixture
def live(model: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    app, llm = make_app(model, **getattr(request, "param", {}))
    server = LiveServer(app)
    yield server
    server.stop()
    llm.close()


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any] | str]:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    try:
        return status, json.loads(rest)
    except ValueError:
        return status, rest.decode(errors="replace")


def test_a_60_mb_body_is_refused_before_it_is_held(live):
    rss = psutil.Process().memory_info().rss
    sock = raw_request(live.url, "/v1/chat/completions", b"", headers={"Content-Length": str(60 * MB)})
    sock.sendall(b'{"messages": [' + b" " * 65536)
    started = time.monotonic()
    status, body = read_response(sock)
    sock.close()
    assert status == 413 and isinstance(body, dict) and body["error"]["code"] == "body_too_large"
    assert time.monotonic() - started < 5, "refused from the header, without waiting for the body"

    def sixty_mb() -> Iterator[bytes]:  # chunked: no Content-Length to refuse up front
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(60):
            yield b"x" * MB

    try:
        response = httpx.post(live.url + "/api/chat", content=sixty_mb(), timeout=30,
                              headers={"content-type": "application/json"})
        assert response.status_code == 413 and "larger than" in response.json()["error"]
    except httpx.TransportError:
        pass  # the server answered 413 and closed while the client was still sending: refused all the same
    assert psutil.Process().memory_info().rss - rss < 30 * MB, "the body was not held"


@pytest.mark.parametrize("live", [{"api_key": "s3cret"}], indirect=True)
def test_the_key_is_checked_before_the_body_is_read(live):
    # Headers announce a 1 MB body that is never sent: a server reading the body first would wait for it.
    sock = raw_request(live.url, "/v1/chat/completions", b"", headers={"Content-Length": str(MB)})
    status, body = read_response(sock)
    sock.close()
    assert status == 401 and isinstance(body, dict) and body["error"]["code"] == "invalid_api_key"
    ollama = raw_request(live.url, "/api/chat", b"", headers={"Content-Length": str(MB)})
    status, body = read_response(ollama)
    ollama.close()
    assert status == 401 and isinstance(body, dict) and "API key" in body["error"], "Ollama's error shape"


def test_a_body_under_the_limit_is_served_and_one_over_it_is_not(model):
    app, llm = make_app(model, max_body_bytes=4096)
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        assert client.post("/v1/chat/completions", json=chat_body("hi")).status_code == 200
        big = client.post("/v1/chat/completions", json=chat_body("x" * 5000))
        assert big.status_code == 413 and "4096 bytes" in big.json()["error"]["message"]
    llm.close()


def unique() -> str:
    return uuid.uuid4().hex
