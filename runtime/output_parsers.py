"""Model output split into content, reasoning and tool calls, incrementally.

Reasoning is the text of ``<think>...</think>`` blocks (Qwen3, DeepSeek-R1 distills, SmolLM3, QwQ); a prompt
that already opened the block (a generation prompt ending in ``<think>``) starts the output in reasoning.

Tool calls, per template family (what each family's template teaches the model to write):

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen2.5, Qwen3, Hermes, SmolLM3).
- ``llama3``: the whole reply is ``{"name": ..., "parameters": {...}}`` (Llama 3.1/3.2/3.3 JSON tool calling),
  optionally after ``<|python_tag|>``; several calls separated by ``;`` are accepted.
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}, ...]`` (v3 tokenizers), or
  ``[TOOL_CALLS]name[ARGS]{...}`` (v11+).
- ``gemma``: Python call syntax, in a ```` ```tool_code ```` block or as ``[f(a=1), g(b="x")]`` (Google's Gemma
  function-calling guide); read with :mod:`ast`, literals only, never evaluated.

Malformed output is never an error: a block that does not parse stays plain content. Tool calls are only looked
for when the request offered tools (``tools_enabled``), so ordinary text that happens to start with ``{`` is
streamed as it comes.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

ToolFamily = Literal["hermes", "llama3", "mistral", "gemma"]
TOOL_FAMILIES: tuple[ToolFamily, ...] = ("hermes", "llama3", "mistral", "gemma")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for; ``arguments`` is JSON text (as OpenAI's API carries it)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def arguments_object(self) -> Any:
        return json.loads(self.arguments)

    def as_message_field(self) -> dict[str, Any]:
        """The entry of an assistant message's ``tool_calls`` (OpenAI shape, arguments as an object so every
        template can render it)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_object()}}


@dataclass(frozen=True)
class OutputDelta:
    """One piece of parsed output: ``content`` or ``reasoning`` text, or one complete ``tool_call``."""

    kind: Literal["content", "reasoning", "tool_call"]
    text: str = ""
    tool_call: ToolCall | None = None
    index: int = 0  # the tool call's position among this reply's calls


@dataclass
class ParsedOutput:
    content: str
    reasoning: str | None
    tool_calls: list[ToolCall]


@dataclass(frozen=True)
class OutputFormat:
    """How to read one reply: which tool syntax (None: no tool calls offered), and whether the prompt opened a
    ``<think>`` block the output continues."""

    tool_family: ToolFamily | None = None
    starts_in_reasoning: bool = False
    parse_reasoning: bool = True


def tool_family_for(template_source: str | None, family: str | None = None) -> ToolFamily | None:
    """The tool-call syntax a chat template teaches (from its text), else from a hand-written family name."""
    if template_source:
        if "<tool_call>" in template_source:
            return "hermes"
        if "[TOOL_CALLS]" in template_source:
            return "mistral"
        if "<|start_header_id|>" in template_source and ("ipython" in template_source or "tools" in template_source):
            return "llama3"
        if "tool_code" in template_source or "<start_of_turn>" in template_source:
            return "gemma"
    if family:
        if family.startswith(("qwen", "chatml", "hermes", "smollm")):
            return "hermes"
        if family.startswith("llama3"):
            return "llama3"
        if family.startswith("mistral"):
            return "mistral"
        if family.startswith("gemma"):
            return "gemma"
    return None


def prompt_opens_reasoning(prompt: str) -> bool:
    """The rendered prompt ends inside an open ``<think>`` block (the model continues its reasoning)."""
    tail = prompt.rstrip()
    return tail.endswith(THINK_OPEN)


