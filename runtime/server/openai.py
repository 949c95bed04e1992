"""The OpenAI API (``/v1``): models, chat completions and completions, streamed as server-sent events.

Chat replies are parsed as they come: ``<think>`` text into ``reasoning_content``, tool calls (when the request
offered tools) into ``tool_calls`` with ``finish_reason: tool_calls``, each streamed as one delta once complete.
"""

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

from rkedge.runtime.output_parsers import ToolCall
from rkedge.runtime.server.deps import (
    body_schema,
    embedding,
    generation,
    get_image_limits,
    get_pool,
    get_settings,
    json_body,
    require_key,
)
from rkedge.runtime.server.engine import Engine, Job, Outcome, Params, Run
from rkedge.runtime.server.errors import error_response, openai_body, to_api_error
from rkedge.runtime.server.models import ModelEntry, ModelPool
from rkedge.runtime.server.responses import STATUS_KEY
from rkedge.runtime.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageLimits,
    conversation,
    embed_inputs,
)
from rkedge.runtime.server.settings import ServerSettings

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], tags=["OpenAI"])


@router.get("/models")
def list_models(pool: Annotated[ModelPool, Depends(get_pool)]) -> dict[str, Any]:
    """Every served model, and each of its LoRA adapters as ``name+adapter``."""
    data = []
    for entry in pool.entries:
        for model_id in [entry.name, *(f"{entry.name}+{a}" for a in entry.adapters)]:
            data.append({"id": model_id, "object": "model", "created": entry.started, "owned_by": "rkedge"})
    return {"object": "list", "data": data}


@router.post("/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
async def chat_completions(body: Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))],
                           pool: Annotated[ModelPool, Depends(get_pool)],
                           images: Annotated[ImageLimits, Depends(get_image_limits)]) -> Response:
    params = body.params()
    messages = conversation(body.messages, images)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def build(engine: Engine, adapter: str | None) -> Job:
        params.lora = adapter
        return engine.prepare_chat(messages, params)

    return await generation(pool, body.model, build,
                            lambda _entry, label: OpenAIAnswer("chat", label, params, include_usage),
                            stream=body.stream)


@router.post("/completions", openapi_extra=body_schema(CompletionRequest))
async def completions(body: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))],
                      pool: Annotated[ModelPool, Depends(get_pool)]) -> Response:
    params = body.params()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    echo = body.prompt_text() if body.echo else ""

    def build(engine: Engine, adapter: str | None) -> Job:
        params.lora = adapter
        return engine.prepare_text(body.prompt_text(), params)

    def answer(_entry: ModelEntry, label: str) -> OpenAIAnswer:
        return OpenAIAnswer("text", label, params, include_usage, echo)

    return await generation(pool, body.model, build, answer, stream=body.stream)


@router.post("/embeddings", openapi_extra=body_schema(EmbeddingRequest))
async def embeddings(body: Annotated[EmbeddingRequest, Depends(json_body(EmbeddingRequest))],
                     pool: Annotated[ModelPool, Depends(get_pool)],
                     settings: Annotated[ServerSettings, Depends(get_settings)]) -> dict[str, Any]:
    """Normalised vectors of the hidden size, one per input (the runtime's last-hidden-layer mode)."""
    entry, done = await embedding(pool, settings, body.model, embed_inputs(body.input))
    data = [{"object": "embedding", "index": i,
             "embedding": _base64(vector) if body.encoding_format == "base64" else vector}
            for i, vector in enumerate(done.vectors)]
    return {"object": "list", "data": data, "model": entry.name,
            "usage": {"prompt_tokens": done.prompt_tokens, "total_tokens": done.prompt_tokens}}


def _base64(vector: list[float]) -> str:
    """float32 little-endian, base64 (what the openai client asks for by default and decodes)."""
    import base64
    import struct

    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


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
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(outcome)}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant",
                                       "content": outcome.text if outcome.text or not outcome.tool_calls else None}
            if outcome.reasoning is not None:
                message["reasoning_content"] = outcome.reasoning
            if outcome.tool_calls:
                message["tool_calls"] = [tool_call(call) for call in outcome.tool_calls]
            choice["message"] = message
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
        calls = 0
        async for delta in run.deltas():
            if not chat:
                if delta.text:
                    yield self._chunk([{"index": 0, "text": delta.text, "finish_reason": None}])
                continue
            if delta.kind == "tool_call" and delta.tool_call is not None:
                piece: dict[str, Any] = {"tool_calls": [{"index": calls, **tool_call(delta.tool_call)}]}
                calls += 1
            elif delta.kind == "reasoning":
                piece = {"reasoning_content": delta.text}
            else:
                piece = {"content": delta.text}
            yield self._chunk([{"index": 0, "delta": piece, "finish_reason": None}])
        outcome = await run.wait()
        if outcome.error is not None:
            api = to_api_error(outcome.error)
            scope.setdefault("state", {})[STATUS_KEY] = api.status
            yield json.dumps(openai_body(api), ensure_ascii=False)
        else:
            end: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
            yield self._chunk([{"index": 0, **end, "finish_reason": finish_reason(outcome)}])
            if self.include_usage:
                yield self._chunk([], usage=usage(outcome))
        yield "[DONE]"


def tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def finish_reason(outcome: Outcome) -> str:
    if outcome.tool_calls:
        return "tool_calls"
    return {"stop": "stop", "length": "length", "abort": "stop", "error": "stop"}.get(outcome.finish_reason, "stop")


def usage(outcome: Outcome) -> dict[str, int]:
    prompt = outcome.prompt_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": outcome.completion_tokens,
            "total_tokens": prompt + outcome.completion_tokens}
