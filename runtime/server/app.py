"""The FastAPI app: OpenAI (`/v1/...`) and Ollama (`/api/...`) endpoints, `/health`, `/metrics`, the web page.

Errors are translated here, once, by exception type into the OpenAI envelope
``{"error": {"message", "type", "param", "code"}}`` with the right status (400 bad input / context length,
401 key, 404 model, 429 queue full, 503 queue timeout, 500 otherwise).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rkedge import __version__
from rkedge.errors import BusyError, ContextLengthExceeded, InputError, RkedgeError
from rkedge.runtime.llm import LLM
from rkedge.runtime.server.engine import Engine, Outcome, Params, QueueFull, QueueTimeout
from rkedge.runtime.server.settings import ServerSettings
from rkedge.runtime.tokens import counter_for


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def to_api_error(exc: BaseException) -> ApiError:
    """The one translation of domain errors to HTTP."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), type_="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, (QueueTimeout, BusyError)):
        return ApiError(503, str(exc), type_="server_error", code="busy", headers={"Retry-After": "5"})
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, InputError):
        return ApiError(400, str(exc), code=exc.code)
    if isinstance(exc, RkedgeError):
        return ApiError(500, str(exc), type_="server_error", code=exc.code)
    return ApiError(500, f"internal error: {exc}", type_="server_error", code="internal_error")


# --- request models (OpenAI / Ollama names; unknown fields are accepted and ignored) ------------------------

class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, description="The served model's id (see /v1/models).")
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | list[str]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)


class OllamaOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] | None = None


class OllamaChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = True
    options: OllamaOptions | None = None


class OllamaGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: OllamaOptions | None = None


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ApiError(400, f"content part of type {part.get('type')!r} is not supported (text only).",
                           code="unsupported_content")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    out = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)} for m in messages]
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user.", param="messages")
    return out


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop[:4])


# --- app ------------------------------------------------------------------------------------------------

