"""Hand-written chat template families: the fallback for a model whose files carry no Jinja template.

A model's own Hugging Face template is rendered by :mod:`rkedge.runtime.chat_template` (tools, thinking and
the ``tool`` role included); these families cover vendor files and older manifests that only name a family.
They have no tool calling: given tools they refuse (the tools would otherwise be lost). Each family reproduces the Hugging Face template of its models character for character (tests compare
against ``tokenizer.apply_chat_template`` with the real Jinja templates in ``tests/data/chat_templates``).
The runtime is sent the rendering *without* the BOS token: the runtime's tokenizer adds BOS itself, as
llama.cpp-derived tokenizers do (UNKNOWN for librkllmrt; documented in the README).

Where a Hugging Face template refuses something the runtime can still do (Gemma 1/2 raise on a system
message), the family folds it the way the newer template of the same family does (Gemma 3: the system
text leads the first user turn).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rkedge.errors import InputError

Message = Mapping[str, Any]
QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass(frozen=True)
class ChatTemplate:
    """A template family: how a conversation becomes the prompt text the model was trained on."""

    family: str
    bos_token: str
    renderer: Callable[[ChatTemplate, Sequence[Message], bool], str]
    default_system: str | None = None
    #: Llama 3.2 writes today's date into its system header (Hugging Face: strftime_now("%d %b %Y")).
    #: Fixed when the template object is made, so the prompt prefix stays stable across a session's turns.
    date_string: str = field(default_factory=lambda: time.strftime("%d %b %Y"))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, *,
               include_bos: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
               **template_kwargs: Any) -> str:
        """The prompt for ``messages`` (roles: system, user, assistant). Other template keywords
        (``enable_thinking``, ``documents``...) are ignored, as a Hugging Face template that does not read them
        ignores them; ``tools`` are refused: these families cannot render them."""
        if tools:
            raise InputError(f"rkedge's hand-written {self.family} template has no tool calling; the tools would be "
                             "lost.", fix="use the model's own chat template (reconvert, or pass its .jinja file)")
        for message in messages:
            if message.get("role") not in ("system", "user", "assistant"):
                raise InputError(f"unknown chat role {message.get('role')!r}; use system, user or assistant")
        text = self.renderer(self, messages, add_generation_prompt)
        return (self.bos_token + text) if include_bos else text

    def with_date(self, date_string: str) -> ChatTemplate:
        from dataclasses import replace

        return replace(self, date_string=date_string)

    def runtime_parts(self) -> tuple[str, str, str]:
        """``(system_prompt, prompt_prefix, prompt_postfix)`` around one user turn, as the runtime's embedded
        template (``rkllm_set_chat_template``) expresses it. The system part is whatever precedes the turn
        when no system message is given (a default system prompt, Llama 3.2's date header)."""
        probe = "\x00"
        before, after = self.render([{"role": "user", "content": probe}], True).split(probe)
        prefix_start = before.rfind(_turn_opening(before))
        return before[:prefix_start], before[prefix_start:], after


def _turn_opening(before: str) -> str:
    """The opening marker of the user turn at the end of ``before`` (the text ahead of the user content)."""
    for marker in ("<start_of_turn>user", "<|start_header_id|>user", "<|im_start|>user", "<|user|>"):
        if marker in before:
            return marker
    return before


def _trimmed(text: str) -> str:
    return text.strip()


def _render_gemma(template: ChatTemplate, messages: Sequence[Message], generate: bool) -> str:
    first_user_prefix = ""
    loop = list(messages)
    if loop and loop[0]["role"] == "system":
        first_user_prefix = loop[0]["content"] + "\n\n"
        loop = loop[1:]
    out = []
    for index, message in enumerate(loop):
        role = "model" if message["role"] == "assistant" else message["role"]
        out.append(f"<start_of_turn>{role}\n{first_user_prefix if index == 0 else ''}"
                   f"{_trimmed(message['content'])}<end_of_turn>\n")
    if generate:
        out.append("<start_of_turn>model\n")
    return "".join(out)


def _render_llama3(template: ChatTemplate, messages: Sequence[Message], generate: bool) -> str:
    out = [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{_trimmed(m['content'])}<|eot_id|>" for m in messages]
    if generate:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def _render_llama32(template: ChatTemplate, messages: Sequence[Message], generate: bool) -> str:
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = _trimmed(messages[0]["content"]), messages[1:]
    header = ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
              f"Today Date: {template.date_string}\n\n{system}<|eot_id|>")
    return header + _render_llama3(template, messages, generate)


def _render_chatml(template: ChatTemplate, messages: Sequence[Message], generate: bool) -> str:
    out = []
    if template.default_system is not None and (not messages or messages[0]["role"] != "system"):
        out.append(f"<|im_start|>system\n{template.default_system}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if generate:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _render_phi3(template: ChatTemplate, messages: Sequence[Message], generate: bool) -> str:
    out = [f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages]
    out.append("<|assistant|>\n" if generate else "<|endoftext|>")
    return "".join(out)


TEMPLATES: dict[str, ChatTemplate] = {
    # Gemma, Gemma 2 and Gemma 3 share the turn format (google/gemma-2b-it, gemma-2-2b-it, gemma-3-1b-it).
    "gemma": ChatTemplate("gemma", "<bos>", _render_gemma),
    # Meta-Llama-3-8B-Instruct.
    "llama3": ChatTemplate("llama3", "<|begin_of_text|>", _render_llama3),
    # Llama 3.1 / 3.2 Instruct (system header with knowledge cutoff and date; no tools).
    "llama3.2": ChatTemplate("llama3.2", "<|begin_of_text|>", _render_llama32),
    # Qwen2 / Qwen2.5 ChatML, with the default system prompt each inserts when none is given.
    "chatml": ChatTemplate("chatml", "", _render_chatml),
    "qwen2": ChatTemplate("qwen2", "", _render_chatml, QWEN2_DEFAULT_SYSTEM),
    "qwen2.5": ChatTemplate("qwen2.5", "", _render_chatml, QWEN25_DEFAULT_SYSTEM),
    # Phi-3-mini-4k-instruct.
    # (Its template writes no BOS; the tokenizer config adds none either.)
    "phi3": ChatTemplate("phi3", "", _render_phi3),
}


def get_template(family: str) -> ChatTemplate:
    try:
        return TEMPLATES[family]
    except KeyError:
        raise InputError(f"unknown chat template family {family!r}.",
                         fix=f"use one of: {', '.join(TEMPLATES)}") from None
