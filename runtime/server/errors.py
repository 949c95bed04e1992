"""Errors over HTTP: one translation by exception type, one body shape per API family.

OpenAI routes (and everything that is not Ollama's) answer ``{"error": {"message", "type", "param", "code"}}``;
Ollama routes (``/api/...``) answer ``{"error": "..."}``, as Ollama does. Statuses: 400 bad input or context
length, 401 key, 403 origin, 404 model or route, 408 slow body, 413 body too large, 415 content type, 429 queue
full, 503 queue timeout, 500 a failed generation or anything else.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from rkedge.errors import BusyError, ContextLengthExceeded, GenerationError, InputError, RkedgeError


class ApiError(RkedgeError):
    """An error with its HTTP status and OpenAI type; raised by routes and middleware, or made from a domain
    error by :func:`to_api_error`."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code)
        self.status, self.type, self.param = status, type_, param
        self.code_or_none = code
        self.headers = headers or {}


def to_api_error(exc: BaseException) -> ApiError:
    """The one translation of domain errors to HTTP, by type."""
    from rkedge.runtime.server.engine import QueueFull, QueueTimeout

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), type_="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, QueueTimeout):
        return ApiError(503, str(exc), type_="server_error", code="busy",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, BusyError):
        return ApiError(503, str(exc), type_="server_error", code="busy", headers={"Retry-After": "1"})
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, InputError):
        if exc.code == "model_not_found":
            return ApiError(404, str(exc), code=exc.code, param="model")
        return ApiError(400, str(exc), code=exc.code)
    if isinstance(exc, GenerationError):
        return ApiError(500, str(exc), type_="server_error", code=exc.code)
    if isinstance(exc, RkedgeError):
        return ApiError(500, str(exc), type_="server_error", code=exc.code)
    return ApiError(500, f"internal error: {exc}", type_="server_error", code="internal_error")


def is_ollama(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def openai_body(api: ApiError) -> dict[str, Any]:
    return {"error": {"message": api.message if not api.fix else str(api), "type": api.type, "param": api.param,
                      "code": api.code_or_none}}


def ollama_body(api: ApiError) -> dict[str, Any]:
    return {"error": str(api)}


def error_response(path: str, exc: BaseException) -> JSONResponse:
    """The error as the API family of ``path`` spells it."""
    api = to_api_error(exc)
    body = ollama_body(api) if is_ollama(path) else openai_body(api)
    return JSONResponse(body, status_code=api.status, headers=api.headers)


def install_handlers(app: Any) -> None:
    """Exception handlers for every error a route or dependency can raise."""
    from fastapi.exceptions import RequestValidationError

    async def domain(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request.url.path, exc)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(request.url.path, validation_error(exc.errors()))

    async def http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        api = ApiError(exc.status_code, str(exc.detail), code=codes.get(exc.status_code),
                       headers=dict(exc.headers or {}))
        return error_response(request.url.path, api)

    app.add_exception_handler(RkedgeError, domain)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http)


#: Pydantic error types meaning the body is not a JSON object at all.
_NOT_JSON = {"json_invalid", "json_type", "model_attributes_type", "model_type", "dict_type"}


def validation_error(errors: Any) -> ApiError:
    """A 400 naming the first offending field (``messages.0.content``), or ``invalid_json``."""
    errors = list(errors)
    first = errors[0] if errors else {}
    if first.get("type") in _NOT_JSON:
        detail = (first.get("ctx") or {}).get("error")
        return ApiError(400, "the request body is not a valid JSON object (or not UTF-8)" +
                        (f": {detail}." if detail else "."), code="invalid_json")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = str(first.get("msg", "bad value")).removeprefix("Value error, ")
    return ApiError(400, f"invalid request: {message}" + (f" ({where})" if where else ""), code="invalid_request",
                    param=where or None)
