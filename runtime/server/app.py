"""The FastAPI app: wires the routers (OpenAI ``/v1``, Ollama ``/api``, pages and operations), the error
handlers and the middleware around one :class:`~rkedge.runtime.server.models.ModelPool` (the served models and
the NPU queue they share)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from rkedge import __version__
from rkedge.runtime.llm import LLM, load_model_metadata
from rkedge.runtime.server import ollama, openai, pages
from rkedge.runtime.server.errors import install_handlers
from rkedge.runtime.server.middleware import BodyLimit, Exposure, Observe
from rkedge.runtime.server.models import ModelEntry, ModelPool, board_memory_budget, entry_names, memory_estimate
from rkedge.runtime.server.settings import ServerSettings


def build_pool(settings: ServerSettings, llm: LLM | None = None) -> ModelPool:
    """The served models (``settings.models()``), the first one loaded (``llm`` when given); the rest load on
    demand."""
    paths = settings.models()
    metadata = [dict(llm.metadata) if (llm is not None and i == 0) else load_model_metadata(p)
                for i, p in enumerate(paths)]
    names = entry_names(paths, metadata, settings.model_name)
    entries = [ModelEntry(name, path, meta, memory_estimate(meta, path))
               for name, path, meta in zip(names, paths, metadata, strict=True)]
    for target, adapter, path in settings.lora:
        owners = [e for e in entries if target is None or target in e.aliases()] if len(entries) > 1 or target \
            else entries
        if len(owners) != 1:
            from rkedge.errors import InputError

            raise InputError(f"--lora {path}: say which model it is for.", fix="--lora MODEL=PATH[:NAME]")
        owners[0].adapters[adapter or _adapter_name(path)] = path
    if settings.prompt_cache is not None:
        entries[0].prompt_cache = settings.prompt_cache

    def opener(entry: ModelEntry) -> LLM:
        return LLM(entry.path, library=settings.library, abi=settings.abi, chat_template=settings.template,
                   **settings.llm_params)

    budget = settings.memory_budget_bytes if settings.memory_budget_bytes is not None else board_memory_budget()
    pool = ModelPool(entries, opener, max_queue=settings.max_queue, queue_timeout_s=settings.queue_timeout_s,
                     max_loaded=settings.max_loaded, memory_budget=budget)
    pool.adopt(entries[0], llm if llm is not None else opener(entries[0]))
    return pool


def _adapter_name(path: Path) -> str:
    return path.stem.removesuffix("_lora")


def create_app(settings: ServerSettings, llm: LLM | None = None, pool: ModelPool | None = None) -> FastAPI:
    pool = pool or build_pool(settings, llm)
    first = pool.default
    assert first.engine is not None
    engine = first.engine
    expiry: list[asyncio.Task[Any]] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        expiry.append(asyncio.ensure_future(pool.watch_expiry()))
        yield
        for task in expiry:
            task.cancel()
        pool.close_all()  # aborts what is left on the NPU, waits for it, and frees every model

    # The docs are served by pages.router, behind the key like the rest of the API.
    app = FastAPI(title="rkedge serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description="OpenAI- and Ollama-compatible API over models on the RK3588 NPU (or the simulated NPU).")
    app.state.pool, app.state.settings = pool, settings
    app.state.engine, app.state.llm = engine, engine.llm  # the first model's (single-model callers, tests)
    app.state.model_name = first.name
    app.state.page = pages.render_page(first.name)
    routers = (openai.router, ollama.public, ollama.router, pages.public, pages.router)
    for router in routers:
        app.include_router(router)
    install_handlers(app)
    # Listed innermost first: Observe sees every request; CORS answers preflights before Exposure checks them.
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(Exposure, settings=settings)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Api-Key"], max_age=600)
    app.add_middleware(Observe, metrics=pool.metrics, routes=[route for router in routers for route in router.routes])
    return app
