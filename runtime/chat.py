"""Multi-turn chat with real KV-cache reuse.

With a known template family, the session renders the whole conversation once per turn and sends the
runtime only what its KV cache does not hold yet: the rendering minus the text already prefilled (the
previous prompt plus the reply). If the rendering no longer extends what is cached (another caller used the
model, the template rewrote history), the cache is cleared and the whole conversation is sent. ABI 1.1 has
no ``keep_history``: every turn sends the whole conversation.

The template is the model's own Jinja template when its manifest carries one (tools, tool results, thinking
and documents go through it, as Hugging Face renders them), else a hand-written family (no tools). Without
either (a vendor ``.rkllm`` with no rkedge manifest), the runtime's embedded template wraps each turn
(ABI >= 1.2.0) and only the new text is sent: tools then go through ``rkllm_set_function_tools``, tool results
with the ``tool`` role, thinking through ``enable_thinking``.

Images (a vision-language model): a user message carries them in ``images`` (a list of image bytes, paths, PIL
images or arrays) or as image content parts; each becomes one ``<image>`` placeholder in the message's text
(:func:`rkedge.runtime.images.flatten_images`), the template renders it as text, and the images of the text sent
go with it as one multimodal input. They stay in the KV cache like the text: a text-only follow-up sends only its
suffix, and a conversation resent with another image at the same place starts over.

A conversation longer than the context either fails with :class:`~rkedge.errors.ContextLengthExceeded` or,
by the session's ``context_policy``, loses its oldest turns (the system prompt stays) or starts over from the
last turn.

Assumption (UNKNOWN for librkllmrt, true of llama.cpp-style loops): the EOS token that ends a reply is not
evaluated into the KV cache, so the next turn's delta starts with the end-of-turn marker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

from rkedge.errors import ContextLengthExceeded, InputError
from rkedge.runtime._stream import GenerationResult, GenerationStream, TokenHook
from rkedge.runtime.chat_template import JinjaChatTemplate
from rkedge.runtime.images import IMAGE_PARTS, OTHER_MEDIA_PARTS, flatten_images, image_key
from rkedge.runtime.llm import LLM
from rkedge.runtime.output_parsers import OutputFormat
from rkedge.runtime.types import RunRequest, Sampling, c_text

log = logging.getLogger("rkedge.runtime")

#: What a session does with a conversation longer than the context: refuse it, drop the oldest turns (the
#: system prompt stays), or keep only the last turn.
ContextPolicy = Literal["error", "drop_oldest", "reset"]
CONTEXT_POLICIES: tuple[ContextPolicy, ...] = ("error", "drop_oldest", "reset")
Message = dict[str, Any]


class ChatSession:
    """A conversation with one :class:`LLM`.

    Args:
        system: the system prompt (needs a template rkedge renders).
        context_policy: what to do when the conversation no longer fits the context (see :data:`ContextPolicy`).
        count_tokens: how to count a prompt's tokens; default: the model's tokenizer where one is known
            (:func:`rkedge.runtime.tokens.counter_for`), else the context is not checked before the run.
    """

    def __init__(self, llm: LLM, system: str | None = None, *, context_policy: ContextPolicy = "error",
                 count_tokens: Callable[[str], int] | None = None) -> None:
        if context_policy not in CONTEXT_POLICIES:
            raise InputError(f"unknown context policy {context_policy!r}", fix=f"use one of {CONTEXT_POLICIES}")
        self.llm = llm
        self.system = system
        self.context_policy: ContextPolicy = context_policy
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self._cached_text: str | None = None  # what the runtime's KV cache holds for this session
        self._cached_images: list[str] = []  # image_key of each image the cache holds, in order
        #: Messages the context policy dropped for the last reply (0: none).
        self.dropped_messages = 0
        #: Turns whose rendering did not extend what the KV cache held, so the whole conversation was prefilled.
        self.full_prefills = 0
        if count_tokens is None:
            from rkedge.runtime.tokens import counter_for

            count_tokens = counter_for(llm.model_path, llm.metadata, llm.encode)
        vision = llm.vision
        if count_tokens is not None and vision is not None:
            # Each placeholder becomes the image's rows in the context (its tags are about the placeholder's size).
            count_text, per_image, placeholder = count_tokens, vision.image_tokens, llm.image_placeholder
            count_tokens = lambda text: count_text(text) + text.count(placeholder) * per_image  # noqa: E731
        self._count = count_tokens
        if system and llm.template is None:
            raise InputError(
                "a system prompt needs the model's chat template, and this model has none in a manifest.",
                fix="pass --template FAMILY (gemma, llama3, qwen2, qwen2.5, chatml, phi3) or a .jinja file")

    @property
    def uses_kv_cache(self) -> bool:
        return self.llm.features.has_keep_history

    @overload
    def send(self, content: str, *, stream: Literal[True] = ..., lora: str | None = None, stop: Sequence[str] = (),
             enable_thinking: bool | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
             on_token: TokenHook | None = None, images: Sequence[Any] | None = None,
             **sampling: Any) -> GenerationStream: ...

    @overload
    def send(self, content: str, *, stream: Literal[False], lora: str | None = None, stop: Sequence[str] = (),
             enable_thinking: bool | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
             on_token: TokenHook | None = None, images: Sequence[Any] | None = None,
             **sampling: Any) -> GenerationResult: ...

    @overload
    def send(self, content: str, *, stream: bool, lora: str | None = None, stop: Sequence[str] = (),
             enable_thinking: bool | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
             on_token: TokenHook | None = None, images: Sequence[Any] | None = None,
             **sampling: Any) -> GenerationStream | GenerationResult: ...

    def send(self, content: str, *, stream: bool = True, lora: str | None = None, stop: Sequence[str] = (),
             enable_thinking: bool | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
             on_token: TokenHook | None = None, images: Sequence[Any] | None = None,
             **sampling: Any) -> GenerationStream | GenerationResult:
        """Adds a user turn (with ``images``, for a vision-language model) and generates the reply (appended to
        :attr:`messages` when it ends)."""
        if not content and not images:
            raise InputError("empty message")
        message: Message = {"role": "user", "content": content}
        if images:
            message["images"] = list(images)
        return self.respond([*self.messages, message], stream=stream, lora=lora,
                            stop=stop, enable_thinking=enable_thinking, tools=tools, on_token=on_token, **sampling)

    def send_tool_result(self, content: str, *, tool_call_id: str | None = None, name: str | None = None,
                         stream: bool = True, **kwargs: Any) -> GenerationStream | GenerationResult:
        """Adds the result of a tool call (the ``tool`` role) and generates the model's answer to it."""
        message: Message = {"role": "tool", "content": content}
        if tool_call_id is not None:
            message["tool_call_id"] = tool_call_id
        if name is not None:
            message["name"] = name
        return self.respond([*self.messages, message], stream=stream, **kwargs)

    @overload
    def respond(self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[True] = ...,
                lora: str | None = None, stop: Sequence[str] = (), enable_thinking: bool | None = None,
                tools: Sequence[Mapping[str, Any]] | None = None, template_kwargs: Mapping[str, Any] | None = None,
                on_token: TokenHook | None = None, rendered: str | None = None,
                **sampling: Any) -> GenerationStream: ...

    @overload
    def respond(self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[False], lora: str | None = None,
                stop: Sequence[str] = (), enable_thinking: bool | None = None,
                tools: Sequence[Mapping[str, Any]] | None = None, template_kwargs: Mapping[str, Any] | None = None,
                on_token: TokenHook | None = None, rendered: str | None = None,
                **sampling: Any) -> GenerationResult: ...

    @overload
    def respond(self, messages: Sequence[Mapping[str, Any]], *, stream: bool, lora: str | None = None,
                stop: Sequence[str] = (), enable_thinking: bool | None = None,
                tools: Sequence[Mapping[str, Any]] | None = None, template_kwargs: Mapping[str, Any] | None = None,
                on_token: TokenHook | None = None, rendered: str | None = None,
                **sampling: Any) -> GenerationStream | GenerationResult: ...

    def respond(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = True, lora: str | None = None,
                stop: Sequence[str] = (), enable_thinking: bool | None = None,
                tools: Sequence[Mapping[str, Any]] | None = None, template_kwargs: Mapping[str, Any] | None = None,
                on_token: TokenHook | None = None, rendered: str | None = None,
                **sampling: Any) -> GenerationStream | GenerationResult:
        """Generates the reply to a whole conversation (ending with a user turn or a tool result), reusing the
        KV cache for whatever prefix of it the cache already holds (an OpenAI-style server sends the history
        each time).

        Args:
            enable_thinking: the template's (or runtime's) thinking switch; None leaves the template's default.
            tools: tool definitions (OpenAI/JSON-schema shape): rendered by the model's template, or given to the
                runtime's function calling when the runtime renders. Tool calls in the reply are parsed into
                ``result.tool_calls``.
            template_kwargs: other keywords of the model's template (``documents``, ``date_string``...).
            rendered: the conversation's rendering when the caller has made it (the server, to count it); with
                images, of the messages as :func:`~rkedge.runtime.images.flatten_images` gives them.

        A user message's images (``images`` list or image content parts) go to the model's vision encoder; see
        the module's text.
        """
        if not messages or messages[-1].get("role") not in ("user", "tool"):
            raise InputError("the conversation must end with a user message or a tool result")
        conversation = self.with_placeholders(messages)
        for message in conversation:  # refused before anything is rendered or counted
            if isinstance(message.get("content"), str):
                c_text(message["content"], f"a {message.get('role')} message")
        self.dropped_messages = 0
        tool_list = [dict(t) for t in tools] if tools else None
        if self.llm.template is None:
            request, output = self._runtime_renders(conversation, tool_list, enable_thinking)
            images = list(conversation[-1].get("images") or ())
            full: str | None = None
        else:
            prompt, full, images = self._prompt_for(conversation, tool_list, enable_thinking, template_kwargs,
                                                    rendered)
            # The model's own template carries the thinking switch; the runtime's flag acts through the runtime's
            # template, which is off. Hand-written families have no switch: their runs keep passing the flag.
            runtime_flag = bool(enable_thinking) and not isinstance(self.llm.template, JinjaChatTemplate)
            request = RunRequest(prompt=c_text(prompt, "the prompt"), keep_history=self.uses_kv_cache,
                                 enable_thinking=runtime_flag)
            output = self.llm.output_format(tools=bool(tool_list), prompt=full)
        if images:
            if request.prompt is not None and request.prompt.count(self.llm.image_placeholder.encode()) != len(images):
                raise InputError("the chat template did not keep one image placeholder per image.",
                                 fix="use a chat template that renders a message's text as it is")
            request.media = self.llm.encode_images(images).media(self.llm.abi)
        keep = self.uses_kv_cache
        held_images = [image_key(i) for m in conversation for i in m.get("images") or ()] if keep else []
        request.lora_name = lora
        request.max_new_tokens = sampling.pop("max_new_tokens", None)

        def record(result: GenerationResult) -> None:
            if result.finish_reason == "error":
                self.messages = conversation[:-1]
                self._cached_text = None
                self._cached_images = []
                return
            reply: Message = {"role": "assistant", "content": result.content}
            if result.reasoning is not None:
                reply["reasoning_content"] = result.reasoning
            if result.tool_calls:
                reply["tool_calls"] = [call.as_message_field() for call in result.tool_calls]
            self.messages = [*conversation, reply]
            self._cached_text = (full + result.text) if (keep and full is not None) else None
            self._cached_images = held_images

        values = {k: v for k, v in sampling.items() if v is not None}
        if values:
            request.sampling = Sampling(**values)
        generation = self.llm.run(request, owner=self, stop=stop, on_token=on_token, on_done=record, output=output)
        return generation if stream else generation.collect()

    def with_placeholders(self, messages: Sequence[Mapping[str, Any]]) -> list[Message]:
        """The conversation with each image as a placeholder in its message's text (the images kept in the
        message's ``images``); video and audio, and images for a model without eyes, refused with the reason.

        What :meth:`respond` renders: a caller that renders the conversation itself (to count it, then passes
        ``rendered=``) renders these messages; each placeholder then stands for ``llm.vision.image_tokens``
        positions."""
        llm = self.llm
        conversation: list[Message] = []
        for message in messages:
            kind = _carries_media(message)
            if kind in ("video", "audio"):
                raise llm.media_refusal(kind)
            if llm.vision is None:
                if kind is not None:
                    llm.encode_images([])  # raises: this model has no vision encoder
                conversation.append(dict(message))
                continue
            flat, images = flatten_images(message, llm.image_placeholder)
            if images:
                flat["images"] = images
            conversation.append(flat)
        return conversation

    # -- rkedge renders ----------------------------------------------------------------------------------------

    def _render(self, conversation: list[Message], tools: list[Message] | None, enable_thinking: bool | None,
                template_kwargs: Mapping[str, Any] | None) -> str:
        template = self.llm.template
        assert template is not None
        if isinstance(template, JinjaChatTemplate):
            kwargs = dict(template_kwargs or {})
            if enable_thinking is not None:
                kwargs["enable_thinking"] = enable_thinking
            if tools:
                keyword = template.tools_keyword
                if keyword is None:  # transformers would drop them without a word
                    raise InputError(f"{template.model_name or 'this model'}'s chat template has no place for "
                                     "tools; they would be lost.",
                                     fix="send the request without tools, or use a model trained for tool calling")
                if keyword != "tools":
                    kwargs.setdefault(keyword, tools)
                    tools = None
            return template.render(conversation, True, tools=tools, **kwargs)
        return template.render(conversation, add_generation_prompt=True, tools=tools)

    def _prompt_for(self, conversation: list[Message], tools: list[Message] | None, enable_thinking: bool | None,
                    template_kwargs: Mapping[str, Any] | None, rendered: str | None) -> tuple[str, str, list[Any]]:
        """The text to send, the whole rendering, and the images of the text to send."""
        full = rendered if rendered is not None else self._render(conversation, tools, enable_thinking,
                                                                  template_kwargs)
        if rendered is None:
            full = self._fit(conversation, full, lambda: self._render(conversation, tools, enable_thinking,
                                                                      template_kwargs))
        images = [image for message in conversation for image in message.get("images") or ()]
        if images and full.count(self.llm.image_placeholder) != len(images):
            raise InputError(f"the rendering holds {full.count(self.llm.image_placeholder)} image placeholders for "
                             f"{len(images)} images.",
                             fix="render the messages as rkedge.runtime.images.flatten_images gives them")
        cached = self._cached_text
        if self.uses_kv_cache and cached is not None and self.llm.kv_cache_owner is self:
            held = self._cached_images
            if full.startswith(cached) and [image_key(i) for i in images[:len(held)]] == held:
                return full[len(cached):], full, images[len(held):]
            # The template rewrote history (Qwen3 drops earlier reasoning, a date changed...): say so, start over.
            self.full_prefills += 1
            log.warning("the chat template's rendering of this conversation does not extend what the KV cache "
                        "holds (%d characters); clearing the cache and prefilling the whole conversation",
                        len(cached))
        if self.llm.kv_cache_owner is self:
            self.llm.clear_kv_cache()
        return full, full, images

    def _fit(self, conversation: list[Message], full: str, render: Callable[[], str]) -> str:
        """Applies the context policy until the rendering fits (a counter is needed to know)."""
        count = self._count
        if count is None:
            return full
        limit = self.llm.max_context_len
        tokens = count(full)
        if tokens < limit:
            return full
        if self.context_policy == "error":
            raise _too_long(tokens, limit)
        before = len(conversation)
        while tokens >= limit:
            if not _drop_oldest_turn(conversation, keep_only_last=self.context_policy == "reset"):
                raise _too_long(tokens, limit, after_policy=self.context_policy)
            full = render()
            tokens = count(full)
        self.dropped_messages = before - len(conversation)
        log.info("context full: dropped the %d oldest messages (policy %s)", self.dropped_messages,
                 self.context_policy)
        return full

    # -- the runtime renders -----------------------------------------------------------------------------------

    def _runtime_renders(self, conversation: list[Message], tools: list[Message] | None,
                         enable_thinking: bool | None) -> tuple[RunRequest, OutputFormat]:
        """The runtime's embedded template wraps this turn; its KV cache holds the earlier ones."""
        llm = self.llm
        if not self.uses_kv_cache and len(conversation) > 1:
            raise InputError("multi-turn chat on ABI 1.1 needs the model's chat template.",
                             fix="pass --template FAMILY")
        last = conversation[-1]
        if tools is not None:
            if not llm.features.has_function_tools:
                raise InputError(f"tools need the model's chat template or runtime function calling (ABI 1.2.1 or "
                                 f"newer; this library is {llm.abi}).", fix="pass the model's .jinja template")
            tools_json = json.dumps(tools, ensure_ascii=False)
            if tools_json != llm.runtime_tools:
                llm.set_function_tools("", tools_json, "tool_response")
                # UNKNOWN whether librkllmrt keeps the cache across a new tool list: start this conversation over.
                if llm.kv_cache_owner is self:
                    llm.clear_kv_cache()
        fresh = llm.kv_cache_owner is not self or _comparable(conversation[:-1]) != _comparable(self.messages)
        if fresh:
            if llm.kv_cache_owner is self:
                llm.clear_kv_cache()
            conversation[:] = [last]
        content = last.get("content")
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        count = self._count
        if count is not None:
            held = 0 if fresh else (llm.kv_cache_size() or 0)
            tokens = held + count(text)
            if tokens >= llm.max_context_len:
                if self.context_policy == "error" or fresh:
                    raise _too_long(tokens, llm.max_context_len)
                self.dropped_messages = len(conversation) - 1
                llm.clear_kv_cache()
                conversation[:] = [last]
        request = RunRequest(prompt=c_text(text, "the message"), keep_history=self.uses_kv_cache,
                             role="tool" if last.get("role") == "tool" else "user",
                             enable_thinking=bool(enable_thinking))
        return request, llm.output_format(tools=bool(tools))

    # -- the rest ----------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets the conversation (keeps the system prompt) and clears the KV cache."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        if self.llm.kv_cache_owner is self:
            self.llm.clear_kv_cache()
        self._cached_text = None
        self._cached_images = []

    def set_system(self, system: str | None) -> None:
        if system and self.llm.template is None:
            raise InputError("a system prompt needs the model's chat template.", fix="pass --template FAMILY")
        self.system = system or None
        self.reset()


