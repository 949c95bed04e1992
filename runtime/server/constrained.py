"""Structured output constrained token by token: the runtime's logits mode gives the next token's logits, a
grammar engine (llguidance) masks them on the host, rkedge samples, and the chosen token goes back to the
runtime as a token input with ``keep_history`` on, so the KV cache holds the prompt and the answer so far and
each step prefills one token.

Why llguidance: correct on the whole JSON Schema draft the OpenAI and Ollama APIs use (an Earley parser over
the token trie: no regex-DFA approximation, nothing precompiled per vocabulary, so a schema is ready in
milliseconds); fast (a 32k-vocabulary mask in tens of microseconds); abi3 wheels for x86_64 and aarch64 with
no Python dependencies (xgrammar needs torch; outlines-core precompiles an index per schema and vocabulary,
seconds for large schemas). It is imported only here, only when a request asks for a format.

The host needs each token's bytes: the model's ``tokenizer.json`` (beside the model, or the manifest's
``tokenizer_json``). The simulated NPU's token ids carry no text (its tokenizer hashes text pieces), so a
simulated model gets a byte-level stand-in vocabulary (:func:`simulated_vocabulary`): what the loop does with
it, the runtime calls, their order and the KV bookkeeping, is what it does with a real one.

To end inside ``max_tokens`` the sampler turns to closing the structure in the last :data:`CLOSING_RESERVE`
tokens (quotes, brackets, the shortest literal), so an answer that reaches the limit is still valid where
the grammar allows closing that fast; if it does not, the answer ends with ``finish_reason: length``.

UNKNOWN for librkllmrt: whether a GET_LOGITS run with ``keep_history`` keeps its input in the KV cache, as a
GENERATE run does (the simulated NPU does). If it does not, each step would have to resend the whole prefix.
"""

from __future__ import annotations

import math
import random
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkedge.errors import GenerationError, InputError
from rkedge.runtime._stream import GenerationResult, GenerationStats
from rkedge.runtime.output_parsers import OutputDelta, OutputFormat, OutputParser, parse_output

if TYPE_CHECKING:
    from rkedge.runtime.llm import LLM

#: Tokens kept at the end of the budget to close the structure.
CLOSING_RESERVE = 48
#: Bytes tried, in order, when closing: end a string, an object, an array, move to the next item or value;
#: then the shortest number, literal, array and object.
CLOSERS = b'"}],:0n[{'


def grammar_for_format(response_format: dict[str, Any] | None = None, ollama_format: Any = None) -> str | None:
    """The llguidance grammar for an OpenAI ``response_format`` or an Ollama ``format`` (None: plain text).

    Raises:
        InputError: an unknown format type or a schema llguidance refuses.
    """
    schema: Any
    if response_format is not None:
        kind = response_format.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InputError("response_format json_schema needs json_schema.schema (a JSON Schema object).")
        else:
            raise InputError(f"response_format {kind!r} is not supported (text, json_object or json_schema).")
    elif ollama_format is not None and ollama_format != "":
        if ollama_format == "json":
            schema = {"type": "object"}
        elif isinstance(ollama_format, dict):
            schema = ollama_format
        else:
            raise InputError(f"format {ollama_format!r} is not supported: send \"json\" or a JSON Schema object.")
    else:
        return None
    try:
        from llguidance import LLMatcher
    except ImportError:
        raise InputError("structured output needs llguidance on this machine.",
                         fix="pip install 'rkedge[serve]' (or pip install llguidance)") from None
    # Compact JSON: no free whitespace between tokens (fewer tokens, and nothing for a small model to ramble in).
    compiled = LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
    message = LLMatcher.validate_grammar(compiled, None)
    if message:
        raise InputError(f"the JSON schema cannot be used for constrained output: {message}")
    return str(compiled)


