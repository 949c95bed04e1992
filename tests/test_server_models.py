"""Several models on one NPU and the Ollama surface GUI clients call (issue 14, items 4, 6 and 7): names and
aliases, load on demand, LRU unload within a budget, keep_alive, /api/ps, /api/show, /api/tags, HEAD /,
options, LoRA adapters by name, and no NPU memory leaked by unloads."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from server_helpers import LOOPBACK, LiveServer

from rkedge.runtime.server.app import create_app
from rkedge.runtime.server.models import model_files, parse_keep_alive
from rkedge.runtime.server.settings import ServerSettings
from rkedge.runtime.simmodel import build_cli_manifest, write_simulated_lora, write_simulated_model


def sim_model(path: Path, name: str, reply: str, memory_mb: float = 512.0, **fields: Any) -> Path:
    manifest = build_cli_manifest(chat_family="gemma", name=name, toolkit_version="1.2.1", responses=(reply,),
                                  memory_mb=memory_mb, **fields)
    write_simulated_model(path, manifest)
    return path


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[Path, Path]:
    return (sim_model(tmp_path / "alpha.rkllm", "alpha", "I am alpha."),
            sim_model(tmp_path / "beta.rkllm", "beta", "I am beta."))


def serve(paths: tuple[Path, ...], **settings: Any) -> Any:
    return create_app(ServerSettings(model_path=paths[0], model_paths=paths, library="mock", abi="1.3.0",
                                     llm_params={"max_new_tokens": 64}, **settings))


@pytest.fixture
def pair(two_models: tuple[Path, Path]) -> Iterator[TestClient]:
    with TestClient(serve(two_models, max_loaded=1), base_url=LOOPBACK) as client:
        yield client


def chat(client: TestClient, model: str, content: str = "hi", **extra: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}],
                                                     **extra})


def loaded(client: TestClient) -> list[str]:
    return [m["name"] for m in client.get("/api/ps").json()["models"]]


def test_alternating_requests_for_two_models_are_both_answered_one_loaded_at_a_time(call_log, pair):
    for _ in range(3):
        for name in ("alpha", "beta"):
            response = chat(pair, name)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == f"I am {name}."
            assert response.json()["model"] == name
            assert loaded(pair) == [name], "--max-loaded 1: the other model was unloaded first"
    inits, destroys = len(call_log.entries("rkllm_init")), len(call_log.entries("rkllm_destroy"))
    assert inits - destroys == 1, "one model on the NPU, every other init destroyed"
    ids = [m["id"] for m in pair.get("/v1/models").json()["data"]]
    assert ids == ["alpha", "beta"]


def test_fifty_loads_and_unloads_leave_no_model_on_the_simulated_npu(two_models, call_log):
    with TestClient(serve(two_models, max_loaded=1), base_url=LOOPBACK) as client:
        for i in range(50):
            name = ("beta", "alpha")[i % 2]
            assert chat(client, name, max_tokens=2).status_code == 200
        assert client.app.state.pool.loads == 51  # the first model at startup, then one per switch
        assert client.app.state.pool.unloads == 50
    inits, destroys = call_log.entries("rkllm_init"), call_log.entries("rkllm_destroy")
    assert len(inits) == 51 and len(destroys) == 51, "shutdown freed the last one: the allocation count is zero"


def test_names_ollama_clients_send_and_unknown_models(pair):
    for name in ("alpha:latest", "alpha.rkllm", "alpha"):
        assert chat(pair, name).json()["choices"][0]["message"]["content"] == "I am alpha."
    missing = chat(pair, "gamma")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    ollama = pair.post("/api/chat", json={"model": "gamma:latest", "messages": [{"role": "user", "content": "x"}],
                                          "stream": False})
    assert ollama.status_code == 404 and isinstance(ollama.json()["error"], str), "Ollama's error shape"
    assert "alpha" in ollama.json()["error"]


def test_memory_budget_unloads_the_least_recently_used(tmp_path, call_log):
    paths = tuple(sim_model(tmp_path / f"{n}.rkllm", n, f"I am {n}.", memory_mb=400) for n in ("a", "b", "c"))
    with TestClient(serve(paths, memory_budget_bytes=900 << 20), base_url=LOOPBACK) as client:
        assert chat(client, "b").status_code == 200
        assert sorted(loaded(client)) == ["a", "b"], "two of 400 MB fit in 900 MB"
        assert chat(client, "a").status_code == 200  # a is now the most recently used
        assert chat(client, "c").status_code == 200
        assert sorted(loaded(client)) == ["a", "c"], "b, the least recently used, went first"


def test_keep_alive_zero_and_the_empty_load_call(pair):
    load = pair.post("/api/chat", json={"model": "beta", "messages": []})
    assert load.status_code == 200 and load.json()["done_reason"] == "load" and load.json()["done"] is True
    assert loaded(pair) == ["beta"]
    unload = pair.post("/api/generate", json={"model": "beta", "keep_alive": 0})
    assert unload.json()["done_reason"] == "unload"
    assert loaded(pair) == []
    answered = pair.post("/api/chat", json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                            "stream": False, "keep_alive": 0})
    assert answered.json()["message"]["content"] == "I am alpha."
    assert loaded(pair) == [], "keep_alive 0 unloads once the answer is sent"
    kept = pair.post("/api/chat", json={"model": "alpha", "messages": [], "keep_alive": "10m"})
    assert kept.status_code == 200
    [entry] = pair.get("/api/ps").json()["models"]
    assert entry["name"] == "alpha" and entry["size_vram"] == 512 << 20 and entry["context_length"]


def test_keep_alive_expiry_unloads_an_idle_model(pair):
    import time

    pair.post("/api/chat", json={"model": "alpha", "messages": [], "keep_alive": "1s"})
    assert loaded(pair) == ["alpha"]
    deadline = time.monotonic() + 10
    while loaded(pair) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert loaded(pair) == []


def test_keep_alive_durations():
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive(0) == 0
    assert parse_keep_alive(-1) is None and parse_keep_alive("-1") is None and parse_keep_alive("250ms") == 0.25
    with pytest.raises(Exception, match="not a duration"):
        parse_keep_alive("soon")


def test_tags_show_and_head(pair, two_models):
    tags = pair.get("/api/tags").json()["models"]
    assert [t["name"] for t in tags] == ["alpha", "beta"]
    alpha = tags[0]
    assert alpha["digest"] == hashlib.sha256(two_models[0].read_bytes()).hexdigest()
    assert alpha["size"] == two_models[0].stat().st_size
    assert alpha["details"] == {"parent_model": "", "format": "rkllm", "family": "gemma", "families": ["gemma"],
                                "parameter_size": None, "quantization_level": "W8A8"}
    show = pair.post("/api/show", json={"model": "beta:latest"})
    assert show.status_code == 200, show.text
    body = show.json()
    assert body["details"]["family"] == "gemma" and body["model_info"]["gemma.context_length"] == 4096
    assert "num_ctx" in body["parameters"] and "completion" in body["capabilities"]
    assert pair.post("/api/show", json={"name": "nope"}).status_code == 404
    head = pair.head("/")
    assert head.status_code == 200


def test_options_are_mapped_and_num_ctx_is_checked(call_log, pair):
    options = {"num_predict": 3, "temperature": 0.3, "top_k": 7, "top_p": 0.8, "repeat_penalty": 1.3,
               "num_ctx": 1024, "seed": 1, "num_thread": 4}
    reply = pair.post("/api/chat", json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                         "stream": False, "options": options})
    assert reply.status_code == 200, reply.text
    run = call_log.runs()[-1]
    assert run["max_new_tokens"] == 3
    sampling = run["sampling"]
    assert (sampling["top_k"], sampling["top_p"], sampling["temperature"], sampling["repeat_penalty"]) == \
        (7, pytest.approx(0.8), pytest.approx(0.3), pytest.approx(1.3))
    too_big = pair.post("/api/chat", json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                           "stream": False, "options": {"num_ctx": 100000}})
    assert too_big.status_code == 400 and "num_ctx" in too_big.json()["error"]


def test_a_folder_is_served_and_adapters_are_skipped(tmp_path):
    sim_model(tmp_path / "one.rkllm", "one", "1")
    sim_model(tmp_path / "two.rkllm", "two", "2")
    (tmp_path / "one_lora.rkllm").write_bytes(b"x")
    (tmp_path / "one.rkllm.json").write_text("{}")
    assert [p.name for p in model_files([tmp_path])] == ["one.rkllm", "two.rkllm"]


def test_lora_adapters_are_selected_by_model_name(tmp_path, call_log):
    from rkedge.runtime.simmodel import read_simulated_model

    base = sim_model(tmp_path / "served.rkllm", "served", "plain")
    manifest = read_simulated_model(base)
    manifest["responses"] = [{"lora": "pirate", "text": "Arr."}, {"text": "plain"}]
    write_simulated_model(base, manifest)
    adapter = write_simulated_lora(tmp_path / "pirate_lora.rkllm", model_id=manifest["model_id"], name="pirate")
    with TestClient(serve((base,), lora=((None, None, adapter),)), base_url=LOOPBACK) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == ["served", "served+pirate"]
        assert chat(client, "served+pirate").json()["choices"][0]["message"]["content"] == "Arr."
        assert call_log.runs()[-1]["lora"] == "pirate"
        assert chat(client, "served").json()["choices"][0]["message"]["content"] == "plain"
        assert call_log.runs()[-1]["lora"] is None
        assert chat(client, "served+parrot").status_code == 404
        assert client.post("/api/generate", json={"model": "served+pirate:latest", "prompt": "x",
                                                  "stream": False}).json()["response"] == "Arr."


def test_serve_cli_takes_several_models_and_the_new_options(two_models):
    from click.testing import CliRunner

    from rkedge.runtime.cli import serve as serve_command

    calls: list[ServerSettings] = []
    import rkedge.runtime.server.run as run_module

    original = run_module.run_server
    run_module.run_server = lambda settings, verbose=False: calls.append(settings)  # type: ignore[assignment]
    try:
        result = CliRunner().invoke(serve_command, [*map(str, two_models), "--mock", "--max-loaded", "1",
                                                    "--memory-budget", "2"])
    finally:
        run_module.run_server = original
    assert result.exit_code == 0, result.output
    [settings] = calls
    assert settings.model_paths == two_models and settings.max_loaded == 1
    assert settings.memory_budget_bytes == 2 << 30


def test_the_official_ollama_client(two_models):
    ollama = pytest.importorskip("ollama")
    app = serve(two_models, max_loaded=1)
    server = LiveServer(app)
    try:
        client = ollama.Client(host=server.url)
        names = [m.model for m in client.list().models]
        assert names == ["alpha", "beta"]
        shown = client.show("alpha:latest")
        assert shown.details is not None and shown.details.family == "gemma"
        reply = client.chat(model="beta:latest", messages=[{"role": "user", "content": "hi"}],
                            options={"num_predict": 20, "temperature": 0.5})
        assert reply.message.content == "I am beta."
        streamed = "".join(part.message.content or "" for part in
                           client.chat(model="alpha", messages=[{"role": "user", "content": "hi"}], stream=True))
        assert streamed == "I am alpha."
        assert [m.model for m in client.ps().models] == ["alpha"]
        client.generate(model="alpha", prompt="", keep_alive=0)
        assert client.ps().models == []
        with pytest.raises(ollama.ResponseError) as raised:
            client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
        assert raised.value.status_code == 404
    finally:
        server.stop()
        app.state.pool.close_all()


def test_health_lists_models(pair):
    health = pair.get("/health").json()
    assert health["models"] == ["alpha", "beta"] and health["loaded"] == ["alpha"]
    assert json.dumps(health)


def test_prompt_cache_is_loaded_at_each_load_of_the_first_model(call_log, two_models, tmp_path):
    from rkedge.runtime.simmodel import CACHE_MAGIC, read_simulated_model

    model_id = read_simulated_model(two_models[0])["model_id"]
    cache = tmp_path / "system.cache"
    cache.write_bytes(CACHE_MAGIC + json.dumps({"model_id": model_id, "tokens": 12}).encode() + b"\n")
    with TestClient(serve(two_models, max_loaded=1, prompt_cache=cache), base_url=LOOPBACK) as client:
        assert chat(client, "beta").status_code == 200
        assert chat(client, "alpha").status_code == 200
    loads = call_log.entries("rkllm_load_prompt_cache")
    assert [row["path"] for row in loads] == [str(cache), str(cache)], "at startup and when alpha came back"


def test_a_request_for_another_model_waits_behind_the_current_run(tmp_path, call_log):
    import threading

    import httpx

    long_reply = " ".join(f"w{i}" for i in range(60))
    alpha = sim_model(tmp_path / "alpha.rkllm", "alpha", long_reply, pace="2000,60")  # ~1 s
    beta = sim_model(tmp_path / "beta.rkllm", "beta", "I am beta.")
    app = serve((alpha, beta), max_loaded=1)
    server = LiveServer(app)
    results: dict[str, Any] = {}

    def ask(name: str) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            results[name] = http.post("/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": "hi"}]}).json()
            results[name + "_at"] = __import__("time").monotonic()

    try:
        first = threading.Thread(target=ask, args=("alpha",))
        first.start()
        from server_helpers import wait_for

        wait_for(lambda: app.state.pool.running)
        second = threading.Thread(target=ask, args=("beta",))
        second.start()
        first.join()
        second.join()
    finally:
        server.stop()
        app.state.pool.close_all()
    assert results["alpha"]["choices"][0]["message"]["content"] == long_reply, "the run was not cut for the load"
    assert results["beta"]["choices"][0]["message"]["content"] == "I am beta."
    assert results["alpha_at"] <= results["beta_at"]
    kinds = ("rkllm_run", "run_end", "rkllm_destroy", "rkllm_init")
    calls = [row["fn"] for row in call_log.entries() if row["fn"] in kinds]
    assert calls[-7:] == ["rkllm_run", "run_end", "rkllm_destroy", "rkllm_init", "rkllm_run", "run_end",
                          "rkllm_destroy"], \
        "alpha's run ended before it was destroyed and beta loaded (then shutdown freed beta)"


def test_lora_option_forms(tmp_path):
    import click

    from rkedge.runtime.server.options import model_settings

    adapter = tmp_path / "pirate_lora.rkllm"
    adapter.write_bytes(b"x")
    parsed = model_settings(None, 1.5, (str(adapter), f"served={adapter}", f"served={adapter}:arr"), None)
    assert parsed["lora"] == ((None, None, adapter), ("served", None, adapter), ("served", "arr", adapter))
    assert parsed["memory_budget_bytes"] == int(1.5 * 2**30)
    with pytest.raises(click.BadParameter):
        model_settings(None, None, (str(tmp_path / "missing.rkllm"),), None)


def test_several_models_need_the_lora_owner_named(two_models, tmp_path):
    from rkedge.errors import InputError

    adapter = write_simulated_lora(tmp_path / "x_lora.rkllm", model_id="m", name="x")
    with pytest.raises(InputError, match="say which model"):
        serve(two_models, lora=((None, None, adapter),))
