"""Embeddings from the runtime's last-hidden-layer mode (issue 14, item 5): /v1/embeddings, Ollama's /api/embed
and legacy /api/embeddings; pooling per model, normalised, batches; models not meant for it refused."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from server_helpers import LOOPBACK, LiveServer

from rkedge.runtime.server.app import create_app
from rkedge.runtime.server.engine import pool_rows, pooling_for
from rkedge.runtime.server.settings import ServerSettings
from rkedge.runtime.simmodel import simulated_manifest, write_simulated_model

HIDDEN = 48


def model(path: Path, name: str) -> Path:
    return write_simulated_model(path, simulated_manifest(name=name, toolkit_version="1.2.3", hidden_size=HIDDEN,
                                                          chat_family="qwen2"))


def app_for(paths: tuple[Path, ...], **settings: Any) -> Any:
    return create_app(ServerSettings(model_path=paths[0], model_paths=paths, library="mock", abi="1.3.0",
                                     **settings))


@pytest.fixture
def embedder(tmp_path: Path) -> Path:
    return model(tmp_path / "qwen3-embedding.rkllm", "Qwen3-Embedding-0.6B")


@pytest.fixture
def client(embedder: Path, tmp_path: Path) -> Iterator[TestClient]:
    chat = model(tmp_path / "chat.rkllm", "chat")
    with TestClient(app_for((embedder, chat)), base_url=LOOPBACK) as client:
        yield client


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


def test_a_batch_gives_normalised_vectors_of_the_hidden_size(client, call_log):
    texts = ["the cat sat", "a different sentence", "the cat sat"]
    body = client.post("/v1/embeddings", json={"model": "Qwen3-Embedding-0.6B", "input": texts}).json()
    vectors = [row["embedding"] for row in body["data"]]
    assert [row["index"] for row in body["data"]] == [0, 1, 2]
    assert all(len(v) == HIDDEN for v in vectors)
    assert all(norm(v) == pytest.approx(1.0, abs=1e-6) for v in vectors)
    assert vectors[0] == vectors[2], "equal inputs, equal vectors"
    assert vectors[0] != vectors[1]
    assert body["usage"]["prompt_tokens"] > 0
    assert [run["mode"] for run in call_log.runs()] == [1, 1, 1], "the last-hidden-layer mode, one run per input"
    assert [run["prompt"] for run in call_log.runs()] == texts, "embedded as sent, no chat template"


def test_ollama_embed_and_the_legacy_endpoint_agree(client):
    embed = client.post("/api/embed", json={"model": "Qwen3-Embedding-0.6B:latest", "input": ["x", "y"]}).json()
    assert len(embed["embeddings"]) == 2 and embed["prompt_eval_count"] > 0
    legacy = client.post("/api/embeddings", json={"model": "Qwen3-Embedding-0.6B", "prompt": "x"}).json()
    assert legacy["embedding"] == embed["embeddings"][0]
    openai_shape = client.post("/v1/embeddings", json={"model": "Qwen3-Embedding-0.6B", "input": "x"}).json()
    assert openai_shape["data"][0]["embedding"] == legacy["embedding"]


def test_models_not_meant_for_embeddings_are_refused_unless_allowed(embedder, tmp_path):
    chat = model(tmp_path / "chat.rkllm", "chat")
    with TestClient(app_for((embedder, chat)), base_url=LOOPBACK) as client:
        refused = client.post("/v1/embeddings", json={"model": "chat", "input": "x"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_an_embedding_model"
        assert client.post("/api/embed", json={"model": "chat", "input": "x"}).json()["error"]
    with TestClient(app_for((chat,), embeddings_any_model=True), base_url=LOOPBACK) as client:
        allowed = client.post("/v1/embeddings", json={"model": "chat", "input": "x"})
        assert allowed.status_code == 200 and len(allowed.json()["data"][0]["embedding"]) == HIDDEN


def test_pooling_per_model():
    assert pooling_for({"name": "Qwen3-Embedding-0.6B"}) == "last"
    assert pooling_for({"name": "bge-small"}) == "mean"
    assert pooling_for({"name": "x", "embedding_pooling": "last"}) == "last"
    rows = [3.0, 0.0, 0.0, 4.0]  # two positions of width 2
    assert pool_rows(rows, 2, 2, "last") == [0.0, 1.0]
    assert pool_rows(rows, 2, 2, "mean") == pytest.approx([0.6, 0.8])


def test_the_official_openai_client_embeds(embedder):
    openai = pytest.importorskip("openai")
    app = app_for((embedder,))
    server = LiveServer(app)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        result = client.embeddings.create(model="Qwen3-Embedding-0.6B", input=["one", "two", "one"])
        vectors = [d.embedding for d in result.data]  # sent as base64 float32, decoded by the client
        assert len(vectors) == 3 and len(vectors[0]) == HIDDEN
        assert vectors[0] == vectors[2] and norm(vectors[1]) == pytest.approx(1.0, abs=1e-5)
    finally:
        server.stop()
        app.state.pool.close_all()
