"""Tool calls and reasoning over the OpenAI and Ollama APIs (issue 14, items 1 and 2), with a Qwen3-style model
(its real chat template) and the official clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from server_helpers import LOOPBACK, LiveServer

from rkedge.runtime.server.app import create_app
from rkedge.runtime.server.settings import ServerSettings
from rkedge.runtime.simmodel import simulated_manifest, write_simulated_model

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
QWEN3 = (TEMPLATES / "qwen3-0.6b.jinja").read_text()
QWEN_TOKENS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
TWO_CALLS = CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
RESPONSES = [
    {"match": "<tool_response>", "text": "<think>\nThe tool said sunny.\n</think>\n\nIt is sunny in Zürich."},
    {"match": "two places", "text": "<think>\nTwo calls.\n</think>\n\n" + TWO_CALLS},
    {"match": "broken", "text": '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'},
    {"match": "weather", "text": "<think>\nThe user wants the weather.\n</think>\n\n" + CALL},
    {"text": "<think>\nA greeting.\n</think>\n\nHello there."},
]


@pytest.fixture
def qwen(tmp_path: Path) -> Path:
    manifest = simulated_manifest(name="qwen3", toolkit_version="1.2.3", chat_family="qwen2", responses=RESPONSES,
                                  architecture="Qwen3ForCausalLM",
                                  extra={"jinja_chat_template": QWEN3, "special_tokens": QWEN_TOKENS})
    return write_simulated_model(tmp_path / "qwen3.rkllm", manifest)


def app_for(model: Path) -> Any:
    return create_app(ServerSettings(model_path=model, library="mock", abi="1.3.0",
                                     llm_params={"max_new_tokens": 256, "max_context_len": 4096}))


@pytest.fixture
def client(qwen: Path) -> Iterator[TestClient]:
    with TestClient(app_for(qwen), base_url=LOOPBACK) as client:
        yield client


@pytest.fixture
def live(qwen: Path) -> Iterator[LiveServer]:
    app = app_for(qwen)
    server = LiveServer(app)
    yield server
    server.stop()
    app.state.pool.close_all()


def ask(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def prompt_of(run: dict[str, Any]) -> str:
    return bytes.fromhex(run["prompt_hex"]).decode()


def test_openai_client_gets_tool_calls_reasoning_and_answers_the_tool_result(live, call_log):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="x")
    first = client.chat.completions.create(model="qwen3", messages=ask("What is the weather in Zürich?"),
                                           tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Zürich"}
    assert choice.message.model_extra["reasoning_content"].strip() == "The user wants the weather."
    assert "<tools>" in prompt_of(call_log.runs()[-1]) and '"get_weather"' in prompt_of(call_log.runs()[-1])
    follow = client.chat.completions.create(model="qwen3", tools=[WEATHER], messages=[
        *ask("What is the weather in Zürich?"),
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}])
    assert follow.choices[0].finish_reason == "stop"
    assert follow.choices[0].message.content == "It is sunny in Zürich."
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in prompt_of(call_log.runs()[-1])


def test_openai_streaming_deltas(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="x")
    reasoning, content, calls, finish = [], [], [], None
    for chunk in client.chat.completions.create(model="qwen3", messages=ask("weather in two places"),
                                                tools=[WEATHER, TIME], stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if (delta.model_extra or {}).get("reasoning_content"):
            reasoning.append(delta.model_extra["reasoning_content"])
        if delta.content:
            content.append(delta.content)
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(reasoning).strip() == "Two calls."
    assert "".join(content).strip() == ""
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather"), (1, "get_time")]
    assert json.loads(calls[0].function.arguments) == {"city": "Zürich"} and calls[0].id
    assert finish == "tool_calls"


def test_tool_choice_none_named_and_no_parallel_calls(client, call_log):
    none = client.post("/v1/chat/completions", json={"messages": ask("weather?"), "tools": [WEATHER],
                                                     "tool_choice": "none"}).json()
    assert "<tools>" not in prompt_of(call_log.runs()[-1]), "tool_choice none: the tools are not offered"
    assert "tool_calls" not in none["choices"][0]["message"]
    named = client.post("/v1/chat/completions", json={
        "messages": ask("weather?"), "tools": [WEATHER, TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert named.status_code == 200
    prompt = prompt_of([run for run in call_log.runs() if not run.get("token_ids")][-1])  # not a decode step
    assert '"get_weather"' in prompt and '"get_time"' not in prompt
    unknown = client.post("/v1/chat/completions", json={
        "messages": ask("weather?"), "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tool_choice"
    single = client.post("/v1/chat/completions", json={"messages": ask("weather in two places"),
                                                       "tools": [WEATHER, TIME], "parallel_tool_calls": False}).json()
    assert [c["function"]["name"] for c in single["choices"][0]["message"]["tool_calls"]] == ["get_weather"]


def test_malformed_tool_output_is_plain_content(client):
    reply = client.post("/v1/chat/completions", json={"messages": ask("broken"), "tools": [WEATHER]})
    assert reply.status_code == 200
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert '"get_weather"' in choice["message"]["content"]


def test_enable_thinking_per_request(client, call_log):
    client.post("/v1/chat/completions", json={"messages": ask("hi"),
                                              "chat_template_kwargs": {"enable_thinking": False}})
    assert prompt_of(call_log.runs()[-1]).endswith("<think>\n\n</think>\n\n"), "Qwen3's thinking off"
    client.post("/v1/chat/completions", json={"messages": ask("hi"), "reasoning_effort": "none"})
    assert prompt_of(call_log.runs()[-1]).endswith("<think>\n\n</think>\n\n")
    client.post("/v1/chat/completions", json={"messages": ask("hi"), "reasoning_effort": "high"})
    assert prompt_of(call_log.runs()[-1]).endswith("<|im_start|>assistant\n")
    client.post("/api/chat", json={"model": "qwen3", "messages": ask("hi"), "think": False, "stream": False})
    assert prompt_of(call_log.runs()[-1]).endswith("<think>\n\n</think>\n\n")


def test_ollama_client_gets_tool_calls_and_thinking(live):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=live.url)
    reply = client.chat(model="qwen3:latest", messages=ask("What is the weather in Zürich?"), tools=[WEATHER],
                        think=True)
    assert (reply.message.thinking or "").strip() == "The user wants the weather."
    [call] = reply.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Zürich"}
    answer = client.chat(model="qwen3", messages=[
        *ask("What is the weather in Zürich?"),
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "content": '{"sky": "sunny"}', "tool_name": "get_weather"}])
    assert answer.message.content == "It is sunny in Zürich."
    parts = list(client.chat(model="qwen3", messages=ask("hi"), stream=True, think=True))
    assert "".join(p.message.thinking or "" for p in parts).strip() == "A greeting."
    assert "".join(p.message.content or "" for p in parts).strip() == "Hello there."


def test_tools_on_a_hand_written_template_are_refused_not_lost(tmp_path):
    from server_helpers import write_model

    with TestClient(app_for(write_model(tmp_path / "served.rkllm")), base_url=LOOPBACK) as client:
        refused = client.post("/v1/chat/completions", json={"messages": ask("hi"), "tools": [WEATHER]})
    assert refused.status_code == 400 and "tools would be lost" in refused.json()["error"]["message"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_a_forced_tool_call_is_constrained_to_the_tools_schema(client, call_log, choice):
    pytest.importorskip("llguidance")
    for seed in range(10):
        reply = client.post("/v1/chat/completions", json={"messages": ask("broken"), "tools": [WEATHER],
                                                          "tool_choice": choice, "seed": seed, "temperature": 1.0})
        choice_out = reply.json()["choices"][0]
        assert choice_out["finish_reason"] == "tool_calls", choice_out
        [call] = choice_out["message"]["tool_calls"]
        arguments = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] == "get_weather" and set(arguments) == {"city"}
        assert isinstance(arguments["city"], str)
    assert all(run["mode"] == 2 for run in call_log.runs()[-5:]), "decoded in logits mode, masked on the host"
    free = client.post("/v1/chat/completions", json={"messages": ask("broken"), "tools": [WEATHER]}).json()
    assert "tool_calls" not in free["choices"][0]["message"], "tool_choice auto: the model's own (broken) output"
