"""The model's own chat template, rendered as Hugging Face's ``apply_chat_template`` renders it.

A Hugging Face chat template is Jinja. transformers compiles it in an ``ImmutableSandboxedEnvironment`` with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension and a ``{% generation %}`` tag, and adds
``raise_exception``, a ``tojson`` filter that does not escape HTML (with ``indent``/``separators``/``sort_keys``/
``ensure_ascii``), ``strftime_now``, and guarded ``dict``/``namespace`` (transformers
``utils/chat_template_utils.py``, ``_cached_compile_jinja_template``). The template sees ``messages``, ``tools``,
``documents``, ``add_generation_prompt``, the tokenizer's special tokens (``bos_token``, ``eos_token``...) and
any other keyword (``enable_thinking``, ``date_string``...). Messages are first made plain data with ``None``
values dropped, and a reasoning text under ``reasoning_content``, ``thinking`` or ``reasoning`` is offered under
the first two names (``_normalize_chat_messages``, ``_alias_reasoning_fields``). This module does the same, so
the prompt is character for character what the model was trained on (tests/test_chat_template.py compares
against transformers over the templates in tests/data/chat_templates).

jinja2 is imported only when a template is compiled (the board's import of rkedge.runtime stays light).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from rkedge.errors import InputError

#: Names a message's reasoning is passed under; transformers copies it to the first two.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

#: The special-token names transformers passes to a template (its ``special_tokens_map``), in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateRefusal(InputError):
    """The model's chat template raised (its own rule, e.g. Gemma's "System role not supported")."""


@dataclasses.dataclass(frozen=True)
class JinjaChatTemplate:
    """One model's Jinja chat template with its special tokens.

    ``family`` names it in ``LLM.info()`` (``"jinja"`` plus the model name when known). The runtime is sent the
    rendering without a leading BOS token (its tokenizer adds one, as for the hand-written families).
    """

    source: str
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    model_name: str | None = None
    family: str = "jinja"

    @property
    def bos_token(self) -> str:
        return self.special_tokens.get("bos_token") or ""

    @property
    def supports_tools(self) -> bool:
        """The template reads ``tools`` (so a tool list passed as ``tools`` reaches the prompt)."""
        return re.search(r"(?<!\w)tools(?!\w)", self.source) is not None

    @property
    def tools_keyword(self) -> str | None:
        """The keyword this template takes tools under: ``tools``, or SmolLM3's ``xml_tools``; None: it has
        no place for tools."""
        if self.supports_tools:
            return "tools"
        return "xml_tools" if re.search(r"(?<!\w)xml_tools(?!\w)", self.source) else None

    @property
    def supports_thinking(self) -> bool:
        """The template reads ``enable_thinking`` (Qwen3, SmolLM3...)."""
        return "enable_thinking" in self.source

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, *,
               include_bos: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
               documents: Sequence[Mapping[str, Any]] | None = None, **template_kwargs: Any) -> str:
        """The prompt for ``messages``, as ``tokenizer.apply_chat_template(..., tokenize=False)`` gives it.

        ``include_bos=False`` (what the runtime is sent) drops the BOS token the template writes first.

        Raises:
            TemplateRefusal: the template raised (``raise_exception``) or failed on this conversation.
        """
        text = render_template(self.source, messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt,
                               special_tokens=self.special_tokens, model_name=self.model_name, **template_kwargs)
        bos = self.bos_token
        if not include_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return text


def render_template(source: str, messages: Sequence[Mapping[str, Any]], *,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    documents: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = False,
                    special_tokens: Mapping[str, str] | None = None, model_name: str | None = None,
                    **template_kwargs: Any) -> str:
    """Renders a Hugging Face chat template exactly as transformers does (keywords override special tokens)."""
    import jinja2

    if not messages:
        raise InputError("cannot render a chat template for an empty conversation",
                         fix="send at least one message")
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise InputError("documents must be objects with 'title' and 'text' keys")
    compiled = _compile(source)
    chat = _alias_reasoning(_plain([{k: v for k, v in dict(m).items() if v is not None} for m in messages]))
    context = {**_plain(dict(special_tokens or {})), **_plain(template_kwargs)}
    try:
        return str(compiled.render(messages=chat, tools=_plain(list(tools)) if tools is not None else None,
                                   documents=_plain(list(documents)) if documents is not None else None,
                                   add_generation_prompt=add_generation_prompt, **context))
    except jinja2.exceptions.TemplateError as exc:
        who = f"{model_name}'s chat template" if model_name else "the model's chat template"
        raise TemplateRefusal(f"{who} refuses this conversation: {exc}",
                              fix="change the conversation to follow the model's rule (for example fold the system "
                                  "prompt into the first user turn), or pass another template") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        who = f"{model_name}'s chat template" if model_name else "the model's chat template"
        raise TemplateRefusal(f"{who} failed on this conversation ({type(exc).__name__}: {exc})",
                              fix="check the messages' fields (role, content, tool_calls) against what the "
                                  "template reads") from None


def _compile(source: str) -> Any:
    try:
        return _compiled(source)
    except InputError:
        raise
    except Exception as exc:  # a jinja2 TemplateSyntaxError (jinja2 is imported lazily, so caught broadly)
        raise InputError(f"the chat template is not valid Jinja: {exc}",
                         fix="pass the model's tokenizer_config.json chat_template unchanged") from None


@lru_cache(maxsize=32)
def _compiled(source: str) -> Any:
    """The template compiled in transformers' environment (cached: a server renders the same one per request)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise InputError("rendering the model's own chat template needs jinja2.",
                         fix="pip install 'jinja2>=3.1.6' (a base dependency of rkedge)") from None

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' AssistantTracker): renders its body; the
        assistant-token mask it tracks is of no use on the board."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    class TemplateDict:
        """``dict`` for templates without attribute access to the real type (transformers' TemplateDict)."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace refusing underscore names (transformers': no way into CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick: self may be a keyword
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check_name(name: object) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson HTML-escapes (<, >, &, '); transformers' does not, and the models saw its output.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Plain JSON-like data only (transformers' ``_plain_template_data``): the sandbox then sees no object whose
    methods it does not know; anything else becomes an inert placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[Any]) -> list[Any]:
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


__all__ = ["JinjaChatTemplate", "TemplateRefusal", "render_template", "REASONING_FIELDS", "SPECIAL_TOKEN_NAMES"]
