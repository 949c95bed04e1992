"""Multi-turn chat with real KV-cache reuse.

With a known template family, the session renders the whole conversation once per turn and sends the
runtime only what its KV cache does not hold yet: the rendering minus the text already prefilled (the
previous prompt plus the reply). If the rendering no longer extends what is cached (another caller used the
model, the template rewrote history), the cache is cleared and the whole conversation is sent. ABI 1.1 has
no ``keep_history``: every turn sends the whole conversation.

Without a template family (a vendor ``.rkllm`` with no rkedge manifest), the runtime's embedded template
wraps each user turn (ABI >= 1.2.0) and only the new user text is sent.

Assumption (UNKNOWN for librkllmrt, true of llama.cpp-style loops): the EOS token that ends a reply is not
evaluated into the KV cache, so the next turn's delta starts with the end-of-turn marker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

from rkedge.errors import InputError
from rkedge.runtime._stream import GenerationResult, GenerationStream, TokenHook
from rkedge.runtime.llm import LLM
from rkedge.runtime.types import RunRequest, Sampling


class ChatSession:
    """A conversation with one :class:`LLM`."""

    def __init__(self, llm: LLM, system: str | None = None) -> None:
        self.llm = llm
        self.system = system
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self._cached_text: str | None = None  # what the runtime's KV cache holds for this session
        if system and llm.template is None:
            raise InputError(
                "a system prompt needs the model's chat template, and this model has none in a manifest.",
                fix="pass --template FAMILY (gemma, llama3, qwen2, qwen2.5, chatml, phi3)")

    @property
    def uses_kv_cache(self) -> bool:
        return self.llm.features.has_keep_history

    @overload
    def send(self, content: str, *, stream: Literal[True] = ..., lora: str | None = None, stop: Sequence[str] = (),
             enable_thinking: bool = False, on_token: TokenHook | None = None,
             **sampling: Any) -> GenerationStream: ...

    @overload
    def send(self, content: str, *, stream: Literal[False], lora: str | None = None, stop: Sequence[str] = (),
             enable_thinking: bool = False, on_token: TokenHook | None = None,
             **sampling: Any) -> GenerationResult: ...

    @overload
    def send(self, content: str, *, stream: bool, lora: str | None = None, stop: Sequence[str] = (),
             enable_thinking: bool = False, on_token: TokenHook | None = None,
             **sampling: Any) -> GenerationStream | GenerationResult: ...

    def send(self, content: str, *, stream: bool = True, lora: str | None = None, stop: Sequence[str] = (),
             enable_thinking: bool = False, on_token: TokenHook | None = None,
             **sampling: Any) -> GenerationStream | GenerationResult:
        """Adds a user turn and generates the reply (appended to :attr:`messages` when it ends)."""
        if not content:
            raise InputError("empty message")
        return self.respond([*self.messages, {"role": "user", "content": content}], stream=stream, lora=lora,
                            stop=stop, enable_thinking=enable_thinking, on_token=on_token, **sampling)

    @overload
    def respond(self, messages: list[dict[str, str]], *, stream: Literal[True] = ..., lora: str | None = None,
                stop: Sequence[str] = (), enable_thinking: bool = False, on_token: TokenHook | None = None,
                rendered: str | None = None, **sampling: Any) -> GenerationStream: ...

    @overload
    def respond(self, messages: list[dict[str, str]], *, stream: Literal[False], lora: str | None = None,
                stop: Sequence[str] = (), enable_thinking: bool = False, on_token: TokenHook | None = None,
                rendered: str | None = None, **sampling: Any) -> GenerationResult: ...

    @overload
    def respond(self, messages: list[dict[str, str]], *, stream: bool, lora: str | None = None,
                stop: Sequence[str] = (), enable_thinking: bool = False, on_token: TokenHook | None = None,
                rendered: str | None = None, **sampling: Any) -> GenerationStream | GenerationResult: ...

    def respond(self, messages: list[dict[str, str]], *, stream: bool = True, lora: str | None = None,
                stop: Sequence[str] = (), enable_thinking: bool = False, on_token: TokenHook | None = None,
                rendered: str | None = None, **sampling: Any) -> GenerationStream | GenerationResult:
        """Generates the reply to a whole conversation (ending with a user turn), reusing the KV cache for
        whatever prefix of it the cache already holds (an OpenAI-style server sends the history each time).
        ``rendered``: the conversation's template rendering when the caller has made it (the server, to count it)."""
        if not messages or messages[-1].get("role") != "user":
            raise InputError("the conversation must end with a user message")
        conversation = [dict(m) for m in messages]
        prompt, full = self._prompt_for(conversation, conversation[-1]["content"], rendered)
        keep = self.uses_kv_cache

        def record(result: GenerationResult) -> None:
            if result.finish_reason == "error":
                self.messages = conversation[:-1]
                self._cached_text = None
                return
            self.messages = [*conversation, {"role": "assistant", "content": result.text}]
            self._cached_text = (full + result.text) if (keep and full is not None) else None

        request = RunRequest(prompt=prompt.encode("utf-8"), keep_history=keep, lora_name=lora,
                             enable_thinking=enable_thinking, max_new_tokens=sampling.pop("max_new_tokens", None))
        sampling = {k: v for k, v in sampling.items() if v is not None}
        if sampling:
            request.sampling = Sampling(**sampling)
        result = self.llm.run(request, owner=self, stop=stop, on_token=on_token, on_done=record)
        return result if stream else result.collect()

    def _prompt_for(self, conversation: list[dict[str, str]], content: str,
                    rendered: str | None = None) -> tuple[str, str | None]:
        template = self.llm.template
        if template is None:
            # The runtime's own template wraps this turn; its KV cache holds the earlier ones.
            if not self.uses_kv_cache and len(conversation) > 1:
                raise InputError("multi-turn chat on ABI 1.1 needs the model's chat template.",
                                 fix="pass --template FAMILY")
            if self.llm.kv_cache_owner is not self or conversation[:-1] != self.messages:
                # The cache holds another conversation: start over from this turn alone.
                if self.llm.kv_cache_owner is self:
                    self.llm.clear_kv_cache()
                conversation[:] = [conversation[-1]]
            return content, None
        full = rendered if rendered is not None else template.render(conversation, add_generation_prompt=True)
        cached = self._cached_text
        if self.uses_kv_cache and cached is not None and self.llm.kv_cache_owner is self and full.startswith(cached):
            return full[len(cached):], full
        if self.llm.kv_cache_owner is self:
            self.llm.clear_kv_cache()
        return full, full

    def reset(self) -> None:
        """Forgets the conversation (keeps the system prompt) and clears the KV cache."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        if self.llm.kv_cache_owner is self:
            self.llm.clear_kv_cache()
        self._cached_text = None

    def set_system(self, system: str | None) -> None:
        if system and self.llm.template is None:
            raise InputError("a system prompt needs the model's chat template.", fix="pass --template FAMILY")
        self.system = system or None
        self.reset()
