"""Request bodies of the OpenAI and Ollama APIs (their field names). Unknown fields are accepted and ignored;
fields that would change the answer and that rkedge cannot honour are refused with a 400 naming them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from rkedge.errors import InputError
from rkedge.runtime.server.constrained import grammar_for_format
from rkedge.runtime.server.engine import Params
from rkedge.runtime.server.errors import ApiError
from rkedge.runtime.vision.sources import MAX_IMAGE_BYTES


def _plain_text(text: str) -> str:
    """Text that reaches the runtime as UTF-8 C strings: a NUL would cut it short at the C boundary (the template's
    tail lost, the KV bookkeeping off), a lone surrogate cannot be encoded."""
    if "\x00" in text:
        raise ValueError("contains a NUL character, which the runtime cannot take")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return text


Text = Annotated[str, AfterValidator(_plain_text)]
#: Sampling values as OpenAI bounds them; finite (JSON's 1e400 is infinity).
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=1_000_000)]
MaxTokens = Annotated[int, Field(ge=1, le=1_000_000)]


def _only_one(value: int | None) -> int | None:
    if value not in (None, 1):
        raise ValueError("only n=1 is supported (one choice per request)")
    return value


def _known_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and value.get("type", "text") not in ("text", "json_object", "json_schema"):
        raise ValueError(f"response_format {value.get('type')!r} is not supported (text, json_object, json_schema)")
    return value


def _no_functions(value: list[Any] | None) -> list[Any] | None:
    if value:
        raise ValueError("the legacy functions field is not supported: send tools")
    return value


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(..., min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: ToolFunction


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends JSON text, Ollama an object


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[dict[str, Any]] | None = ""
    images: list[Any] | None = None  # Ollama's
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool result: the call it answers (OpenAI)
    name: str | None = None
    tool_name: str | None = None  # a tool result: the tool's name (Ollama)
    reasoning_content: Text | None = None  # an earlier turn's reasoning (OpenAI-style servers)
    thinking: Text | None = None  # the same, Ollama's name


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, description="The served model's id (see /v1/models).")
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stop: Text | list[Text] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    n: Annotated[int | None, AfterValidator(_only_one)] = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: Annotated[dict[str, Any] | None, AfterValidator(_known_format)] = None
    seed: int | None = None  # the host sampler's, for constrained output
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[Any] | None, AfterValidator(_no_functions)] = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's and llama.cpp's: keywords of the model's template

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value:
            raise ValueError("logprobs are not available from the NPU runtime")
        return value

    @field_validator("stop")
    @classmethod
    def _four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_stops(value)

    def params(self) -> Params:
        kwargs = dict(self.chat_template_kwargs or {})
        thinking = kwargs.pop("enable_thinking", None)
        if self.reasoning_effort is not None:
            thinking = self.reasoning_effort != "none"
        return Params(max_tokens=self.max_completion_tokens or self.max_tokens, stop=stops(self.stop),
                      temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                      frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                      tools=offered_tools(self.tools, self.tool_choice),
                      parallel_tool_calls=self.parallel_tool_calls is not False,
                      require_tool_call=bool(self.tools) and (self.tool_choice == "required" or
                                                              isinstance(self.tool_choice, dict)),
                      enable_thinking=bool(thinking) if thinking is not None else None, template_kwargs=kwargs,
                      grammar=grammar_for_format(self.response_format), seed=self.seed)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: Text | list[Text]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    stop: Text | list[Text] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    n: Annotated[int | None, AfterValidator(_only_one)] = None
    best_of: Annotated[int | None, AfterValidator(_only_one)] = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"a list of {len(value)} prompts is not supported: send one prompt per request")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("logprobs are not available from the NPU runtime")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_stops(value)

    def params(self) -> Params:
        return Params(max_tokens=self.max_tokens, stop=stops(self.stop), temperature=self.temperature,
                      top_p=self.top_p, top_k=self.top_k, frequency_penalty=self.frequency_penalty,
                      presence_penalty=self.presence_penalty)

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class OllamaOptions(BaseModel):
    """Ollama's ``options``: the sampling ones mapped, ``num_ctx`` checked against the model's context; the
    load-time ones (``num_gpu``, ``num_thread``, ``seed``...) accepted and ignored (the NPU model is built)."""

    model_config = ConfigDict(extra="allow")
    num_predict: Annotated[int, Field(le=1_000_000)] | None = None  # <= 0: no limit (Ollama's -1, -2)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repeat_penalty: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    num_ctx: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    seed: int | None = None
    stop: list[Text] | None = None

    def params(self) -> Params:
        return Params(max_tokens=self.num_predict if self.num_predict and self.num_predict > 0 else None,
                      stop=tuple(self.stop or ()), temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                      repeat_penalty=self.repeat_penalty, frequency_penalty=self.frequency_penalty,
                      presence_penalty=self.presence_penalty, num_ctx=self.num_ctx, seed=self.seed)


def _known_ollama_format(value: Any) -> Any:
    if value not in (None, "", "json") and not isinstance(value, dict):
        raise ValueError("format is \"json\" or a JSON Schema object")
    return value


#: Ollama's keep_alive: a duration ("5m"), seconds, or negative for ever.
KeepAlive = str | float | None


class OllamaChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(default_factory=list)  # empty: load the model (or unload: keep_alive 0)
    stream: bool = True
    options: OllamaOptions | None = None
    format: Annotated[Any, AfterValidator(_known_ollama_format)] = None
    tools: list[Tool] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    keep_alive: KeepAlive = None

    def params(self) -> Params:
        params = self.options.params() if self.options else Params()
        params.grammar = grammar_for_format(ollama_format=self.format)
        params.tools = offered_tools(self.tools, None)
        params.enable_thinking = None if self.think is None else bool(self.think)
        return params


class OllamaGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: Text = ""
    system: Text | None = None
    raw: bool = False
    stream: bool = True
    options: OllamaOptions | None = None
    format: Annotated[Any, AfterValidator(_known_ollama_format)] = None
    images: list[Any] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    keep_alive: KeepAlive = None

    def params(self) -> Params:
        params = self.options.params() if self.options else Params()
        params.enable_thinking = None if self.think is None else bool(self.think)
        params.grammar = grammar_for_format(ollama_format=self.format)
        return params


def offered_tools(tools: list[Tool] | None, choice: str | dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The tools the template renders: none for ``tool_choice: none``, only the named one for a named choice."""
    if not tools or choice == "none":
        return None
    listed = [t.model_dump(exclude_none=True) for t in tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in listed if t["function"]["name"] == name]
        if not chosen:
            raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools.",
                           code="invalid_request", param="tool_choice")
        return chosen
    return listed