def _carries_media(message: Mapping[str, Any]) -> str | None:
    """The kind of media a message carries ("image", "video", "audio"), or None."""
    if message.get("images"):
        return "image"
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind in IMAGE_PARTS:
                return "image"
            if kind in OTHER_MEDIA_PARTS:
                return OTHER_MEDIA_PARTS[str(kind)]
    return None


def _comparable(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages with their images as fingerprints (arrays do not compare with ``==``)."""
    return [{**m, "images": [image_key(i) for i in m["images"]]} if m.get("images") else dict(m) for m in messages]


def _drop_oldest_turn(conversation: list[Message], *, keep_only_last: bool) -> bool:
    """Removes the oldest turn (a user message and what answered it) after the system prompt; with
    ``keep_only_last`` every turn but the last. False when only the last turn is left."""
    first = 1 if conversation and conversation[0].get("role") == "system" else 0
    starts = [i for i in range(first, len(conversation)) if conversation[i].get("role") == "user"]
    if len(starts) < 2:
        return False
    cut = starts[-1] if keep_only_last else starts[1]
    del conversation[first:cut]
    return True


def _too_long(tokens: int, limit: int, after_policy: str | None = None) -> ContextLengthExceeded:
    where = f" even after the '{after_policy}' policy" if after_policy else ""
    return ContextLengthExceeded(
        f"the conversation is {tokens} tokens{where}; the model's context holds {limit}.",
        fix="start over (/reset), let the session drop old turns (context_policy='drop_oldest'), or load the "
            "model with a larger max_context_len (up to its limit)")
