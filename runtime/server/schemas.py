"""Request bodies of the OpenAI and Ollama APIs (their field names). Unknown fields are accepted and ignored;
fields that would change the answer and that rkedge cannot honour are refused with a 400 naming them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rkedge.runtime.server.engine import Params
from rkedge.runtime.server.errors import ApiError


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

    def params(self) -> Params:
        return Params(max_tokens=self.max_completion_tokens or self.max_tokens, stop=stops(self.stop),
                      temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                      frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty)


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

    def params(self) -> Params:
        return Params(max_tokens=self.max_tokens, stop=stops(self.stop), temperature=self.temperature,
                      top_p=self.top_p, top_k=self.top_k)

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "".join(self.prompt[:1])


class OllamaOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] | None = None

    def params(self) -> Params:
        return Params(max_tokens=self.num_predict if self.num_predict and self.num_predict > 0 else None,
                      stop=tuple(self.stop or ()), temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


class OllamaChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = True
    options: OllamaOptions | None = None

    def params(self) -> Params:
        return self.options.params() if self.options else Params()


class OllamaGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: OllamaOptions | None = None

    def params(self) -> Params:
        return self.options.params() if self.options else Params()


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ApiError(400, f"content part of type {part.get('type')!r} is not supported (text only).",
                           code="unsupported_content", param="messages")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    out = [{"role": "system" if m.role == "developer" else m.role, "content": text_of(m.content)} for m in messages]
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user.", param="messages")
    return out


def stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop[:4])