@dataclass(frozen=True)
class ImageLimits:
    """How the server takes images: remote URLs only when allowed (``--allow-remote-images``), a size cap."""

    allow_remote: bool = False
    max_bytes: int = MAX_IMAGE_BYTES


def _image_error(exc: InputError, param: str) -> ApiError:
    error = ApiError(400, f"{exc.message} ({param})", code="invalid_image", param=param)
    error.fix = exc.fix  # what to send instead, in the answer's message
    return error


def decode_image(value: Any, param: str, limits: ImageLimits, *, url: bool) -> bytes:
    """One image as the API sent it (an ``image_url.url`` when ``url``, else Ollama's base64), as bytes; a 400
    naming ``param`` when it is malformed, too large, not an accepted format, or remote on a server that
    does not fetch."""
    from rkedge.runtime.vision.sources import from_base64, from_image_url

    if not isinstance(value, str):
        raise ApiError(400, f"an image must be a string ({'a data: URL' if url else 'base64'}) ({param}).",
                       code="invalid_image", param=param)
    if url and value.startswith(("http://", "https://")) and not limits.allow_remote:
        error = ApiError(400, f"remote image URLs are off on this server: boards are often offline ({param}).",
                         code="invalid_image", param=param)
        error.fix = "send the image inline as a data: URL, or start rkedge serve with --allow-remote-images"
        raise error
    try:
        if url:
            return from_image_url(value, allow_remote=limits.allow_remote, max_bytes=limits.max_bytes)
        return from_base64(value, max_bytes=limits.max_bytes)
    except InputError as exc:
        raise _image_error(exc, param) from None


