"""Values that would reach the runtime unchecked (issue 11 item 7): each works, or is refused with a 400 whose
message names the field; nothing is silently ignored and nothing reaches the NPU."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient
from server_helpers import LOOPBACK, REPLY, chat_body, make_app, write_model


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app, llm = make_app(write_model(tmp_path / "served.rkllm"))
    with TestClient(app, base_url=LOOPBACK) as c:
        yield c
    llm.close()


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": "served", "prompt": "hi", **extra}


REFUSED = [
    ("/v1/chat/completions", chat_body(frequency_penalty=1e308), "frequency_penalty"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1e400}',
     "presence_penalty"),
    ("/v1/chat/completions", chat_body(temperature=1e308), "temperature"),
    ("/v1/chat/completions", chat_body(top_k=10**30), "top_k"),
    ("/v1/chat/completions", chat_body(max_tokens=10**30), "max_tokens"),
    ("/v1/chat/completions", chat_body("before\x00after"), "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\x00b"}]}]},
     "messages"),
    ("/v1/chat/completions", chat_body(n=2), "n"),
    ("/v1/chat/completions", chat_body(logprobs=True), "logprobs"),
    ("/v1/chat/completions", chat_body(response_format={"type": "xml"}), "response_format"),
    ("/v1/chat/completions", chat_body(functions=[{"name": "f"}]), "functions"),
    ("/v1/chat/completions", chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("/v1/completions", completion(prompt=["one", "two"]), "prompt"),
    ("/v1/completions", completion(prompt=[[1, 2, 3]]), "prompt"),
    ("/v1/completions", completion(logprobs=2), "logprobs"),
    ("/v1/completions", completion(n=3), "n"),
    ("/v1/completions", completion(suffix="tail"), "suffix"),
    ("/v1/completions", completion(prompt="a\x00b"), "prompt"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "format": "yaml"}, "format"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "messages.0.images"),
    ("/api/generate", {"prompt": "hi", "options": {"temperature": 1e308}}, "options.temperature"),
    ("/api/generate", {"prompt": "a\x00b"}, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "field"), REFUSED, ids=[f"{p}:{f}" for p, _, f in REFUSED])
def test_refused_with_a_400_naming_the_field(client, call_log, path, body, field):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert f"({field})" in message or f"({field}." in message, message
    assert call_log.runs() == [], "nothing reached the NPU"


def test_a_lone_surrogate_is_a_400_not_a_500(client, call_log):
    raw = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    assert "surrogate" in response.json()["error"]["message"] or "escape" in response.json()["error"]["message"]
    assert call_log.runs() == []


def test_values_that_work(client, call_log):
    reply = client.post("/v1/chat/completions", json=chat_body(n=1, logprobs=False, frequency_penalty=0.5,
                                                               response_format={"type": "text"}))
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == REPLY
    assert call_log.last("rkllm_run")["sampling"]["frequency_penalty"] == pytest.approx(0.5)
    echoed = client.post("/v1/completions", json=completion(prompt=["hi"], echo=True)).json()
    assert echoed["choices"][0]["text"] == "hi" + REPLY, "echo: the prompt, then the completion"
    streamed = client.post("/v1/completions", json=completion(echo=True, stream=True)).text
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in streamed.splitlines()
             if line.startswith("data: {") and json.loads(line[6:]).get("choices")]
    assert "".join(texts) == "hi" + REPLY
    unlimited = client.post("/api/generate", json={"prompt": "hi", "stream": False, "options": {"num_predict": -1}})
    assert unlimited.status_code == 200 and unlimited.json()["response"] == REPLY
