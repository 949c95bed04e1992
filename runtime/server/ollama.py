"""The Ollama API (``/api``): version, tags, show, ps, chat and generate (streamed as JSON lines).

Model names are Ollama's: ``name`` and ``name:latest`` (and the file's name) select a served model,
``name+adapter`` one of its LoRA adapters. ``keep_alive`` sets how long the model stays loaded after the
request (``0`` unloads it); a chat with no messages, or a generate with no prompt, only loads (or unloads) it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Scope

from rkedge import __version__
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
from rkedge.runtime.server.engine import Engine, Job, Outcome, Run, is_embedding_model
from rkedge.runtime.server.errors import error_response, ollama_body, to_api_error
from rkedge.runtime.server.models import ModelEntry, ModelPool, parse_keep_alive
from rkedge.runtime.server.responses import STATUS_KEY
from rkedge.runtime.server.schemas import (
    ImageLimits,
    OllamaChatRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    conversation,
    decode_image,
    embed_inputs,
)
from rkedge.runtime.server.settings import ServerSettings

#: Open without the key: clients probe it to recognise an Ollama server.
public = APIRouter(prefix="/api", tags=["Ollama"])
router = APIRouter(prefix="/api", dependencies=[Depends(require_key)], tags=["Ollama"])


def _time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@public.get("/version")
def ollama_version() -> dict[str, str]:
    return {"version": __version__}


def details(entry: ModelEntry) -> dict[str, Any]:
    """Ollama's ``details``: family from the manifest's template family or architecture, parameter size and
    quantization from the manifest (None where it does not record them)."""
    meta = entry.metadata
    family = str(meta.get("chat_family") or meta.get("model_type") or
                 str(meta.get("architecture") or "").removesuffix("ForCausalLM").lower() or "unknown")
    return {"parent_model": "", "format": "rknn" if meta.get("backend") == "rknn" else "rkllm", "family": family,
            "families": [family], "parameter_size": parameter_size(meta),
            "quantization_level": str(meta["dtype"]).upper() if meta.get("dtype") else None}


def parameter_size(meta: dict[str, Any]) -> str | None:
    """``1.5B``-style, from the manifest's parameter count (``parameters`` or the plan estimate)."""
    found = meta.get("parameters")
    count = found.get("count") or found.get("total") if isinstance(found, dict) else found
    estimate = meta.get("estimate")
    if not count and isinstance(estimate, dict):
        count = estimate.get("parameters")
    if not isinstance(count, (int, float)) or isinstance(count, bool) or count <= 0:
        return None
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


def context_length(entry: ModelEntry) -> int | None:
    if entry.engine is not None:
        return entry.engine.llm.max_context_len
    limit = entry.metadata.get("max_context_limit")
    return int(limit) if isinstance(limit, (int, float)) else None


def _size(entry: ModelEntry) -> int:
    return entry.path.stat().st_size if entry.path.is_file() else 0


@router.get("/tags")
def ollama_tags(pool: Annotated[ModelPool, Depends(get_pool)]) -> dict[str, Any]:
    models = []
    for entry in pool.entries:
        info = {"size": _size(entry), "digest": entry.digest(), "modified_at": _time(entry.path.stat().st_mtime),
                "details": details(entry)}
        models.append({"name": entry.name, "model": entry.name, **info})  # name:latest selects it too
        for adapter in entry.adapters:
            name = f"{entry.name}+{adapter}"
            models.append({"name": name, "model": name, **info})
    return {"models": models}


@router.get("/ps")
def ollama_ps(pool: Annotated[ModelPool, Depends(get_pool)]) -> dict[str, Any]:
    """The loaded models, most recently used first; ``size_vram`` is the manifest's memory estimate (the NPU
    shares the board's RAM)."""
    now = time.monotonic()
    models = []
    for entry in sorted(pool.loaded(), key=lambda e: -e.last_used):
        expires = time.time() + (entry.expires_at - now) if entry.expires_at is not None else \
            time.time() + 10 * 365 * 86400  # kept until the memory budget needs the room
        models.append({"name": entry.name, "model": entry.name, "size": entry.memory_bytes,
                       "digest": entry.digest(), "details": details(entry), "expires_at": _time(expires),
                       "size_vram": entry.memory_bytes, "context_length": context_length(entry)})
    return {"models": models}


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None  # older clients
    verbose: bool = False