def text_of(content: str | list[dict[str, Any]] | None, where: str = "messages",
            limits: ImageLimits | None = None) -> str | list[dict[str, Any]]:
    """A message's content: text, or (with image parts, when ``limits`` lets images in) a list of text parts and
    ``{"type": "image", "image": bytes}`` parts in their order, as :func:`rkedge.runtime.images.flatten_images`
    takes them."""
    if content is None or isinstance(content, str):
        return content or ""
    parts: list[dict[str, Any]] = []
    texts: list[str] = []
    for index, part in enumerate(content):
        kind = part.get("type")
        if kind == "image_url" and limits is not None:
            found = part.get("image_url")
            url = found.get("url") if isinstance(found, dict) else found
            param = f"{where}.{index}.image_url.url"
            parts.append({"type": "image", "image": decode_image(url, param, limits, url=True)})
            continue
        if kind != "text":
            supported = "text and image_url parts" if limits is not None else "text only"
            raise ApiError(400, f"content part of type {kind!r} is not supported: {supported} ({where}.{index}).",
                           code="unsupported_content", param=f"{where}.{index}")
        try:
            text = _plain_text(str(part.get("text", "")))
        except ValueError as exc:
            raise ApiError(400, f"invalid request: a text part {exc} ({where}.{index})", code="invalid_request",
                           param=where) from None
        texts.append(text)
        parts.append({"type": "text", "text": text})
    if len(texts) == len(parts):
        return "".join(texts)
    return parts


def conversation(messages: list[ChatMessage], images: ImageLimits | None = None) -> list[dict[str, Any]]:
    """The messages as the model's template takes them (Hugging Face's shape: tool-call arguments as objects).

    User messages may carry images (OpenAI ``image_url`` parts, Ollama ``images``), decoded here to bytes within
    ``images``' limits; whether the model can see them is the engine's to say (a model without vision: 400)."""
    limits = images or ImageLimits()
    out: list[dict[str, Any]] = []
    for number, m in enumerate(messages):
        where = f"messages.{number}"
        user = m.role == "user"
        if not user and (m.images or (isinstance(m.content, list)
                                      and any(p.get("type") == "image_url" for p in m.content))):
            raise ApiError(400, f"only user messages can carry images ({where}).", code="invalid_image",
                           param=f"{where}.images" if m.images else f"{where}.content")
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                   "content": text_of(m.content, f"{where}.content", limits if user else None)}
        if m.images:
            message["images"] = [decode_image(value, f"{where}.images.{index}", limits, url=False)
                                 for index, value in enumerate(m.images)]
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name,
                                                   "arguments": _arguments(c.function.arguments)}}
                                     for c in m.tool_calls]
        if m.role == "tool":
            if m.tool_call_id:
                message["tool_call_id"] = m.tool_call_id
            if m.name or m.tool_name:
                message["name"] = m.name or m.tool_name
        reasoning = m.reasoning_content or m.thinking
        if reasoning:
            message["reasoning_content"] = reasoning
        out.append(message)
    if not out:
        raise ApiError(400, "invalid request: messages is empty.", code="invalid_request", param="messages")
    if out[-1]["role"] not in ("user", "tool"):
        raise ApiError(400, "the last message must come from the user (or be a tool result).", param="messages")
    return out


def _arguments(arguments: str | dict[str, Any]) -> Any:
    if isinstance(arguments, dict):
        return arguments
    import json

    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # a template that wants an object renders the text as it came


def _check_stops(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, list) and len(value) > 4:
        raise ValueError(f"at most 4 stop sequences, not {len(value)}")
    return value


def stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


EmbedInput = Annotated[Text, Field(min_length=1)] | list[Annotated[Text, Field(min_length=1)]] | list[int] | \
    list[list[int]]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: EmbedInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("dimensions (shortened embeddings) is not supported: vectors have the hidden size")
        return value


class OllamaEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: Annotated[Text, Field(min_length=1)] | list[Annotated[Text, Field(min_length=1)]] = ""
    prompt: Text | None = None  # the legacy /api/embeddings
    keep_alive: KeepAlive = None
    truncate: bool = True


def embed_inputs(value: Any, limit: int = 256) -> list[str | list[int]]:
    """The inputs of a batch: texts or token-id lists."""
    if isinstance(value, str):
        items: list[str | list[int]] = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [list(value)]
    else:
        items = list(value)
    if not items:
        raise ApiError(400, "invalid request: input is empty.", code="invalid_request", param="input")
    if len(items) > limit:
        raise ApiError(400, f"at most {limit} inputs per request, not {len(items)}.", code="invalid_request",
                       param="input")
    return items
