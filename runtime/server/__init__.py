"""OpenAI- and Ollama-compatible HTTP server over one or several models sharing the NPU (``rkedge serve``).

``create_app(settings)`` builds the FastAPI app; tests pass an already-open :class:`~rkedge.runtime.LLM`.
FastAPI is imported only by the modules in :data:`WEB_MODULES` (the ``serve`` extra).

Modules: ``app`` wires everything; ``openai`` (``/v1``), ``ollama`` (``/api``) and ``pages`` (``/``, ``/health``,
``/metrics``, docs) hold the routers; ``deps`` the dependencies (the pool, key, bodies read after the key, the
lease binding a request to its model);
``schemas`` the request bodies and their checks; ``responses`` the response that owns a request's NPU turn;
``engine`` the queue, the runs and embeddings; ``models`` the served models (names, load on demand, LRU
unload within the memory budget); ``constrained`` structured output and forced tool calls masked token by
token; ``errors`` the HTTP error translation; ``middleware`` the access log, metrics, exposure checks and body
limits; ``metrics`` the Prometheus registry; ``protocol`` uvicorn's HTTP protocol with a header deadline and a
connection cap; ``run`` starts uvicorn; ``settings`` and ``options`` the settings and their CLI options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rkedge.runtime.server.settings import ServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from rkedge.runtime.llm import LLM

__all__ = ["ServerSettings", "WEB_MODULES", "create_app"]

#: Modules that import FastAPI or Starlette at module level (they exist to drive it).
WEB_MODULES = tuple(f"rkedge.runtime.server.{name}" for name in (
    "app", "deps", "errors", "middleware", "ollama", "openai", "pages", "protocol", "responses", "schemas"))


def create_app(settings: ServerSettings, llm: LLM | None = None) -> FastAPI:
    from rkedge.runtime.server.app import create_app as _create

    return _create(settings, llm)