@router.post("/show", openapi_extra=body_schema(ShowRequest))
def ollama_show(body: Annotated[ShowRequest, Depends(json_body(ShowRequest))],
                pool: Annotated[ModelPool, Depends(get_pool)]) -> dict[str, Any]:
    entry, _adapter = pool.resolve(body.model or body.name)
    meta = entry.metadata
    template = meta.get("jinja_chat_template") or meta.get("chat_template")
    if not isinstance(template, str):
        template = ""
    llm = entry.engine.llm if entry.engine is not None else None
    if not template and llm is not None and llm.template is not None:
        template = getattr(llm.template, "source", "") or ""
    params = {"num_ctx": context_length(entry)}
    if llm is not None:
        params["num_predict"] = llm.max_new_tokens
    for key in ("temperature", "top_k", "top_p", "repeat_penalty"):
        value = (llm.backend.init_values.get(key) if llm is not None else None) or meta.get(key)
        if value is not None:
            params[key] = value
    parameters = "\n".join(f"{k:<15}{v}" for k, v in params.items() if v is not None)
    info = details(entry)
    arch = info["family"]
    model_info: dict[str, Any] = {"general.architecture": arch, "general.basename": entry.name,
                                  f"{arch}.context_length": context_length(entry)}
    if meta.get("hidden_size"):
        model_info[f"{arch}.embedding_length"] = meta["hidden_size"]
    capabilities = ["completion"]
    if "tools" in template:
        capabilities.append("tools")
    if "enable_thinking" in template or "<think>" in template:
        capabilities.append("thinking")
    if _has_vision(entry):
        capabilities.append("vision")  # Ollama clients offer images to models that list it
    if is_embedding_model(meta):
        capabilities = ["embedding"]
    return {"modelfile": f"# served by rkedge\nFROM {entry.path}\n", "parameters": parameters, "template": template,
            "details": info, "model_info": model_info, "capabilities": capabilities,
            "modified_at": _time(entry.path.stat().st_mtime), "license": str(meta.get("license") or "")}


def _has_vision(entry: ModelEntry) -> bool:
    """The model has a vision encoder (a vlm.json names it), without opening the encoder or loading the model."""
    if entry.engine is not None:
        return entry.engine.llm.vision is not None
    from rkedge.errors import RkedgeError
    from rkedge.runtime.images import locate_vision

    try:
        return locate_vision(entry.path, None)[1] is not None
    except RkedgeError:
        return False


@router.post("/chat", openapi_extra=body_schema(OllamaChatRequest))
async def ollama_chat(body: Annotated[OllamaChatRequest, Depends(json_body(OllamaChatRequest))],
                      pool: Annotated[ModelPool, Depends(get_pool)],
                      images: Annotated[ImageLimits, Depends(get_image_limits)]) -> Response:
    keep_alive = parse_keep_alive(body.keep_alive)
    if not body.messages:
        return await load_call(pool, body.model, body.keep_alive, "chat")
    params = body.params()
    messages = conversation(body.messages, images)

    def build(engine: Engine, adapter: str | None) -> Job:
        params.lora = adapter
        return engine.prepare_chat(messages, params)

    return await generation(pool, body.model, build, lambda _e, label: OllamaAnswer("chat", label),
                            stream=body.stream, keep_alive=keep_alive, set_keep_alive=body.keep_alive is not None)


@router.post("/generate", openapi_extra=body_schema(OllamaGenerateRequest))
async def ollama_generate(body: Annotated[OllamaGenerateRequest, Depends(json_body(OllamaGenerateRequest))],
                          pool: Annotated[ModelPool, Depends(get_pool)],
                          limits: Annotated[ImageLimits, Depends(get_image_limits)]) -> Response:
    keep_alive = parse_keep_alive(body.keep_alive)
    if not body.prompt and not body.system and not body.images:
        return await load_call(pool, body.model, body.keep_alive, "generate")
    params = body.params()
    images = [decode_image(value, f"images.{index}", limits, url=False) for index, value in
              enumerate(body.images or ())]

    def build(engine: Engine, adapter: str | None) -> Job:
        params.lora = adapter
        if body.raw or engine.llm.template is None:
            return engine.prepare_text(((body.system + "\n\n") if body.system else "") + body.prompt, params,
                                       images)
        user: dict[str, Any] = {"role": "user", "content": body.prompt}
        if images:
            user["images"] = images
        messages: list[dict[str, Any]] = ([{"role": "system", "content": body.system}] if body.system else []) + \
            [user]
        return engine.prepare_chat(messages, params)

    return await generation(pool, body.model, build, lambda _e, label: OllamaAnswer("generate", label),
                            stream=body.stream, keep_alive=keep_alive, set_keep_alive=body.keep_alive is not None)


