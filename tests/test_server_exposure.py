"""Browser exposure policy (issue 11 item 6): JSON bodies only, a Host allow-list defaulting to loopback names,
no requests from foreign web pages unless opted in with --cors-origin, security headers on the page."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient
from server_helpers import LOOPBACK, REPLY, chat_body, make_app, write_model

from rkedge.runtime.server.settings import ServerSettings

OLLAMA_CHAT = json.dumps({"model": "served", "messages": [{"role": "user", "content": "hi"}], "stream": False})


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "served.rkllm")


@pytest.fixture
def client(model: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    app, llm = make_app(model, **getattr(request, "param", {}))
    with TestClient(app, base_url=LOOPBACK) as c:
        yield c
    llm.close()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_bodies_a_web_page_can_post_without_preflight_are_refused(client, content_type):
    for path in ("/api/chat", "/v1/chat/completions"):
        response = client.post(path, content=OLLAMA_CHAT, headers={"content-type": content_type})
        assert response.status_code == 415, (path, response.text)
    assert "JSON" in client.post("/api/chat", content=OLLAMA_CHAT, headers={"content-type": "text/plain"}
                                 ).json()["error"], "Ollama's error shape"


def test_json_or_no_type_from_a_non_browser_client_is_served(client):
    assert client.post("/api/chat", content=OLLAMA_CHAT).json()["message"]["content"] == REPLY
    typed = client.post("/api/chat", content=OLLAMA_CHAT, headers={"content-type": "application/json; charset=utf-8"})
    assert typed.status_code == 200


def test_foreign_web_pages_are_refused_and_the_servers_own_page_is_not(client):
    evil: dict[str, Any] = {"Origin": "http://evil.example"}
    assert client.post("/v1/chat/completions", json=chat_body(), headers=evil).status_code == 403
    untyped = client.post("/api/chat", content=OLLAMA_CHAT, headers=evil)
    assert untyped.status_code == 403 and "evil.example" in untyped.json()["error"]
    own = client.post("/v1/chat/completions", json=chat_body(), headers={"Origin": LOOPBACK})
    assert own.status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "192.168.1.7"])
def test_a_host_name_off_the_allow_list_is_refused(client, host):
    response = client.get("/v1/models", headers={"Host": host})
    assert response.status_code == 421 and response.json()["error"]["code"] == "host_not_allowed"
    for name in ("localhost:8080", "127.0.0.1", "[::1]:8080"):
        assert client.get("/v1/models", headers={"Host": name}).status_code == 200, name


def test_the_allow_list_follows_the_bind_address():
    assert ServerSettings(Path("m"), host="127.0.0.1").hosts() == ("localhost", "127.0.0.1", "::1", "[::1]")
    assert "10.0.0.5" in (ServerSettings(Path("m"), host="10.0.0.5").hosts() or ())
    assert ServerSettings(Path("m"), host="0.0.0.0").hosts() is None, "all interfaces: the key guards it"
    assert ServerSettings(Path("m"), host="0.0.0.0", allowed_hosts=("Board.local",)).hosts() == ("board.local",)


@pytest.mark.parametrize("client", [{"cors_origins": ("http://app.example",)}], indirect=True)
def test_cors_is_opt_in_per_origin(client):
    preflight = client.options("/v1/chat/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    allowed = client.post("/v1/chat/completions", json=chat_body(), headers={"Origin": "http://app.example"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.example"
    other = client.post("/v1/chat/completions", json=chat_body(), headers={"Origin": "http://other.example"})
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


def test_no_cors_headers_without_the_option(client):
    response = client.get("/v1/models", headers={"Origin": LOOPBACK})
    assert "access-control-allow-origin" not in response.headers


def test_the_page_has_a_strict_content_security_policy(client):
    response = client.get("/")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["x-frame-options"] == "DENY" and response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
