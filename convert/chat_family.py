"""Which of rkedge's template families reproduces a checkpoint's own chat template.

The board has no Jinja, so the runtime renders with a family (``rkedge.runtime.templates``). On the host the
checkpoint's real template is rendered with Jinja (as transformers does) for probe conversations, and the
family whose rendering is identical is recorded in the manifest. No match means the runtime renders the
checkpoint's own template with Jinja (``rkedge.runtime.chat_template``; the manifest carries the template and
its special tokens), and a warning says so. A checkpoint without any template relies on the toolkit's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rkedge.runtime.templates import TEMPLATES

if TYPE_CHECKING:
    from rkedge.convert.inspect import CheckpointInfo

PROBES = (
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "What is an NPU?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
)


def render_jinja(template: str, messages: list[dict[str, str]], *, bos_token: str = "", eos_token: str = "",
                 add_generation_prompt: bool = True, **extra: Any) -> str:
    """Renders a Hugging Face chat template the way transformers does (sandboxed Jinja, same globals)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None, **_: __import__("json").dumps(value, indent=indent,
                                                                                    ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                            add_generation_prompt=add_generation_prompt, **extra)


def detect_family(template: str | None, *, bos_token: str = "", eos_token: str = "") -> str | None:
    """The first family that renders every probe exactly like ``template`` (probes the template refuses are
    skipped; at least one must render)."""
    if not template:
        return None
    # The template's own renderings do not depend on the family: render them once.
    expected: list[tuple[Any, bool, str]] = []
    for probe in PROBES:
        for generate in (True, False):
            try:
                expected.append((probe, generate, render_jinja(template, probe, bos_token=bos_token,
                                                               eos_token=eos_token, add_generation_prompt=generate,
                                                               date_string="01 Jan 2026")))
            except Exception:  # a probe the template refuses (raise_exception) is skipped
                continue
    if not expected:
        return None
    for name, family in TEMPLATES.items():
        fixed_date = family.with_date("01 Jan 2026")
        if all(fixed_date.render(probe, generate, include_bos=bool(bos_token)) == text
               for probe, generate, text in expected):
            return name
    return None


@dataclass(frozen=True)
class ChatSetup:
    """How a checkpoint's prompts are rendered: its family (None: the toolkit's embedded template), the runtime's
    three template parts, and a renderer of one user prompt (for calibration)."""

    family: str | None
    parts: tuple[str, str, str] | None
    render: Callable[[str], str]
    own_template: bool = False  # no family matches: the runtime must render the checkpoint's own template

    @property
    def prompt_renderer(self) -> str:
        """Who renders chat prompts on the board: ``family`` (rkedge's hand-written one), ``model`` (the
        checkpoint's Jinja template, from the manifest) or ``toolkit`` (the template embedded in the .rkllm)."""
        return "family" if self.family else "model" if self.own_template else "toolkit"

    @property
    def turn_marker(self) -> str | None:
        """The text every templated input carries (the prompt prefix), for the calibration lint."""
        return self.parts[1].strip() if self.parts else None

    def parts_dict(self) -> dict[str, str] | None:
        return dict(zip(("system_prompt", "prompt_prefix", "prompt_postfix"), self.parts, strict=True)) if self.parts else None


def chat_setup(info: CheckpointInfo) -> ChatSetup:
    """The family of ``info``'s own template (or the registry's, for a checkpoint without one)."""
    from rkedge.runtime.templates import get_template

    tokens = info.tokenizer_config
    family = None
    if info.chat_template:
        check_template_syntax(info.chat_template, info.path)
        try:
            family = detect_family(info.chat_template, bos_token=token_text(tokens.get("bos_token")),
                                   eos_token=token_text(tokens.get("eos_token")))
        except ImportError:  # no jinja2 on this host: fall back on the registry's family
            family = None
    if family is None and not info.chat_template:
        from rkedge.convert.architectures import find_spec

        spec = find_spec(info.architecture, info.model_type)
        family = spec.chat_family if spec else None
    if family is None and info.chat_template:
        # No family renders it: the board renders this very template with Jinja (the manifest carries it and
        # its special tokens), and calibration prompts are rendered the same way, never left bare.
        source, tokens = info.chat_template, special_tokens(info.tokenizer_config)
        return ChatSetup(None, None, lambda prompt: _render_own(source, prompt, tokens), own_template=True)
    if family is None:
        return ChatSetup(None, None, lambda prompt: prompt)
    template = get_template(family)
    return ChatSetup(family, template.runtime_parts(), lambda prompt: template.render(
        [{"role": "user", "content": prompt}], True, include_bos=False))


def check_template_syntax(template: str, where: object) -> None:
    """Refuses a chat template Jinja cannot parse: neither rkedge's renderer, the toolkit nor the runtime could
    use it, and every prompt would fail at serve time instead of here. No jinja2 on this host: not checked."""
    try:
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    try:
        env.parse(template)
    except TemplateSyntaxError as exc:
        from rkedge.errors import InputError

        raise InputError(f"the chat template of {where} is not valid Jinja (line {exc.lineno}: {exc.message}).",
                         fix="restore chat_template.jinja / tokenizer_config.json's chat_template from the base "
                             "model's repository") from None


def _render_own(source: str, prompt: str, tokens: dict[str, str]) -> str:
    from rkedge.runtime.chat_template import render_template

    return render_template(source, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                           special_tokens=tokens)


def special_tokens(tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """The special-token texts a chat template reads (bos_token, eos_token...), from tokenizer_config.json."""
    from rkedge.runtime.chat_template import SPECIAL_TOKEN_NAMES

    found = {name: token_text(tokenizer_config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return {name: text for name, text in found.items() if text}


def token_text(token: object) -> str:
    """A tokenizer_config token entry (a string or an AddedToken dict) as text."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return str(token or "")