def tool_call_grammar(tools: list[dict[str, Any]]) -> str:
    """A grammar for one Hermes/Qwen tool call (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``) to
    one of ``tools``, its arguments held to that tool's parameter schema: what ``tool_choice`` "required" or
    a named function asks for, so a small model cannot get the call's syntax or arguments wrong."""
    import json

    from llguidance import LLMatcher

    options = []
    for tool in tools:
        function = tool.get("function") or {}
        parameters = function.get("parameters") or {"type": "object"}
        options.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                        "properties": {"name": {"const": function.get("name")}, "arguments": parameters}})
    schema = {**(options[0] if len(options) == 1 else {"anyOf": options}),
              "x-guidance": {"whitespace_flexible": False}}
    lark = f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {json.dumps(schema)}\n'
    compiled = LLMatcher.grammar_from_lark(lark)
    message = LLMatcher.validate_grammar(compiled, None)
    if message:
        raise InputError(f"the tools' parameter schemas cannot be used for a constrained call: {message}")
    return str(compiled)


class SimulatedVocabulary:
    """A byte-level vocabulary for a simulated model (llguidance's TokenizerWrapper shape): ids 0-2 are
    ``<unk>``, BOS and EOS as the simulated manifest numbers them, 3-258 the 256 bytes, then JSON pieces and
    filler words up to the manifest's vocab_size."""

    PIECES = (b'{"', b'"}', b'":', b'","', b'":"', b'",', b'true', b'false', b'null', b'[', b']', b'{', b'}',
              b'name', b'value', b'id', b'type', b'the', b'and', b'00', b'10', b'.5')

    def __init__(self, vocab_size: int, bos: int | None, eos: int | None) -> None:
        tokens = [b"<unk>", b"<s>", b"</s>"] + [bytes([i]) for i in range(256)] + list(self.PIECES)
        filler = 0
        while len(tokens) < vocab_size:
            tokens.append(f" w{filler}".encode())
            filler += 1
        self.tokens = tokens[:max(vocab_size, 259)]
        self.bos_token_id = bos if bos is not None else 1
        self.eos_token_id = eos if eos is not None else 2
        self.special_token_ids = [0, 1, 2]

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return [3 + b for b in data]


def simulated_vocabulary(metadata: dict[str, Any]) -> SimulatedVocabulary:
    return SimulatedVocabulary(int(metadata.get("vocab_size") or 32000), metadata.get("bos_token_id"),
                               metadata.get("eos_token_id"))


def host_tokenizer(llm: LLM) -> Any:
    """llguidance's tokenizer for ``llm``: its tokenizer.json, or the simulated stand-in."""
    from llguidance import LLTokenizer, TokenizerWrapper

    meta = llm.metadata
    if meta.get("simulated"):
        return LLTokenizer(TokenizerWrapper(simulated_vocabulary(dict(meta))), slices=LLTokenizer.json_slices())
    candidates = [Path(str(meta["tokenizer_json"])) if meta.get("tokenizer_json") else None,
                  llm.model_path.with_name(llm.model_path.name + ".tokenizer.json"),
                  llm.model_path.with_name("tokenizer.json")]
    for path in candidates:
        if path is not None and path.is_file():
            return LLTokenizer(path.read_text(encoding="utf-8"), slices=LLTokenizer.json_slices())
    raise InputError("structured output needs the model's tokenizer on the host (the runtime's stays inside it).",
                     fix=f"copy the checkpoint's tokenizer.json to {candidates[1]}")


def check_abi(llm: LLM) -> None:
    if not (llm.features.has_logits_mode and llm.features.has_keep_history):
        raise InputError(f"constrained output needs the runtime's logits mode and keep_history (ABI 1.2.0 or "
                         f"newer; this library is {llm.abi}).",
                         fix="drop response_format/format, or use runtime 1.2.0 or newer")