def create_app(settings: ServerSettings, llm: LLM | None = None) -> FastAPI:
    if llm is None:
        llm = LLM(settings.model_path, library=settings.library, abi=settings.abi, chat_template=settings.template,
                  **settings.llm_params)
    metadata = llm.metadata
    name = settings.model_name or metadata.get("name") or settings.model_path.stem
    aliases = {name, settings.model_path.name, settings.model_path.stem}
    engine = Engine(llm, max_queue=settings.max_queue, queue_timeout_s=settings.queue_timeout_s,
                    counter=counter_for(settings.model_path, metadata, llm.encode))
    started = int(time.time())
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        llm.close()  # free the NPU when the server stops

    app = FastAPI(title="rkedge serve", version=__version__, lifespan=lifespan,
                  description="OpenAI- and Ollama-compatible API over a model on the RK3588 NPU (or the simulated NPU).")
    app.state.engine, app.state.llm, app.state.model_name = engine, llm, name

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        engine.metrics.request(request.url.path, exc.status)
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RkedgeError)
    async def _domain_error(request: Request, exc: RkedgeError) -> JSONResponse:
        return await _api_error(request, to_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") in ("json_invalid", "model_attributes_type", "dict_type") for e in errors) or \
                "decode" in str(exc).lower():
            api = ApiError(400, "the request body is not a valid JSON object (or not UTF-8).", code="invalid_json")
        else:
            first = errors[0] if errors else {}
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            api = ApiError(400, f"invalid request: {first.get('msg', 'bad value')}" + (f" ({where})" if where else ""),
                           code="invalid_request", param=where or None)
        return await _api_error(request, api)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "pars" in str(exc.detail):  # FastAPI could not decode the body
            api = ApiError(400, "the request body is not a valid JSON object (or not UTF-8).", code="invalid_json")
        else:
            api = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                           headers=dict(exc.headers or {}))
        return await _api_error(request, api)

    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        supplied = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            supplied = auth[7:].strip()
        if supplied != settings.api_key:
            raise ApiError(401, "missing or wrong API key.", type_="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(requested: str | None) -> None:
        if requested and requested not in aliases:
            raise ApiError(404, f"model {requested!r} is not served here; this server serves {name!r}.",
                           code="model_not_found", param="model")

    # -- OpenAI --------------------------------------------------------------------------------------------

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def list_models() -> dict[str, Any]:
        engine.metrics.request("/v1/models", 200)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "rkedge"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        check_model(body.model)
        messages = _messages(body.messages)
        params = Params(max_tokens=body.max_completion_tokens or body.max_tokens, stop=_stops(body.stop),
                        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                        frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty)
        prompt_tokens = engine.check_context(engine.chat_prompt_text(messages), params)
        kwargs, hook = engine.runtime_kwargs(params)

        def start() -> Any:
            return engine.session.respond(messages, stop=params.stop, on_token=hook, **kwargs)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond_openai("/v1/chat/completions", "chat", start, params, prompt_tokens, body.stream,
                                    include_usage)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest) -> Any:
        check_model(body.model)
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt[:1])
        params = Params(max_tokens=body.max_tokens, stop=_stops(body.stop), temperature=body.temperature,
                        top_p=body.top_p, top_k=body.top_k)
        prompt_tokens = engine.check_context(prompt, params)
        kwargs, hook = engine.runtime_kwargs(params)

        def start() -> Any:
            return llm.generate(prompt, stop=params.stop, on_token=hook, **kwargs)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond_openai("/v1/completions", "text", start, params, prompt_tokens, body.stream, include_usage)

    async def respond_openai(endpoint: str, kind: str, start: Any, params: Params, prompt_tokens: int | None,
                             stream: bool, include_usage: bool) -> Any:
        request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        headers = {"X-Rkedge-Ignored-Params": ",".join(params.ignored)} if params.ignored else {}
        if not stream:
            async with engine.slot() as waited:
                outcome = await _collect(engine.generate(start, params, prompt_tokens))
            if outcome.error is not None and not outcome.text:
                raise to_api_error(outcome.error)
            engine.metrics.request(endpoint, 200)
            headers["X-Rkedge-Queue-Wait-Ms"] = f"{waited * 1000:.1f}"
            choice: dict[str, Any] = {"index": 0, "finish_reason": _openai_reason(outcome.finish_reason)}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": outcome.text}
            else:
                choice["text"] = outcome.text
            return JSONResponse({"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
                                 "created": created, "model": name, "choices": [choice], "usage": _usage(outcome)},
                                headers=headers)
        slot = engine.slot()
        waited = await slot.__aenter__()  # 429 / 503 are raised here, before the stream starts
        headers["X-Rkedge-Queue-Wait-Ms"] = f"{waited * 1000:.1f}"

        async def events() -> AsyncIterator[str]:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

            def frame(choices: list[dict[str, Any]], **extra: Any) -> str:
                return "data: " + json.dumps({"id": request_id, "object": obj, "created": created, "model": name,
                                              "choices": choices, **extra}, ensure_ascii=False) + "\n\n"
            try:
                if kind == "chat":
                    yield frame([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                async for item in engine.generate(start, params, prompt_tokens):
                    if isinstance(item, Outcome):
                        if item.error is not None:
                            api = to_api_error(item.error)
                            yield "data: " + json.dumps(error_body(api.message, api.type, api.code)) + "\n\n"
                            engine.metrics.request(endpoint, 500)
                        else:
                            delta: dict[str, Any] = {"delta": {}} if kind == "chat" else {"text": ""}
                            yield frame([{"index": 0, **delta, "finish_reason": _openai_reason(item.finish_reason)}])
                            if include_usage:
                                yield frame([], usage=_usage(item))
                            engine.metrics.request(endpoint, 200)
                        break
                    piece = {"delta": {"content": item}} if kind == "chat" else {"text": item}
                    yield frame([{"index": 0, **piece, "finish_reason": None}])
                yield "data: [DONE]\n\n"
            finally:
                await slot.__aexit__(None, None, None)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})

    # -- Ollama --------------------------------------------------------------------------------------------

    @app.get("/api/version")
    def ollama_version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/api/tags", dependencies=[Depends(authorize)])
    def ollama_tags() -> dict[str, Any]:
        engine.metrics.request("/api/tags", 200)
        stat = settings.model_path.stat()
        return {"models": [{"name": name, "model": name, "size": stat.st_size, "digest": metadata.get("sha256", ""),
                            "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime)),
                            "details": {"format": "rkllm", "family": metadata.get("architecture"),
                                        "quantization_level": metadata.get("dtype"),
                                        "parameter_size": None}}]}

    async def ollama_body(request: Request, model: type[BaseModel]) -> Any:
        """Ollama clients do not always send Content-Type: application/json; parse the body regardless."""
        from pydantic import ValidationError

        raw = await request.body()
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None

    @app.post("/api/chat", dependencies=[Depends(authorize)],
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": OllamaChatRequest.model_json_schema()}}}})
    async def ollama_chat(request: Request) -> Any:
        body = await ollama_body(request, OllamaChatRequest)
        check_model(body.model)
        messages = _messages(body.messages)
        params = _ollama_params(body.options)
        prompt_tokens = engine.check_context(engine.chat_prompt_text(messages), params)
        kwargs, hook = engine.runtime_kwargs(params)

        def start() -> Any:
            return engine.session.respond(messages, stop=params.stop, on_token=hook, **kwargs)

        return await respond_ollama("/api/chat", "chat", start, params, prompt_tokens, body.stream)

    @app.post("/api/generate", dependencies=[Depends(authorize)],
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": OllamaGenerateRequest.model_json_schema()}}}})
    async def ollama_generate(request: Request) -> Any:
        body = await ollama_body(request, OllamaGenerateRequest)
        check_model(body.model)
        params = _ollama_params(body.options)
        if body.raw or llm.template is None:
            prompt = ((body.system + "\n\n") if body.system else "") + body.prompt
            prompt_tokens = engine.check_context(prompt, params)
            kwargs, hook = engine.runtime_kwargs(params)

            def start() -> Any:
                return llm.generate(prompt, stop=params.stop, on_token=hook, **kwargs)
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                [{"role": "user", "content": body.prompt}]
            prompt_tokens = engine.check_context(engine.chat_prompt_text(messages), params)
            kwargs, hook = engine.runtime_kwargs(params)

            def start() -> Any:
                return engine.session.respond(messages, stop=params.stop, on_token=hook, **kwargs)

        return await respond_ollama("/api/generate", "generate", start, params, prompt_tokens, body.stream)

    async def respond_ollama(endpoint: str, kind: str, start: Any, params: Params, prompt_tokens: int | None,
                             stream: bool) -> Any:
        def line(text: str, done: bool, outcome: Outcome | None = None) -> dict[str, Any]:
            body: dict[str, Any] = {"model": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "done": done}
            if kind == "chat":
                body["message"] = {"role": "assistant", "content": text}
            else:
                body["response"] = text
            if outcome is not None:
                stats = outcome.result.stats if outcome.result else None
                body.update({"done_reason": outcome.finish_reason,
                             "prompt_eval_count": outcome.prompt_tokens or 0,
                             "eval_count": outcome.completion_tokens,
                             "prompt_eval_duration": int((stats.prefill_ms or 0) * 1e6) if stats else 0,
                             "eval_duration": int((stats.decode_ms or 0) * 1e6) if stats else 0,
                             "load_duration": 0})
                body["total_duration"] = body["prompt_eval_duration"] + body["eval_duration"]
            return body

        if not stream:
            async with engine.slot():
                outcome = await _collect(engine.generate(start, params, prompt_tokens))
            if outcome.error is not None and not outcome.text:
                raise to_api_error(outcome.error)
            engine.metrics.request(endpoint, 200)
            return JSONResponse(line(outcome.text, True, outcome))
        slot = engine.slot()
        await slot.__aenter__()

        async def lines() -> AsyncIterator[str]:
            try:
                async for item in engine.generate(start, params, prompt_tokens):
                    if isinstance(item, Outcome):
                        if item.error is not None:
                            yield json.dumps({"error": str(item.error)}) + "\n"
                            engine.metrics.request(endpoint, 500)
                        else:
                            yield json.dumps(line("", True, item), ensure_ascii=False) + "\n"
                            engine.metrics.request(endpoint, 200)
                        break
                    yield json.dumps(line(item, False), ensure_ascii=False) + "\n"
            finally:
                await slot.__aexit__(None, None, None)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    # -- operations ----------------------------------------------------------------------------------------

    @app.get("/health")
    def health() -> dict[str, Any]:
        info = llm.info()
        return {"status": "ok" if not llm.closed else "closed", "model": name, "abi": info["abi"],
                "runtime_version": info["runtime_version"], "simulated": info["simulated"],
                "queue_depth": engine.waiting, "running": engine.running, "max_queue": engine.max_queue}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(engine.waiting, engine.running),
                                 media_type="text/plain; version=0.0.4")

    page = resources.files("rkedge.runtime.server").joinpath("static/index.html").read_text(encoding="utf-8")
    page = page.replace("{{MODEL}}", name)

    @app.get("/", response_class=HTMLResponse)
    def web_page() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def _ollama_params(options: OllamaOptions | None) -> Params:
    if options is None:
        return Params()
    return Params(max_tokens=options.num_predict if options.num_predict and options.num_predict > 0 else None,
                  stop=tuple(options.stop or ()), temperature=options.temperature, top_p=options.top_p,
                  top_k=options.top_k)


def _openai_reason(reason: str) -> str:
    return {"stop": "stop", "length": "length", "abort": "stop", "error": "stop"}.get(reason, "stop")


def _usage(outcome: Outcome) -> dict[str, int]:
    prompt = outcome.prompt_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": outcome.completion_tokens,
            "total_tokens": prompt + outcome.completion_tokens}


async def _collect(items: AsyncIterator[str | Outcome]) -> Outcome:
    async for item in items:
        if isinstance(item, Outcome):
            return item
    raise RkedgeError("generation ended without an outcome")
