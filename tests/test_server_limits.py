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


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("live", [{"header_timeout_s": 0.5, "body_timeout_s": 0.5}], indirect=True)
def test_slow_headers_and_slow_bodies_are_cut_off(live):
    port = int(live.url.rsplit(":", 1)[1])
    silent = socket.create_connection(("127.0.0.1", port))
    trickle = socket.create_connection(("127.0.0.1", port))
    trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
    assert closed_by_server(silent, 3) and closed_by_server(trickle, 3)
    slow_body = raw_request(live.url, "/v1/chat/completions", b"", headers={"Content-Length": "100"})
    slow_body.sendall(b'{"messages"')
    status, body = read_response(slow_body)
    assert status == 408 and isinstance(body, dict) and body["error"]["code"] == "body_timeout"
    assert httpx.get(live.url + "/health").status_code == 200


@pytest.mark.parametrize("live", [{"max_connections": 4, "header_timeout_s": 1.0}], indirect=True)
def test_connections_past_the_cap_are_closed_at_once(live):
    port = int(live.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    closed_at_once = sum(closed_by_server(sock, 0.3) for sock in idle)
    assert closed_at_once >= 6, "only the cap's worth of connections is kept"
    for sock in idle:
        sock.close()
    time.sleep(1.2)  # the idle ones held by the server time out
    assert httpx.get(live.url + "/health").status_code == 200


def test_metrics_stay_bounded_under_10000_random_paths(model):
    import anyio

    app, llm = make_app(model)

    async def scan() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
            for _ in range(10_000):
                assert (await client.get(f"/{uuid.uuid4().hex}/{uuid.uuid4().hex[:6]}")).status_code == 404
            await client.get("/v1/models")
            return (await client.get("/metrics")).text

    text = anyio.run(scan)
    llm.close()
    series = [line for line in text.splitlines() if line.startswith("rkedge_requests_total")]
    assert 'rkedge_requests_total{endpoint="unmatched",status="404"} 10000.0' in series
    assert 'rkedge_requests_total{endpoint="/v1/models",status="200"} 1.0' in series
    assert len(series) == 2 and len(text) < 10_000


def test_what_stays_open_without_the_key(model):
    app, llm = make_app(model, api_key="s3cret")
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        for path in ("/", "/health", "/api/version"):
            assert client.get(path).status_code == 200, path
        for path in ("/metrics", "/docs", "/openapi.json", "/v1/models", "/api/tags"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
    llm.close()