class Sampler:
    """Picks a token among the allowed ones: greedy at temperature 0, else temperature, top-k and top-p.
    Uses numpy where it is installed (a 152k-token vocabulary costs ~1 ms instead of ~9), else plain Python."""

    def __init__(self, temperature: float | None, top_k: int | None, top_p: float | None,
                 seed: int | None = None) -> None:
        self.temperature = 0.8 if temperature is None else temperature
        self.top_k = top_k or 0
        self.top_p = 1.0 if top_p is None else top_p
        self.random = random.Random(seed)
        try:
            import numpy
        except ImportError:  # the board's serve extra may not have it: the plain path below is exact too
            numpy = None  # type: ignore[assignment]  # the optional fast path
        self._np: Any = numpy

    def pick(self, logits: Any, bitmask: bytes, vocab: int) -> int:
        if self._np is not None:
            return self._pick_numpy(logits, bitmask, vocab)
        allowed = allowed_tokens(bitmask, vocab)
        if not allowed:
            raise GenerationError("the grammar allows no token.")
        if len(allowed) == 1 or self.temperature <= 0:
            return int(max(allowed, key=logits.__getitem__))
        scored = sorted(allowed, key=logits.__getitem__, reverse=True)
        if self.top_k:
            scored = scored[:self.top_k]
        top = logits[scored[0]]
        weights = [math.exp((logits[t] - top) / self.temperature) for t in scored]
        if self.top_p < 1.0:
            total, kept, running = sum(weights), 0, 0.0
            for kept, weight in enumerate(weights, 1):  # noqa: B007  kept is read after the loop
                running += weight
                if running >= self.top_p * total:
                    break
            scored, weights = scored[:kept], weights[:kept]
        return int(self.random.choices(scored, weights)[0])

    def _pick_numpy(self, logits: Any, bitmask: bytes, vocab: int) -> int:
        np = self._np
        bits = np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little")[:vocab].astype(bool)
        values = np.frombuffer(logits, dtype=np.float32, count=vocab)
        ids = np.flatnonzero(bits)
        if ids.size == 0:
            raise GenerationError("the grammar allows no token.")
        scores = values[ids].astype(np.float64)
        if ids.size == 1 or self.temperature <= 0:
            return int(ids[int(scores.argmax())])
        if self.top_k and ids.size > self.top_k:
            keep = np.argpartition(-scores, self.top_k - 1)[:self.top_k]
            ids, scores = ids[keep], scores[keep]
        weights = np.exp((scores - scores.max()) / self.temperature)
        if self.top_p < 1.0:
            order = np.argsort(-weights)
            cumulative = np.cumsum(weights[order])
            cut = int(np.searchsorted(cumulative, self.top_p * cumulative[-1])) + 1
            ids, weights = ids[order[:cut]], weights[order[:cut]]
        cumulative = np.cumsum(weights)
        index = int(np.searchsorted(cumulative, self.random.random() * cumulative[-1], side="right"))
        return int(ids[min(index, ids.size - 1)])


def allowed_tokens(bitmask: bytes, vocab_size: int) -> list[int]:
    """The ids whose bit is set in llguidance's mask (32-bit little-endian words)."""
    words = array("I")
    words.frombytes(bitmask)
    out: list[int] = []
    for index, word in enumerate(words):
        if not word:
            continue
        base = index * 32
        while word:
            low = word & -word
            token = base + low.bit_length() - 1
            if token < vocab_size:
                out.append(token)
            word ^= low
    return out


def mask_allows(bitmask: bytes, token: int) -> bool:
    word = int.from_bytes(bitmask[(token >> 5) * 4:(token >> 5) * 4 + 4], "little")
    return bool(word >> (token & 31) & 1)


