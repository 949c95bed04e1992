"""`rkedge serve` on the simulated NPU: OpenAI and Ollama APIs, queueing, faults, metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from server_helpers import LOOPBACK, REPLY, LiveServer, chat_body, make_app, write_model  # noqa: E402


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "served.rkllm")


@pytest.fixture
def client(model: Path) -> Iterator[TestClient]:
    app, llm = make_app(model)
    with TestClient(app, base_url=LOOPBACK) as c:
        yield c
    llm.close()


@pytest.fixture
def live(model: Path, request) -> Iterator[LiveServer]:
    options = getattr(request, "param", {})
    app, llm = make_app(model, **options)
    server = LiveServer(app)
    yield server
    server.stop()
    llm.close()


# --- compatibility ----------------------------------------------------------------------------------------

def test_official_openai_client_stream_and_non_stream(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
    result = client.chat.completions.create(model="served", messages=[{"role": "user", "content": "hi"}])
    assert result.choices[0].message.content == REPLY
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens > 5 and result.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model="served", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1, "one id across the chunks"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert chunks[-1].usage.completion_tokens == result.usage.completion_tokens
    assert [m.id for m in client.models.list()] == ["served"]
    completion = client.completions.create(model="served", prompt="hi", max_tokens=3)
    assert completion.choices[0].finish_reason == "length"


def test_curl_streams_server_sent_events(live):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(["curl", "-sN", live.url + "/v1/chat/completions", "-H", "content-type: application/json",
                          "-d", json.dumps(chat_body(stream=True))], capture_output=True, text=True, timeout=60).stdout
    frames = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    pieces = [json.loads(f)["choices"][0]["delta"].get("content") or "" for f in frames[:-1]]
    assert "".join(pieces) == REPLY


def test_ollama_api(client):
    version = client.get("/api/version").json()
    assert "version" in version
    tags = client.get("/api/tags").json()["models"]
    assert tags[0]["name"] == "served" and tags[0]["details"]["format"] == "rkllm"
    body = json.dumps({"model": "served", "messages": [{"role": "user", "content": "hi"}], "stream": False})
    reply = client.post("/api/chat", content=body).json()  # no content-type, as some Ollama clients send
    assert reply["message"]["content"] == REPLY and reply["done"] is True and reply["eval_count"] > 5
    lines = [json.loads(l) for l in client.post("/api/chat", json=json.loads(body) | {"stream": True}).text.splitlines()]
    assert "".join(l["message"]["content"] for l in lines) == REPLY and lines[-1]["done"] is True
    generated = client.post("/api/generate", json={"model": "served", "prompt": "hi", "stream": False}).json()
    assert generated["response"] == REPLY


def test_health_metrics_and_openapi(client):
    client.post("/v1/chat/completions", json=chat_body())
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["simulated"] is True and health["abi"] == "1.3.0"
    metrics = client.get("/metrics").text
    assert 'rkedge_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in metrics
    assert "rkedge_time_to_first_token_seconds_count 1" in metrics
    assert "rkedge_queue_depth 0" in metrics and "rkedge_decode_tokens_per_second_bucket" in metrics
    schema = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/api/chat", "/health"} <= set(schema["paths"])


def test_web_page_is_self_contained(client):
    page = client.get("/").text
    assert "/v1/chat/completions" in page and "served" in page
    assert "<script src" not in page and "<link" not in page and "http://" not in page


# --- behaviour ------------------------------------------------------------------------------------------

def test_kv_cache_is_reused_across_requests(client, call_log):
    first = client.post("/v1/chat/completions", json=chat_body("hi")).json()["choices"][0]["message"]["content"]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and then?"}]
    client.post("/v1/chat/completions", json={"model": "served", "messages": history})
    run = call_log.last("rkllm_run")
    assert run["kv_tokens_before"] > 0
    assert bytes.fromhex(run["prompt_hex"]).decode().startswith("<end_of_turn>\n<start_of_turn>user\nand then?")


def test_per_request_parameters_on_1_3_0(client, call_log):
    reply = client.post("/v1/chat/completions", json=chat_body("long", temperature=0.3, top_k=7, max_tokens=5)).json()
    run = call_log.last("rkllm_run")
    assert run["sampling"]["temperature"] == pytest.approx(0.3) and run["sampling"]["top_k"] == 7
    assert run["max_new_tokens"] == 5
    assert reply["usage"]["completion_tokens"] == 5 and reply["choices"][0]["finish_reason"] == "length"


def test_per_request_parameters_before_1_3_0(model):
    app, llm = make_app(model, abi="1.2.1")
    with TestClient(app, base_url=LOOPBACK) as client:
        response = client.post("/v1/chat/completions", json=chat_body("long", temperature=0.3, max_tokens=4))
        assert response.status_code == 200
        assert response.headers["X-Rkedge-Ignored-Params"] == "temperature"
        body = response.json()
        assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length"
    llm.close()


def test_stop_sequences(client):
    reply = client.post("/v1/chat/completions", json=chat_body("stop", stop=["STOP"])).json()
    assert reply["choices"][0]["message"]["content"] == "alpha beta "


# --- faults: each gets the right status and message, and the next request is served ------------------------

def next_request_works(client) -> None:
    reply = client.post("/v1/chat/completions", json=chat_body("hi"))
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == REPLY


def test_error_mid_stream(client, monkeypatch):
    monkeypatch.setenv("RKEDGE_MOCK_FAULT", json.dumps({"error_after_tokens": 3}))
    text = client.post("/v1/chat/completions", json=chat_body("long", stream=True)).text
    frames = [l[6:] for l in text.splitlines() if l.startswith("data: ")]
    error = json.loads(frames[-2])["error"]
    assert frames[-1] == "[DONE]" and "RKLLM_RUN_ERROR" in error["message"] and error["code"] == "generation_failed"
    monkeypatch.delenv("RKEDGE_MOCK_FAULT")
    next_request_works(client)


def test_disconnect_mid_stream_aborts_the_generation(live, call_log, monkeypatch):
    monkeypatch.setenv("RKEDGE_MOCK_PACE", "1000,100")
    with httpx.Client(base_url=live.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_body("long", stream=True)) as response:
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen == 4:
                    break
        deadline = time.monotonic() + 10
        while not call_log.entries("run_end") and time.monotonic() < deadline:
            time.sleep(0.05)
        end = call_log.last("run_end")
        assert end["aborted"] is True and end["generated_tokens"] < 20, "the run stops when the client leaves"
        reply = http.post("/v1/chat/completions", json=chat_body("hi"))
        assert reply.status_code == 200


@pytest.mark.parametrize(("request_kwargs", "status", "code"), [
    ({"content": b'{"messages": [', "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    ({"content": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
      "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    ({"json": chat_body("x " * 10000)}, 400, "context_length_exceeded"),
    ({"json": {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}}, 404, "model_not_found"),
    ({"json": {"model": "served", "messages": []}}, 400, "invalid_request"),
    ({"json": {"model": "served", "messages": [{"role": "assistant", "content": "hi"}]}}, 400, None),
])
def test_bad_requests(client, request_kwargs, status, code):
    response = client.post("/v1/chat/completions", **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    next_request_works(client)


def test_api_key(model):
    app, llm = make_app(model, api_key="s3cret")
    with TestClient(app, base_url=LOOPBACK) as client:
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 401
        wrong = client.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/api/tags").status_code == 401
        good = client.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        assert client.post("/v1/chat/completions", json=chat_body(), headers={"x-api-key": "s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200
    llm.close()


@pytest.mark.parametrize("live", [{"max_queue": 1}], indirect=True)
def test_a_full_queue_gets_429_and_nothing_is_lost(live, monkeypatch):
    monkeypatch.setenv("RKEDGE_MOCK_PACE", "1000,100")
    results: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            response = http.post("/v1/chat/completions", json=chat_body("long", max_tokens=30))
            with lock:
                results.append(response.status_code)
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1
                assert response.json()["error"]["code"] == "queue_full"

    threads = [threading.Thread(target=one) for _ in range(5)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert len(results) == 5, "every request got an answer"
    assert results.count(200) >= 2 and results.count(429) >= 1 and set(results) <= {200, 429}


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", chat_body("long")),
    ("/api/chat", {"model": "served", "messages": [{"role": "user", "content": "long"}], "stream": False}),
])
def test_an_npu_error_without_streaming_is_a_5xx_with_the_runtimes_message(client, monkeypatch, path, body):
    monkeypatch.setenv("RKEDGE_MOCK_FAULT", json.dumps({"error_after_tokens": 3}))
    response = client.post(path, json=body)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error  # OpenAI's shape, Ollama's shape
    assert "RKLLM_RUN_ERROR" in message
    assert f'rkedge_requests_total{{endpoint="{path}",status="500"}} 1.0' in client.get("/metrics").text
    monkeypatch.delenv("RKEDGE_MOCK_FAULT")
    next_request_works(client)


def test_the_chat_prompt_is_rendered_once_per_request(model, call_log, monkeypatch):
    app, llm = make_app(model)
    renders: list[int] = []
    template_type = type(llm.template)
    original = template_type.render

    def counting_render(self, *args, **kwargs):
        renders.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(template_type, "render", counting_render)
    with TestClient(app, base_url=LOOPBACK) as client:
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        assert client.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}],
                                              "stream": False}).status_code == 200
    llm.close()
    assert len(renders) == 2, "one rendering per request: counted and sent"
    assert bytes.fromhex(call_log.last("rkllm_run")["prompt_hex"]).decode().endswith("<start_of_turn>model\n")
