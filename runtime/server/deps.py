"""FastAPI dependencies: the engine, the served model, the API key, and JSON bodies read after the key check."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from rkedge.runtime.server.engine import Engine
from rkedge.runtime.server.errors import ApiError, validation_error
from rkedge.runtime.server.settings import ServerSettings

Body = TypeVar("Body", bound=BaseModel)


@dataclass
class Served:
    """The model this server serves, as clients name it."""

    name: str
    model_path: Path
    metadata: dict[str, Any]
    aliases: frozenset[str]
    started: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, requested: str | None) -> None:
        if requested and requested not in self.aliases:
            raise ApiError(404, f"model {requested!r} is not served here; this server serves {self.name!r}.",
                           code="model_not_found", param="model")


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_served(request: Request) -> Served:
    served: Served = request.app.state.served
    return served


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
