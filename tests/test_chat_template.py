"""The model's own Jinja chat template, rendered by rkedge, against transformers' apply_chat_template.

Every template in tests/data/chat_templates (provenance in SOURCES.md) x every conversation below (system
prompts, history, tool calls and tool results, reasoning in history) x template keywords (tools,
enable_thinking on/off, documents): rkedge's rendering equals transformers' character for character, or both
refuse with the template's own message.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from rkedge.errors import InputError
from rkedge.runtime.chat_template import JinjaChatTemplate, TemplateRefusal, render_template

TEMPLATE_DIR = Path(__file__).parent / "data" / "chat_templates"

#: template file -> (bos_token, eos_token)
TOKENS: dict[str, tuple[str | None, str]] = {
    "gemma-2b-it.jinja": ("<bos>", "<eos>"),
    "gemma-2-2b-it.jinja": ("<bos>", "<eos>"),
    "gemma-3-1b-it.jinja": ("<bos>", "<eos>"),
    "llama-3-8b-instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama-3.1-8b-instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama-3.2-1b-instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen2-0.5b-instruct.jinja": (None, "<|im_end|>"),
    "qwen2.5-1.5b-instruct.jinja": (None, "<|im_end|>"),
    "qwen3-0.6b.jinja": (None, "<|im_end|>"),
    "phi-3-mini-4k-instruct.jinja": ("<s>", "<|endoftext|>"),
    "mistral-nemo-instruct-2407.jinja": ("<s>", "</s>"),
    "smollm3-3b.jinja": (None, "<|im_end|>"),
    "deepseek-r1-distill-qwen-32b.jinja": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "hermes-3-llama-3.1-8b-tool_use.jinja": ("<|begin_of_text|>", "<|im_end|>"),
}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city <and> its \"feel\" & more",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
TOOL_CALL = {"id": "call12345", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}

SYSTEM = {"role": "system", "content": "You are terse. Größe 日本語 🚀"}
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system": [SYSTEM, {"role": "user", "content": "  What is the RK3588?  "}],
    "history": [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.\n"},
                {"role": "user", "content": "How fast is the NPU?"}],
    "tool_call": [SYSTEM, {"role": "user", "content": "Weather in Zürich?"},
                  {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                  {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
                   "content": "{\"temperature\": 21}"}],
    "tool_answered": [{"role": "user", "content": "Weather in Zürich?"},
                      {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                      {"role": "tool", "tool_call_id": "call12345", "content": "21 C"},
                      {"role": "assistant", "content": "It is 21 C."},
                      {"role": "user", "content": "Thanks"}],
    "reasoning": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "Adding two and two."},
                  {"role": "user", "content": "And 3+3?"}],
    "think_in_content": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "<think>\nsum\n</think>\n\n4"},
                         {"role": "user", "content": "ok"}],
}
KWARGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "tools": {"tools": [WEATHER_TOOL]},
    "thinking_off": {"enable_thinking": False},
    "thinking_on_tools": {"enable_thinking": True, "tools": [WEATHER_TOOL]},
    "documents": {"documents": [{"title": "NPU", "text": "6 TOPS"}]},
}


def hf_tokenizer(bos: str | None, eos: str) -> Any:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    specials = [t for t in (bos, eos, "<unk>") if t]
    model = tokenizers.models.WordLevel({t: i for i, t in enumerate(specials)}, unk_token="<unk>")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model), bos_token=bos,
                                                eos_token=eos, unk_token="<unk>")


def special_tokens(bos: str | None, eos: str) -> dict[str, str]:
    tokens = {"eos_token": eos, "unk_token": "<unk>"}
    if bos:
        tokens["bos_token"] = bos
    return tokens


def expected(filename: str, messages: list[dict[str, Any]], generate: bool, kwargs: dict[str, Any]) -> str | Exception:
    bos, eos = TOKENS[filename]
    try:
        return str(hf_tokenizer(bos, eos).apply_chat_template(
            copy.deepcopy(messages), chat_template=(TEMPLATE_DIR / filename).read_text(), tokenize=False,
            add_generation_prompt=generate, date_string="22 Nov 2026", **copy.deepcopy(kwargs)))
    except Exception as exc:  # the template's own refusal (raise_exception) or a failure on these messages
        return exc


def test_the_corpus_is_complete():
    present = {p.name for p in TEMPLATE_DIR.glob("*.jinja")}
    assert present == set(TOKENS)
    sources = (TEMPLATE_DIR / "SOURCES.md").read_text()
    for name in present:
        assert name in sources, f"{name} has no provenance in SOURCES.md"


@pytest.mark.parametrize("filename", sorted(TOKENS))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("kwargs", sorted(KWARGS))
@pytest.mark.parametrize("generate", [True, False])
def test_rendering_equals_transformers(filename, conversation, kwargs, generate):
    messages = CONVERSATIONS[conversation]
    want = expected(filename, messages, generate, KWARGS[kwargs])
    bos, eos = TOKENS[filename]
    template = JinjaChatTemplate((TEMPLATE_DIR / filename).read_text(), special_tokens(bos, eos), filename)
    extra = copy.deepcopy(KWARGS[kwargs])
    tools = extra.pop("tools", None)
    documents = extra.pop("documents", None)
    if isinstance(want, Exception):
        with pytest.raises(TemplateRefusal) as caught:
            template.render(copy.deepcopy(messages), generate, include_bos=True, tools=tools, documents=documents,
                            date_string="22 Nov 2026", **extra)
        assert filename in caught.value.message and caught.value.fix
        if type(want).__name__ == "TemplateError":  # the model's own rule, quoted
            assert str(want) in caught.value.message
        return
    got = template.render(copy.deepcopy(messages), generate, include_bos=True, tools=tools, documents=documents,
                          date_string="22 Nov 2026", **extra)
    assert got == want


def test_the_corpus_exercises_tools_thinking_and_refusals():
    """The comparison above is not vacuous: the renderings differ where the features are used."""
    qwen3 = JinjaChatTemplate((TEMPLATE_DIR / "qwen3-0.6b.jinja").read_text(), special_tokens(None, "<|im_end|>"))
    plain = qwen3.render(CONVERSATIONS["user"])
    off = qwen3.render(CONVERSATIONS["user"], enable_thinking=False)
    assert off == plain + "<think>\n\n</think>\n\n"
    with_tools = qwen3.render(CONVERSATIONS["tool_call"], tools=[WEATHER_TOOL])
    assert '"name": "get_weather"' in with_tools and "<tool_response>\n{\"temperature\": 21}\n</tool_response>" \
        in with_tools and "<tools>" in with_tools
    assert qwen3.supports_tools and qwen3.supports_thinking
    gemma = JinjaChatTemplate((TEMPLATE_DIR / "gemma-2b-it.jinja").read_text(), special_tokens("<bos>", "<eos>"),
                              "google/gemma-2b-it")
    with pytest.raises(TemplateRefusal, match="google/gemma-2b-it's chat template refuses .*System role not supported"):
        gemma.render(CONVERSATIONS["system"])


def test_bos_is_left_to_the_runtime_and_html_is_not_escaped():
    llama = JinjaChatTemplate((TEMPLATE_DIR / "llama-3.1-8b-instruct.jinja").read_text(),
                              special_tokens("<|begin_of_text|>", "<|eot_id|>"))
    text = llama.render(CONVERSATIONS["user"], tools=[WEATHER_TOOL], date_string="1 Jan 2026")
    assert not text.startswith("<|begin_of_text|>")
    assert llama.render(CONVERSATIONS["user"], include_bos=True, date_string="1 Jan 2026").startswith(
        "<|begin_of_text|>")
    assert '<and> its \\"feel\\" & more' in text  # transformers' tojson: no HTML escaping


def test_sandbox_and_template_errors_are_input_errors():
    with pytest.raises(TemplateRefusal):
        render_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
                        [{"role": "user", "content": "x"}])
    with pytest.raises(TemplateRefusal):  # transformers' namespace refuses underscore names
        render_template("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="not valid Jinja"):
        render_template("{% if %}", [{"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="empty conversation"):
        render_template("{{ 1 }}", [])


def test_loop_controls_generation_tag_and_helpers():
    source = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{% generation %}{{ m.content }}"
              "{% endgeneration %}{% endfor %}|{{ strftime_now('%Y') | length }}|{{ dict(a=1) | tojson }}")
    out = render_template(source, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert out == 'a|4|{"a": 1}'
