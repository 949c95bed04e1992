"""FastAPI dependencies: the model pool, the API key, JSON bodies read after the key, and the lease that binds a
request to the model it names."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from rkedge.runtime.server.engine import Embedded, Engine, Job, embed, is_embedding_model, pooling_for
from rkedge.runtime.server.errors import ApiError, validation_error
from rkedge.runtime.server.models import ModelEntry, ModelPool
from rkedge.runtime.server.responses import Answer, GenerationResponse
from rkedge.runtime.server.schemas import ImageLimits
from rkedge.runtime.server.settings import ServerSettings

Body = TypeVar("Body", bound=BaseModel)


def get_pool(request: Request) -> ModelPool:
    pool: ModelPool = request.app.state.pool
    return pool


def get_image_limits(request: Request) -> ImageLimits:
    """How this server takes images (``--allow-remote-images``, ``--max-image-bytes``)."""
    settings = request.app.state.settings
    return ImageLimits(allow_remote=settings.allow_remote_images, max_bytes=settings.max_image_bytes)


def get_engine(request: Request) -> Engine:
    """The first model's engine (tests and single-model callers)."""
    engine: Engine = request.app.state.engine
    return engine


def get_settings(request: Request) -> ServerSettings:
    settings: ServerSettings = request.app.state.settings
    return settings


bearer = HTTPBearer(auto_error=False, description="The server's --api-key (also accepted as x-api-key).")


async def require_key(request: Request,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """401 unless the request carries the server's key (Bearer or ``x-api-key``); compared in constant time."""
    key = get_settings(request).api_key
    if not key:
        return
    supplied = credentials.credentials if credentials is not None else request.headers.get("x-api-key", "")
    if not secrets.compare_digest(supplied.encode("utf-8", "replace"), key.encode("utf-8")):
        raise ApiError(401, "missing or wrong API key.", type_="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def json_body(model: type[Body]) -> Callable[..., Awaitable[Body]]:
    """A dependency that reads and validates the body only after the key was checked (FastAPI reads declared
    body parameters before any dependency runs, so bodies are not declared as parameters)."""

    async def parse(request: Request, _key: Annotated[None, Depends(require_key)]) -> Body:
        raw = await request.body()
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None

    return parse


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a body read by :func:`json_body`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


#: Builds a request's job on the engine of the model it named, with the LoRA adapter the name carried.
JobBuilder = Callable[[Engine, "str | None"], Job]
AnswerBuilder = Callable[[ModelEntry, str], Answer]  # the entry and the name answers carry


async def generation(pool: ModelPool, requested: str | None, build: JobBuilder, answer: AnswerBuilder, *,
                     stream: bool, keep_alive: float | None = None, set_keep_alive: bool = False) -> Response:
    """Leases the named model (loading it if needed, behind the run in progress), shapes the job and returns
    the response that runs it; the lease ends with the response (then ``keep_alive: 0`` unloads the model)."""
    entry, adapter = pool.resolve(requested)
    engine = await pool.lease(entry)

    def release() -> None:
        pool.release(entry, keep_alive, set_keep_alive=set_keep_alive)
        if set_keep_alive and keep_alive == 0:
            asyncio.ensure_future(pool.unload(entry))

    try:
        job = build(engine, adapter)
        engine.admit()
        label = entry.name + (f"+{adapter}" if adapter else "")
        return GenerationResponse(engine, job, answer(entry, label), stream=stream, on_end=release)
    except BaseException:
        release()
        raise


async def embedding(pool: ModelPool, settings: ServerSettings, requested: str | None,
                    inputs: list[str | list[int]], keep_alive: float | None = None, set_keep_alive: bool = False
                    ) -> tuple[ModelEntry, Embedded]:
    """Embeds ``inputs`` with the named model (leased for the call); refuses a model not meant for embeddings
    unless the server was started with --allow-embeddings."""
    entry, _adapter = pool.resolve(requested)
    if not (is_embedding_model(entry.metadata) or settings.embeddings_any_model):
        raise ApiError(400, f"{entry.name} is not an embedding model (its manifest does not say "
                       "embedding_model); its hidden states would make poor embeddings.",
                       code="not_an_embedding_model", param="model")
    engine = await pool.lease(entry)
    try:
        return entry, await embed(engine, inputs, pooling_for(entry.metadata))
    finally:
        pool.release(entry, keep_alive, set_keep_alive=set_keep_alive)