class OutputParser:
    """Feed text as it arrives; get :class:`OutputDelta` s. Joining every delta of a kind gives exactly what
    :meth:`result` holds, whichever way the text was chunked."""

    def __init__(self, fmt: OutputFormat | None = None) -> None:
        self.fmt = fmt or OutputFormat()
        self._state: Literal["content", "reasoning", "tool"] = \
            "reasoning" if self.fmt.starts_in_reasoning and self.fmt.parse_reasoning else "content"
        self._pending = ""  # text not yet classified (a marker may be starting)
        self._tool_buffer = ""
        self._tool_end = ""
        self._tool_opening = ""
        self._skip_blank_after_reasoning = False
        self._at_start = True  # nothing but whitespace/reasoning has been content yet (llama3 calls)
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[ToolCall] = []
        self._finished = False

    # -- feeding -----------------------------------------------------------------------------------------------

    def feed(self, text: str) -> list[OutputDelta]:
        out: list[OutputDelta] = []
        self._pending += text
        self._advance(out, final=False)
        return out

    def finish(self) -> list[OutputDelta]:
        out: list[OutputDelta] = []
        if self._finished:
            return out
        self._finished = True
        self._advance(out, final=True)
        if self._state == "tool":
            self._close_tool(out, self._tool_buffer, complete=self._tool_end == "")
            self._advance(out, final=True)
        elif self._pending:
            self._emit(out, self._state, self._pending)
        self._pending = ""
        return out

    def result(self) -> ParsedOutput:
        reasoning = "".join(self._reasoning)
        return ParsedOutput("".join(self._content), reasoning if self._reasoning else None, list(self._calls))

    # -- the state machine -----------------------------------------------------------------------------------

    def _markers(self) -> list[tuple[str, str]]:
        """(marker, what it starts) looked for in content."""
        found: list[tuple[str, str]] = []
        if self.fmt.parse_reasoning:
            found.append((THINK_OPEN, "reasoning"))
        family = self.fmt.tool_family
        if family == "hermes":
            found.append(("<tool_call>", "tool"))
        elif family == "mistral":
            found.append(("[TOOL_CALLS]", "tool"))
        elif family == "gemma":
            found.append(("```tool_code", "tool"))
            found.append(("```tool_call", "tool"))
        elif family == "llama3":
            found.append(("<|python_tag|>", "tool"))
        return found

    def _advance(self, out: list[OutputDelta], final: bool) -> None:
        while self._pending:
            if self._state == "reasoning":
                index = self._pending.find(THINK_CLOSE)
                if index < 0:
                    keep = 0 if final else _partial_suffix(self._pending, [THINK_CLOSE])
                    self._emit(out, "reasoning", self._pending[:len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    return
                self._emit(out, "reasoning", self._pending[:index])
                self._pending = self._pending[index + len(THINK_CLOSE):]
                self._state = "content"
                self._skip_blank_after_reasoning = True
                continue
            if self._state == "tool":
                if self._tool_end:
                    # Searched in the whole block: the closing marker may have arrived split over chunks.
                    self._tool_buffer += self._pending
                    self._pending = ""
                    index = self._tool_buffer.find(self._tool_end)
                    if index < 0:
                        return
                    body, self._pending = self._tool_buffer[:index], self._tool_buffer[index + len(self._tool_end):]
                    self._close_tool(out, body, complete=True)
                    continue
                self._tool_buffer += self._pending  # runs to the end of the output
                self._pending = ""
                return
            # content
            whole_reply = {"llama3": ("{", "["), "gemma": ("[",)}.get(self.fmt.tool_family or "")
            if self._at_start and whole_reply:
                # These families' calls are the whole reply: held until the end, then parsed or given as content.
                stripped = self._pending.lstrip()
                if not stripped:
                    if final:
                        break
                    return
                if stripped.startswith(whole_reply):
                    self._open_tool("", "", self._pending)
                    self._pending = ""
                    continue
            markers = self._markers()
            hit = _first_marker(self._pending, markers)
            if hit is None:
                keep = 0 if final else _partial_suffix(self._pending, [m for m, _ in markers])
                self._emit(out, "content", self._pending[:len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
                return
            index, marker, target = hit
            self._emit(out, "content", self._pending[:index])
            rest = self._pending[index + len(marker):]
            if target == "reasoning":
                self._state = "reasoning"
                self._pending = rest
                continue
            end = {"<tool_call>": "</tool_call>", "```tool_code": "```", "```tool_call": "```"}.get(marker, "")
            self._open_tool(marker, end, "")
            self._pending = rest

    def _open_tool(self, opening: str, end: str, initial: str) -> None:
        self._state = "tool"
        self._tool_opening = opening
        self._tool_end = end
        self._tool_buffer = initial

    def _close_tool(self, out: list[OutputDelta], body: str, *, complete: bool) -> None:
        # An unterminated block (the run ended before the closing marker) is still tried: it may be whole JSON.
        calls = _parse_calls(self.fmt.tool_family, body)
        if calls:
            for call in calls:
                self._calls.append(call)
                out.append(OutputDelta("tool_call", tool_call=call, index=len(self._calls) - 1))
            self._at_start = False
        else:  # malformed: the model's text, unchanged, as content
            self._emit(out, "content", self._tool_opening + body + (self._tool_end if complete else ""))
        self._state = "content"
        self._tool_buffer = ""
        self._tool_end = ""

    def _emit(self, out: list[OutputDelta], kind: str, text: str) -> None:
        if not text:
            return
        if kind == "reasoning":
            self._reasoning.append(text)
            out.append(OutputDelta("reasoning", text))
            return
        if self._skip_blank_after_reasoning:
            # "</think>\n\n" separates reasoning from the answer; the blank lines belong to neither.
            stripped = text.lstrip("\n")
            if not stripped:
                return
            text = stripped
            self._skip_blank_after_reasoning = False
        if text.strip():
            self._at_start = False
        self._content.append(text)
        out.append(OutputDelta("content", text))


def parse_output(text: str, fmt: OutputFormat | None = None) -> ParsedOutput:
    """The whole reply at once (what a non-streaming response carries)."""
    parser = OutputParser(fmt)
    parser.feed(text)
    parser.finish()
    return parser.result()


def iter_deltas(chunks: Iterator[str], fmt: OutputFormat | None = None) -> Iterator[OutputDelta]:
    parser = OutputParser(fmt)
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.finish()


# -- per-family tool-call syntax ---------------------------------------------------------------------------------

def _parse_calls(family: ToolFamily | None, body: str) -> list[ToolCall] | None:
    try:
        if family == "hermes":
            return _calls_from_json(json.loads(body.strip()), "arguments")
        if family == "llama3":
            return _llama3_calls(body)
        if family == "mistral":
            return _mistral_calls(body)
        if family == "gemma":
            return _python_calls(body)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None
    return None


def _calls_from_json(value: Any, arguments_key: str) -> list[ToolCall] | None:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, Mapping):
            return None
        nested = item.get("function")
        function: Mapping[str, Any] = nested if isinstance(nested, Mapping) else item
        name = function.get("name")
        arguments = function.get(arguments_key, function.get("arguments", function.get("parameters", {})))
        if not isinstance(name, str) or not name:
            return None
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        if not isinstance(arguments, Mapping):
            return None
        call_id = item.get("id")
        text = json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(name, text, call_id) if isinstance(call_id, str) and call_id else ToolCall(name, text))
    return calls or None


def _llama3_calls(body: str) -> list[ToolCall] | None:
    text = body.strip()
    if text.startswith("<|python_tag|>"):
        text = text[len("<|python_tag|>"):].strip()
    for end in ("<|eom_id|>", "<|eot_id|>"):
        text = text.removesuffix(end).strip()
    try:
        return _calls_from_json(json.loads(text), "parameters")
    except ValueError:
        parts = [p.strip() for p in text.split(";") if p.strip()]
        if len(parts) < 2:
            raise
        calls: list[ToolCall] = []
        for part in parts:
            found = _calls_from_json(json.loads(part), "parameters")
            if not found:
                return None
            calls += found
        return calls


_MISTRAL_V11 = re.compile(r"\s*([A-Za-z_][\w.-]*)\[ARGS\]")


def _mistral_calls(body: str) -> list[ToolCall] | None:
    text = body.strip().removesuffix("</s>").strip()
    if text.startswith("["):
        return _calls_from_json(json.loads(text), "arguments")
    calls: list[ToolCall] = []
    decoder = json.JSONDecoder()
    for chunk in text.split("[TOOL_CALLS]"):
        chunk = chunk.strip()
        if not chunk:
            continue
        match = _MISTRAL_V11.match(chunk)
        if not match:
            return None
        arguments, end = decoder.raw_decode(chunk, match.end())
        if chunk[end:].strip() or not isinstance(arguments, Mapping):
            return None
        calls.append(ToolCall(match.group(1), json.dumps(arguments, ensure_ascii=False)))
    return calls or None


def _python_calls(body: str) -> list[ToolCall] | None:
    text = body.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    tree = ast.parse(f"[{text}]", mode="eval")
    assert isinstance(tree.body, ast.List)
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted_name(node.func)
        if name is None:
            return None
        arguments = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                return None
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        calls.append(ToolCall(name, json.dumps(arguments, ensure_ascii=False)))
    return calls or None


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


# -- marker search -----------------------------------------------------------------------------------------------

def _first_marker(text: str, markers: list[tuple[str, str]]) -> tuple[int, str, str] | None:
    best: tuple[int, str, str] | None = None
    for marker, target in markers:
        index = text.find(marker)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, marker, target)
    return best


def _partial_suffix(text: str, markers: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a marker (held back until known)."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-size:]):
                longest = max(longest, size)
                break
    return longest


__all__ = ["ToolCall", "OutputDelta", "ParsedOutput", "OutputFormat", "OutputParser", "ToolFamily", "TOOL_FAMILIES",
           "parse_output", "iter_deltas", "tool_family_for", "prompt_opens_reasoning"]