@router.post("/embed", openapi_extra=body_schema(OllamaEmbedRequest))
async def ollama_embed(body: Annotated[OllamaEmbedRequest, Depends(json_body(OllamaEmbedRequest))],
                       pool: Annotated[ModelPool, Depends(get_pool)],
                       settings: Annotated[ServerSettings, Depends(get_settings)]) -> dict[str, Any]:
    started = time.monotonic()
    entry, done = await embedding(pool, settings, body.model, embed_inputs(body.input or body.prompt or ""),
                                  parse_keep_alive(body.keep_alive), body.keep_alive is not None)
    return {"model": entry.name, "embeddings": done.vectors, "prompt_eval_count": done.prompt_tokens,
            "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0}


@router.post("/embeddings", openapi_extra=body_schema(OllamaEmbedRequest))
async def ollama_embeddings_legacy(body: Annotated[OllamaEmbedRequest, Depends(json_body(OllamaEmbedRequest))],
                                   pool: Annotated[ModelPool, Depends(get_pool)],
                                   settings: Annotated[ServerSettings, Depends(get_settings)]) -> dict[str, Any]:
    """The legacy endpoint: one ``prompt``, one ``embedding``."""
    _entry, done = await embedding(pool, settings, body.model, embed_inputs(body.prompt or body.input or ""),
                                   parse_keep_alive(body.keep_alive), body.keep_alive is not None)
    return {"embedding": done.vectors[0]}


async def load_call(pool: ModelPool, requested: str | None, keep_alive: Any, kind: Literal["chat", "generate"]
                    ) -> Response:
    """Ollama's load call (no messages / no prompt): loads the model, or unloads it with ``keep_alive: 0``."""
    seconds = parse_keep_alive(keep_alive)
    entry, _adapter = pool.resolve(requested)
    if seconds == 0:
        await pool.unload(entry)
        reason = "unload"
    else:
        await pool.lease(entry)
        pool.release(entry, seconds, set_keep_alive=keep_alive is not None)
        reason = "load"
    body: dict[str, Any] = {"model": entry.name, "created_at": _time(time.time()), "done": True,
                            "done_reason": reason}
    if kind == "chat":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return JSONResponse(body)


class OllamaAnswer:
    def __init__(self, kind: Literal["chat", "generate"], model: str) -> None:
        self.kind, self.model = kind, model

    def _line(self, text: str, done: bool, outcome: Outcome | None = None, thinking: str | None = None,
              tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": _time(time.time()), "done": done}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            body["message"] = message
        else:
            body["response"] = text
            if thinking:
                body["thinking"] = thinking
        if outcome is not None:
            stats = outcome.result.stats if outcome.result else None
            body.update({"done_reason": "stop" if outcome.finish_reason == "tool_calls" else outcome.finish_reason,
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
        calls = [_call(c.name, c.arguments) for c in outcome.tool_calls]
        return JSONResponse(self._line(outcome.text, True, outcome, outcome.reasoning, calls))

    def stream(self, run: Run, scope: Scope) -> Response:
        return StreamingResponse(self._lines(run, scope), media_type="application/x-ndjson")

    async def _lines(self, run: Run, scope: Scope) -> AsyncIterator[str]:
        async for delta in run.deltas():
            if delta.kind == "tool_call" and delta.tool_call is not None:
                line = self._line("", False, tool_calls=[_call(delta.tool_call.name, delta.tool_call.arguments)])
            elif delta.kind == "reasoning":
                line = self._line("", False, thinking=delta.text)
            else:
                line = self._line(delta.text, False)
            yield json.dumps(line, ensure_ascii=False) + "\n"
        outcome = await run.wait()
        if outcome.error is not None:
            api = to_api_error(outcome.error)
            scope.setdefault("state", {})[STATUS_KEY] = api.status
            yield json.dumps(ollama_body(api), ensure_ascii=False) + "\n"
        else:
            yield json.dumps(self._line("", True, outcome), ensure_ascii=False) + "\n"


def _call(name: str, arguments: str) -> dict[str, Any]:
    """Ollama's tool call: arguments as an object."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = {}
    return {"function": {"name": name, "arguments": parsed if isinstance(parsed, dict) else {}}}
