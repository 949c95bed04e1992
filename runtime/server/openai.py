"""The OpenAI API (``/v1``): models, chat completions and completions, streamed as server-sent events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from sse_starlette import EventSourceResponse
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from rkedge.runtime.server.deps import Served, body_schema, get_engine, get_served, json_body, require_key
from rkedge.runtime.server.engine import Engine, Outcome, Params, Run
from rkedge.runtime.server.errors import error_response, openai_body, to_api_error
from rkedge.runtime.server.responses import STATUS_KEY, GenerationResponse
from rkedge.runtime.server.schemas import ChatCompletionRequest, CompletionRequest, conversation

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], tags=["OpenAI"])


@router.get("/models")
def list_models(served: Annotated[Served, Depends(get_served)]) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": served.name, "object": "model", "created": served.started, "owned_by": "rkedge"}]}


@router.post("/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
async def chat_completions(body: Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))],
                           engine: Annotated[Engine, Depends(get_engine)],
                           served: Annotated[Served, Depends(get_served)]) -> Response:
    served.check_model(body.model)
    params = body.params()
    job = engine.prepare_chat(conversation(body.messages), params)
    engine.admit()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return GenerationResponse(engine, job, OpenAIAnswer("chat", served.name, params, include_usage),
                              stream=body.stream)


@router.post("/completions", openapi_extra=body_schema(CompletionRequest))
async def completions(body: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))],
                      engine: Annotated[Engine, Depends(get_engine)],
                      served: Annotated[Served, Depends(get_served)]) -> Response:
    served.check_model(body.model)
    params = body.params()
    job = engine.prepare_text(body.prompt_text(), params)
    engine.admit()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    echo = body.prompt_text() if body.echo else ""
    return GenerationResponse(engine, job, OpenAIAnswer("text", served.name, params, include_usage, echo),
                              stream=body.stream)


class OpenAIAnswer:
    """A chat completion or a text completion, whole or as ``chunk`` events."""

    def __init__(self, kind: Literal["chat", "text"], model: str, params: Params, include_usage: bool,
                 echo: str = "") -> None:
        self.kind, self.model, self.params, self.include_usage = kind, model, params, include_usage
        self.echo = echo  # completions' echo: the prompt, sent before the completion
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _headers(self, run: Run) -> dict[str, str]:
        headers = {"X-Rkedge-Queue-Wait-Ms": f"{run.waited_s * 1000:.1f}"}
        if self.params.ignored:
            headers["X-Rkedge-Ignored-Params"] = ",".join(self.params.ignored)
        return headers

    def whole(self, outcome: Outcome, run: Run) -> Response:
        if outcome.error is not None:  # even with some text: a truncated answer is not an answer
            return error_response("/v1", outcome.error)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(outcome.finish_reason)}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": outcome.text}
        else:
            choice["text"] = self.echo + outcome.text
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                             "created": self.created, "model": self.model, "choices": [choice],
                             "usage": usage(outcome)}, headers=self._headers(run))

    def stream(self, run: Run, scope: Scope) -> Response:
        # On SIGTERM sse-starlette cancels streams (which aborts their runs) after the same grace as uvicorn's.
        grace = scope["app"].state.settings.shutdown_grace_s if "app" in scope else 0.0
        return EventSourceResponse(self._events(run, scope), headers=self._headers(run), sep="\n",
                                   shutdown_grace_period=grace)

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return json.dumps({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                           "choices": choices, **extra}, ensure_ascii=False)

    async def _events(self, run: Run, scope: Scope) -> AsyncIterator[str]:
        chat = self.kind == "chat"
        if chat:
            yield self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        elif self.echo:
            yield self._chunk([{"index": 0, "text": self.echo, "finish_reason": None}])
        async for text in run.chunks():
            piece = {"delta": {"content": text}} if chat else {"text": text}
            yield self._chunk([{"index": 0, **piece, "finish_reason": None}])
        outcome = await run.wait()
        if outcome.error is not None:
            api = to_api_error(outcome.error)
            scope.setdefault("state", {})[STATUS_KEY] = api.status
            yield json.dumps(openai_body(api), ensure_ascii=False)
        else:
            delta: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
            yield self._chunk([{"index": 0, **delta, "finish_reason": finish_reason(outcome.finish_reason)}])
            if self.include_usage:
                yield self._chunk([], usage=usage(outcome))
        yield "[DONE]"


def finish_reason(reason: str) -> str:
    return {"stop": "stop", "length": "length", "abort": "stop", "error": "stop"}.get(reason, "stop")


def usage(outcome: Outcome) -> dict[str, int]:
    prompt = outcome.prompt_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": outcome.completion_tokens,
            "total_tokens": prompt + outcome.completion_tokens}
