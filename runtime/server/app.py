"""The FastAPI app: wires the routers (OpenAI ``/v1``, Ollama ``/api``, pages and operations), the error
handlers and the middleware around one :class:`~rkedge.runtime.server.engine.Engine`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from rkedge import __version__
from rkedge.runtime.llm import LLM
from rkedge.runtime.server import ollama, openai, pages
from rkedge.runtime.server.deps import Served
from rkedge.runtime.server.engine import Engine
from rkedge.runtime.server.errors import install_handlers
from rkedge.runtime.server.middleware import BodyLimit, Exposure, Observe
from rkedge.runtime.server.settings import ServerSettings
from rkedge.runtime.tokens import counter_for


def create_app(settings: ServerSettings, llm: LLM | None = None) -> FastAPI:
    if llm is None:
        llm = LLM(settings.model_path, library=settings.library, abi=settings.abi, chat_template=settings.template,
                  **settings.llm_params)
    metadata = dict(llm.metadata)
    name = settings.model_name or metadata.get("name") or settings.model_path.stem
    served = Served(name, settings.model_path, metadata,
                    frozenset({name, settings.model_path.name, settings.model_path.stem}))
    engine = Engine(llm, max_queue=settings.max_queue, queue_timeout_s=settings.queue_timeout_s,
                    counter=counter_for(settings.model_path, metadata, llm.encode))
    opened = llm

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.abort_all()
        opened.close()  # aborts what is left on the NPU, waits for it, and frees the handle

    # The docs are served by pages.router, behind the key like the rest of the API.
    app = FastAPI(title="rkedge serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description="OpenAI- and Ollama-compatible API over a model on the RK3588 NPU (or the simulated NPU).")
    app.state.engine, app.state.llm, app.state.served, app.state.settings = engine, llm, served, settings
    app.state.model_name = name
    app.state.page = pages.render_page(name)
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
    app.add_middleware(Observe, metrics=engine.metrics, routes=[route for router in routers for route in router.routes])
    return app
