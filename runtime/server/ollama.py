"""The Ollama API (``/api``): version, tags, chat and generate, streamed as JSON lines."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Scope

from rkedge import __version__
from rkedge.runtime.server.deps import Served, body_schema, get_engine, get_served, json_body, require_key
from rkedge.runtime.server.engine import Engine, Outcome, Run
from rkedge.runtime.server.errors import error_response, ollama_body, to_api_error
from rkedge.runtime.server.responses import STATUS_KEY, GenerationResponse
from rkedge.runtime.server.schemas import OllamaChatRequest, OllamaGenerateRequest, conversation

#: Open without the key: clients probe it to recognise an Ollama server.
public = APIRouter(prefix="/api", tags=["Ollama"])
router = APIRouter(prefix="/api", dependencies=[Depends(require_key)], tags=["Ollama"])


@public.get("/version")
def ollama_version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/tags")
def ollama_tags(served: Annotated[Served, Depends(get_served)]) -> dict[str, Any]:
    stat = served.model_path.stat()
    metadata = served.metadata
    return {"models": [{"name": served.name, "model": served.name, "size": stat.st_size,
                        "digest": metadata.get("sha256", ""),
                        "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime)),
                        "details": {"format": "rkllm", "family": metadata.get("architecture"),
                                    "quantization_level": metadata.get("dtype"), "parameter_size": None}}]}


@router.post("/chat", openapi_extra=body_schema(OllamaChatRequest))
async def ollama_chat(body: Annotated[OllamaChatRequest, Depends(json_body(OllamaChatRequest))],
                      engine: Annotated[Engine, Depends(get_engine)],
                      served: Annotated[Served, Depends(get_served)]) -> Response:
    served.check_model(body.model)
    job = engine.prepare_chat(conversation(body.messages), body.params())
    engine.admit()
    return GenerationResponse(engine, job, OllamaAnswer("chat", served.name), stream=body.stream)


@router.post("/generate", openapi_extra=body_schema(OllamaGenerateRequest))
async def ollama_generate(body: Annotated[OllamaGenerateRequest, Depends(json_body(OllamaGenerateRequest))],
                          engine: Annotated[Engine, Depends(get_engine)],
                          served: Annotated[Served, Depends(get_served)]) -> Response:
    served.check_model(body.model)
    params = body.params()
    if body.raw or engine.llm.template is None:
        job = engine.prepare_text(((body.system + "\n\n") if body.system else "") + body.prompt, params)
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
            [{"role": "user", "content": body.prompt}]
        job = engine.prepare_chat(messages, params)
    engine.admit()
    return GenerationResponse(engine, job, OllamaAnswer("generate", served.name), stream=body.stream)


class OllamaAnswer:
    def __init__(self, kind: Literal["chat", "generate"], model: str) -> None:
        self.kind, self.model = kind, model

    def _line(self, text: str, done: bool, outcome: Outcome | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "done": done}
        if self.kind == "chat":
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

    def whole(self, outcome: Outcome, run: Run) -> Response:
        if outcome.error is not None:  # even with some text: a truncated answer is not an answer
            return error_response("/api", outcome.error)
        return JSONResponse(self._line(outcome.text, True, outcome))

    def stream(self, run: Run, scope: Scope) -> Response:
        return StreamingResponse(self._lines(run, scope), media_type="application/x-ndjson")

    async def _lines(self, run: Run, scope: Scope) -> AsyncIterator[str]:
        async for text in run.chunks():
            yield json.dumps(self._line(text, False), ensure_ascii=False) + "\n"
        outcome = await run.wait()
        if outcome.error is not None:
            api = to_api_error(outcome.error)
            scope.setdefault("state", {})[STATUS_KEY] = api.status
            yield json.dumps(ollama_body(api), ensure_ascii=False) + "\n"
        else:
            yield json.dumps(self._line("", True, outcome), ensure_ascii=False) + "\n"
