"""Structured output constrained token by token on the simulated NPU (issue 14, item 3): the runtime's logits
mode, llguidance's mask on the host, rkedge's sampler, the KV cache kept between steps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
from fastapi.testclient import TestClient  # noqa: E402
from server_helpers import LOOPBACK, LiveServer  # noqa: E402

from rkedge.runtime.server.app import create_app  # noqa: E402
from rkedge.runtime.server.constrained import allowed_tokens  # noqa: E402
from rkedge.runtime.server.settings import ServerSettings  # noqa: E402
from rkedge.runtime.simmodel import simulated_manifest, write_simulated_model  # noqa: E402

NOT_JSON = '{"name": "Ada", "age": thirty, oops'
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "role"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                         "role": {"enum": ["admin", "user", "guest"]},
                         "score": {"type": "number"}, "active": {"type": "boolean"}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def model_at(path: Path, abi_toolkit: str = "1.2.3") -> Path:
    return write_simulated_model(path, simulated_manifest(name="qwen", toolkit_version=abi_toolkit,
                                                          chat_family="qwen2", vocab_size=4000,
                                                          responses=[{"text": NOT_JSON}]))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(ServerSettings(model_path=model_at(tmp_path / "qwen.rkllm"), library="mock", abi="1.3.0",
                                    llm_params={"max_new_tokens": 160}))
    with TestClient(app, base_url=LOOPBACK) as client:
        yield client


def ask(**extra: Any) -> dict[str, Any]:
    return {"model": "qwen", "messages": [{"role": "user", "content": "Describe a person."}], **extra}


def test_unconstrained_the_scripted_model_writes_invalid_json(client):
    text = client.post("/v1/chat/completions", json=ask()).json()["choices"][0]["message"]["content"]
    assert text == NOT_JSON
    with pytest.raises(ValueError):
        json.loads(text)


def test_a_hundred_sampled_answers_validate_against_the_schema(client, call_log):
    reasons = []
    for seed in range(100):
        body = client.post("/v1/chat/completions", json=ask(response_format=FORMAT, temperature=1.0,
                                                            seed=seed)).json()
        choice = body["choices"][0]
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
        reasons.append(choice["finish_reason"])
    assert set(reasons) == {"stop"}
    runs = call_log.runs()
    assert all(run["mode"] == 2 for run in runs), "every step in logits mode"
    assert all(run["keep_history"] == 1 for run in runs), "the KV cache kept between steps"
    steps = [run for run in runs if run.get("token_ids")]
    assert steps and all(len(run["token_ids"]) == 1 for run in steps), "one token prefilled per step"
    prompts = [run for run in runs if not run.get("token_ids")]
    assert len(prompts) == 100 and all(run["kv_tokens_before"] == 0 for run in prompts), \
        "each answer starts on an empty cache (the last one's was cleared)"


def test_json_object_and_ollama_format_and_a_tight_budget(client):
    body = client.post("/v1/chat/completions", json=ask(response_format={"type": "json_object"}, seed=3)).json()
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)
    ollama = client.post("/api/chat", json={**ask(), "format": PERSON, "stream": False,
                                            "options": {"seed": 5, "temperature": 0.7}}).json()
    jsonschema.validate(json.loads(ollama["message"]["content"]), PERSON)
    plain = client.post("/api/generate", json={"model": "qwen", "prompt": "x", "format": "json", "stream": False})
    assert isinstance(json.loads(plain.json()["response"]), dict)
    tight = client.post("/v1/chat/completions", json=ask(response_format=FORMAT, max_tokens=50, seed=1)).json()
    jsonschema.validate(json.loads(tight["choices"][0]["message"]["content"]), PERSON)
    assert client.post("/v1/chat/completions", json=ask()).json()["choices"][0]["message"]["content"] == NOT_JSON, \
        "the next plain chat is unaffected (the constrained answer's cache was cleared)"


def test_streamed_constrained_output(tmp_path):
    openai = pytest.importorskip("openai")
    app = create_app(ServerSettings(model_path=model_at(tmp_path / "qwen.rkllm"), library="mock", abi="1.3.0"))
    server = LiveServer(app)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            stream=True, response_format=FORMAT, seed=9, **ask()) if c.choices]
        assert len([p for p in pieces if p]) > 5, "streamed token by token"
        jsonschema.validate(json.loads("".join(pieces)), PERSON)
    finally:
        server.stop()
        app.state.pool.close_all()


def test_refused_where_the_abi_lacks_logits_mode(tmp_path):
    model = model_at(tmp_path / "old.rkllm", abi_toolkit="1.1.0")
    app = create_app(ServerSettings(model_path=model, library="mock", abi="1.1"))
    with TestClient(app, base_url=LOOPBACK) as client:
        refused = client.post("/v1/chat/completions", json=ask(response_format=FORMAT))
    assert refused.status_code == 400 and "logits mode" in refused.json()["error"]["message"]


def test_bad_schemas_are_a_400(client):
    bad = client.post("/v1/chat/completions", json=ask(response_format={"type": "json_schema",
                                                                        "json_schema": {"name": "x"}}))
    assert bad.status_code == 400 and "json_schema.schema" in bad.json()["error"]["message"]


def test_mask_decoding():
    mask = (0b1010).to_bytes(4, "little") + (1 << 31).to_bytes(4, "little")
    assert allowed_tokens(mask, 64) == [1, 3, 63]
    assert allowed_tokens(mask, 10) == [1, 3]


@pytest.mark.parametrize("numpy", [True, False], ids=["numpy", "plain"])
def test_the_sampler_only_picks_allowed_tokens(numpy):
    from array import array

    from rkedge.runtime.server.constrained import Sampler

    logits = array("f", [float(i % 7) for i in range(64)])
    mask = ((1 << 5) | (1 << 9) | (1 << 30)).to_bytes(4, "little") + (1 << 1).to_bytes(4, "little")
    for temperature, top_k, top_p in ((0.0, None, None), (1.0, None, None), (1.5, 2, 0.9)):
        sampler = Sampler(temperature, top_k, top_p, seed=1)
        if not numpy:
            sampler._np = None
        picks = {sampler.pick(memoryview(logits), mask, 64) for _ in range(50)}
        assert picks <= {5, 9, 30, 33}
        if temperature == 0:
            assert picks == {5}, "greedy: the highest logit among the allowed (5 % 7 = 5)"