class ConstrainedStream:
    """One constrained generation, shaped like a GenerationStream for the server's runs: :meth:`deltas`
    yields content as tokens are chosen, :attr:`result` holds the outcome."""

    def __init__(self, llm: LLM, prompt: str, grammar: str, tokenizer: Any, *, max_tokens: int,
                 sampler: Sampler, output: OutputFormat | None = None) -> None:
        from llguidance import LLMatcher

        self.output = output  # how to read the answer (a constrained tool call: the template's tool syntax)
        self.llm = llm
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.matcher = LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise InputError(f"the grammar is not usable: {self.matcher.get_error()}")
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.result: GenerationResult | None = None
        self._aborted = threading.Event()
        self._closers = [ids[0] for ids in (tokenizer.tokenize_bytes(bytes([c])) for c in CLOSERS) if len(ids) == 1]
        #: Seconds spent masking and sampling on the host (the grammar's cost), and in the runtime.
        self.host_s = 0.0
        self.runtime_s = 0.0

    def abort(self) -> None:
        self._aborted.set()

    def close(self) -> None:
        self._aborted.set()

    def _logits(self, **kwargs: Any) -> tuple[Any, GenerationResult]:
        started = time.perf_counter()
        result = self.llm.generate(mode="logits", keep_history=True, stream=False, **kwargs)
        self.runtime_s += time.perf_counter() - started
        if result.finish_reason == "error" or not result.width or not result.num_tokens or result.values is None:
            raise GenerationError(f"the runtime gave no logits: {result.error or result.finish_reason}.")
        width = result.width
        row = result.num_tokens - 1
        return memoryview(result.values)[row * width:(row + 1) * width], result

    def deltas(self) -> Iterator[OutputDelta]:
        started = time.monotonic()
        chosen: list[int] = []
        reason = "length"
        first: float | None = None
        prompt_tokens: int | None = None
        emitted = b""
        parser = OutputParser(self.output) if self.output is not None else None
        try:
            logits, prefill = self._logits(prompt=self.prompt)
            prompt_tokens = prefill.stats.prompt_tokens
            vocab = self.tokenizer.vocab_size
            while len(chosen) < self.max_tokens:
                if self._aborted.is_set():
                    reason = "abort"
                    break
                tick = time.perf_counter()
                bitmask = self.matcher.compute_bitmask()
                width = min(vocab, len(logits))
                closing = self.max_tokens - len(chosen) <= CLOSING_RESERVE
                token = self._close(bitmask, width, logits) if closing else \
                    self.sampler.pick(logits, bitmask, width)
                if not self.matcher.consume_token(token):
                    raise GenerationError(f"the grammar refused its own token: {self.matcher.get_error()}")
                chosen.append(token)
                self.host_s += time.perf_counter() - tick
                if first is None:
                    first = time.monotonic()
                text = self.tokenizer.decode_bytes([t for t in chosen if not self.tokenizer.is_special_token(t)])
                piece, emitted = _utf8_prefix(text)[len(emitted):], _utf8_prefix(text)
                if piece:
                    text_piece = piece.decode("utf-8")
                    if parser is None:
                        yield OutputDelta("content", text_piece)
                    else:
                        yield from parser.feed(text_piece)
                if self.matcher.is_stopped():
                    reason = "stop"
                    break
                logits, _ = self._logits(token_ids=[token])
            if parser is not None:
                yield from parser.finish()
        finally:
            # The cache holds this answer, which no chat session owns: empty it for whoever comes next.
            self.llm.clear_kv_cache()
        content = emitted.decode("utf-8", "replace")
        elapsed = (time.monotonic() - (first or started)) * 1000
        generated = len(chosen)
        stats = GenerationStats(prompt_tokens, generated, (first - started) * 1000 if first else None, None,
                                elapsed, generated / (elapsed / 1000) if elapsed > 0 else None, None, "measured")
        self.result = GenerationResult(content, reason, stats, content=content)
        if self.output is not None:
            parsed = parse_output(content, self.output)
            self.result.content, self.result.tool_calls = parsed.content, parsed.tool_calls
            if parsed.tool_calls and reason == "stop":
                self.result.finish_reason = "tool_calls"

    def _close(self, bitmask: bytes, width: int, logits: Any) -> int:
        """The token that ends the structure soonest: a closer (quote, bracket, shortest literal) when the
        grammar allows one, the EOS once it is complete, else the likeliest allowed token."""
        eos = int(self.tokenizer.eos_token)
        if self.matcher.is_accepting() and mask_allows(bitmask, eos):
            return eos
        for token in self._closers:
            if mask_allows(bitmask, token):
                return int(token)
        allowed = allowed_tokens(bitmask, width)
        if not allowed:
            raise GenerationError(f"the grammar allows no token: {self.matcher.get_error()}")
        return int(max(allowed, key=logits.__getitem__))


def _utf8_prefix(data: bytes) -> bytes:
    """The longest prefix of ``data`` that is whole UTF-8 characters (a token may end mid-character)."""
    for cut in range(len(data), max(len(data) - 4, 0) - 1, -1):
        try:
            data[:cut].decode("utf-8")
            return data[:cut]
        except UnicodeDecodeError:
            continue
    return b""


def schema_of(response_format: dict[str, Any] | None, ollama_format: Any = None) -> Any:
    """The JSON Schema a format asks for (tests and clients validating the answer)."""
    if response_format is not None and response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema")
    if isinstance(ollama_format, dict):
        return ollama_format
    return {"type": "object"}


__all__ = ["ConstrainedStream", "Sampler", "grammar_for_format", "host_tokenizer", "schema_of", "tool_call_grammar"]
