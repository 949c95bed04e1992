"""Model output into content, reasoning and tool calls, per family, whole and incrementally."""

from __future__ import annotations

import json

import pytest
from test_chat_template import TEMPLATE_DIR

from rkedge.runtime.output_parsers import (
    OutputFormat,
    OutputParser,
    parse_output,
    prompt_opens_reasoning,
    tool_family_for,
)

WEATHER = {"city": "Zürich", "days": 2}

# (family, model output, expected content, expected reasoning, expected [(name, arguments)])
CASES = [
    ("hermes", "<think>\nLet me see.\n</think>\n\nIt is sunny 🌞.", "It is sunny 🌞.", "\nLet me see.\n", []),
    ("hermes", '<think>\nneed weather\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Zürich", "days": 2}}\n</tool_call>', "", "\nneed weather\n", [("get_weather", WEATHER)]),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", '
               '"arguments": "{\\"x\\": 1}"}\n</tool_call>', "\n", None, [("a", {}), ("b", {"x": 1})]),
    ("hermes", "<tool_call>\n{not json}\n</tool_call> so", "<tool_call>\n{not json}\n</tool_call> so", None, []),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {}}', "", None, [("a", {})]),  # cut before the closing tag
    ("hermes", "<tool_call>\n{\"name\": ", "<tool_call>\n{\"name\": ", None, []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Zürich", "days": 2}}', "", None,
     [("get_weather", WEATHER)]),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {}}<|eom_id|>', "", None, [("f", {})]),
    ("llama3", '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"a": 1}}', "", None,
     [("f", {}), ("g", {"a": 1})]),
    ("llama3", "{ this is just braces", "{ this is just braces", None, []),
    ("llama3", "Plain answer {with braces}", "Plain answer {with braces}", None, []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}, '
                '"id": "abc123DEF"}]', "", None, [("get_weather", WEATHER)]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich", "days": 2}', "", None, [("get_weather", WEATHER)]),
    ("mistral", "[TOOL_CALLS]nonsense", "[TOOL_CALLS]nonsense", None, []),
    ("gemma", 'Checking.\n```tool_code\nget_weather(city="Zürich", days=2)\n```', "Checking.\n", None,
     [("get_weather", WEATHER)]),
    ("gemma", '[get_weather(city="Zürich", days=2), tools.ping()]', "", None, [("get_weather", WEATHER),
                                                                             ("tools.ping", {})]),
    ("gemma", '```tool_code\n__import__("os").system("id")\n```', '```tool_code\n__import__("os").system("id")\n```',
     None, []),
    ("gemma", "[1] is a list", "[1] is a list", None, []),
    (None, '<tool_call>{"name": "a", "arguments": {}}</tool_call>', '<tool_call>{"name": "a", "arguments": {}}'
                                                                     '</tool_call>', None, []),  # no tools offered
    (None, "a < b and <thin ice", "a < b and <thin ice", None, []),
]


def summary(parsed):
    return parsed.content, parsed.reasoning, [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_whole_output(case):
    family, text, content, reasoning, calls = case
    assert summary(parse_output(text, OutputFormat(family))) == (content, reasoning, calls)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_incremental_output_equals_whole(case, size):
    family, text = case[0], case[1]
    parser = OutputParser(OutputFormat(family))
    deltas = []
    for start in range(0, len(text), size):
        deltas += parser.feed(text[start:start + size])
    deltas += parser.finish()
    result = parser.result()
    assert summary(result) == summary(parse_output(text, OutputFormat(family)))
    assert "".join(d.text for d in deltas if d.kind == "content") == result.content
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == (result.reasoning or "")
    assert [d.tool_call for d in deltas if d.kind == "tool_call"] == result.tool_calls
    assert [d.index for d in deltas if d.kind == "tool_call"] == list(range(len(result.tool_calls)))


def test_reasoning_streams_before_it_ends():
    parser = OutputParser(OutputFormat("hermes"))
    first = parser.feed("<think>\nstep one, ")
    assert [d.kind for d in first] == ["reasoning"] and first[0].text == "\nstep one, "
    held = parser.feed("step two</th")  # "</th" may be the closing tag: held back
    assert [(d.kind, d.text) for d in held] == [("reasoning", "step two")]
    later = parser.feed("ink>\n\nDone")
    assert [(d.kind, d.text) for d in later] == [("content", "Done")]
    assert parser.result().reasoning == "\nstep one, step two"


def test_a_prompt_that_opened_the_think_block():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    parsed = parse_output("thinking...\n</think>\n\nAnswer", OutputFormat(starts_in_reasoning=True))
    assert (parsed.reasoning, parsed.content) == ("thinking...\n", "Answer")


def test_tool_call_ids_and_message_fields():
    call = parse_output('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>',
                        OutputFormat("hermes")).tool_calls[0]
    other = parse_output('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>',
                         OutputFormat("hermes")).tool_calls[0]
    assert call.id != other.id and call.id.startswith("call_")
    assert call.as_message_field() == {"id": call.id, "type": "function",
                                       "function": {"name": "a", "arguments": {"x": 1}}}


@pytest.mark.parametrize("filename, family", [
    ("qwen3-0.6b.jinja", "hermes"), ("qwen2.5-1.5b-instruct.jinja", "hermes"), ("smollm3-3b.jinja", None),
    ("llama-3.1-8b-instruct.jinja", "llama3"), ("llama-3.2-1b-instruct.jinja", "llama3"),
    ("mistral-nemo-instruct-2407.jinja", "mistral"), ("gemma-3-1b-it.jinja", "gemma"),
    ("hermes-3-llama-3.1-8b-tool_use.jinja", "hermes"),
])
def test_tool_family_from_the_template(filename, family):
    assert tool_family_for((TEMPLATE_DIR / filename).read_text()) == family


def test_tool_family_from_a_hand_written_family():
    assert tool_family_for(None, "qwen2.5") == "hermes"
    assert tool_family_for(None, "llama3.2") == "llama3"
    assert tool_family_for(None, "gemma") == "gemma"
    assert tool_family_for(None, "phi3") is None


def test_a_generation_prompt_that_opens_the_think_block():
    """DeepSeek-R1 distills end the generation prompt with <think>: the reply starts inside the reasoning."""
    from rkedge.runtime.chat_template import JinjaChatTemplate

    template = JinjaChatTemplate((TEMPLATE_DIR / "deepseek-r1-distill-qwen-32b.jinja").read_text(),
                                 {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"})
    prompt = template.render([{"role": "user", "content": "2+2?"}])
    assert prompt_opens_reasoning(prompt)
    parsed = parse_output("Two plus two.\n</think>\n\n4", OutputFormat(starts_in_reasoning=True))
    assert (parsed.reasoning, parsed.content) == ("Two plus two.\n", "4")
