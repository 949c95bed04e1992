"""Chunked prefill at inference: a prompt through the prefill graphs T tokens at a time, states carried.

The board half of chunked prefill (the torch graph and its export are ``rkedge.convert.rknn.prefill``): the chunk
plan of a prompt, the host-computed features of a chunk (RoPE, the attention mask over the window's cached slots
plus the chunk, the 0/1 matrices of the closed-form RG-LRU scan), and running a chunk through the layer groups'
prefill graphs with the decode loop's states. The LM head is the decode step's, run on the chunk's last row.

The bundle manifest's ``prefill`` section (written by ``rkedge convert --backend rknn``; a bundle without it runs
the prompt token by token) names the graphs, the chunk lengths each was built for and how the weights are held:
``shared`` (fp16: one multi-shape model per layer group, ``dynamic_input`` with T and 1, that also serves as the
decode step, so the decode graphs are not loaded) or ``separate`` (w8a8: fixed-T graphs next to the decode
graphs, one more copy of the layer weights; rknn-toolkit2's hybrid quantization keeps one input shape).

numpy is imported inside the functions (``rkedge plan`` and the import guard load this module without it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rkedge.runtime.rknn.loop import DecodeLoop, Floats, GraphRunner

MASK_VALUE = -30.0  # as the decode step's (exp(-30) ~ 1e-13, representable in fp16)
#: Inputs that are not states: what the host computes per chunk (:func:`chunk_features`).
FEATURE_INPUTS = ("x", "cos", "sin", "mask", "reset", "scan", "causal")


def chunk_features(start: int, length: int, *, rotary_dim: int, rope_theta: float, window: int
                   ) -> dict[str, Floats]:
    """cos/sin, reset, the attention mask over [W-1 cached slots | ``length`` new] and the scan matrices for the
    chunk of positions [start, start + length). Slot j holds position ``start - (W-1) + j``; query t (position
    start + t) sees it when that position is >= 0, <= start + t and > start + t - W (transformers' sliding window:
    kv_idx > q_idx - W). For length 1 this equals the decode step's features."""
    import numpy as np

    inv_freq = 1.0 / (rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    positions = np.arange(start, start + length, dtype=np.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    slot_pos = start - (window - 1) + np.arange(window - 1 + length)
    query_pos = np.arange(start, start + length)[:, None]
    visible = (slot_pos[None, :] >= 0) & (slot_pos[None, :] <= query_pos) & (slot_pos[None, :] > query_pos - window)
    t = np.arange(length)
    s = np.arange(length + 1)  # s' = s + 1: column 0 is the incoming state h_in
    r = np.arange(length)
    # scan[(t, s'), r] = 1 when s' <= r <= t: the log a_r that decay b_{s'-1} by the time of token t
    scan = ((s[None, :, None] <= r[None, None, :]) & (r[None, None, :] <= t[:, None, None]))
    causal = s[None, :] <= t[:, None] + 1
    reset = (positions == 0).astype(np.float32)
    return {"cos": np.cos(emb).reshape(1, length, rotary_dim).astype(np.float32),
            "sin": np.sin(emb).reshape(1, length, rotary_dim).astype(np.float32),
            "mask": np.where(visible, 0.0, MASK_VALUE).reshape(1, length, -1).astype(np.float32),
            "reset": reset.reshape(1, length, 1),
            "scan": scan.reshape(1, length * (length + 1), length).astype(np.float32),
            "causal": causal.reshape(1, length, length + 1).astype(np.float32)}


def plan_prompt(tokens: int, chunks: Sequence[int]) -> list[int]:
    """The chunk lengths a prompt of ``tokens`` runs as, longest first (greedy); what no chunk length fits goes
    one token at a time (length 1), e.g. 100 tokens over (32,) -> [32, 32, 32, 1, 1, 1, 1]."""
    plan: list[int] = []
    left = tokens
    for length in sorted({c for c in chunks if c > 1}, reverse=True):
        count, left = divmod(left, length)
        plan += [length] * count
    return plan + [1] * left


@dataclass(frozen=True)
class PrefillGraph:
    """One layer group's prefill graph, as a loop runs it: its layers, input and output names."""

    layers: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrefillGraph:
        return cls(tuple(data.get("layers", ())), tuple(data["inputs"]), tuple(data["outputs"]))


@dataclass(frozen=True)
class PrefillSet:
    """A bundle's prefill graphs as the decode loop runs them: ``first_index`` is the runner's number of the first
    (the runner numbers decode chunks, heads, then separate prefill graphs); ``lengths`` the chunk lengths they
    were built for (1 among them when they also serve as the decode step: ``serves_decode``)."""

    graphs: tuple[PrefillGraph, ...]
    lengths: tuple[int, ...]
    first_index: int
    serves_decode: bool

    @property
    def chunk(self) -> int:
        return max(self.lengths)

    @classmethod
    def from_manifest(cls, section: Mapping[str, Any], first_index: int) -> PrefillSet:
        lengths = tuple(int(n) for n in section.get("lengths") or [section["chunk"]])
        return cls(tuple(PrefillGraph.from_dict(g) for g in section["graphs"]), lengths, first_index,
                   bool(section.get("serves_decode", False)))


class _Offset:
    """A runner seen from ``first``: index 0 is the inner runner's graph ``first``."""

    def __init__(self, inner: GraphRunner, first: int) -> None:
        self.inner, self.first = inner, first

    def run(self, index: int, inputs: list[Floats]) -> list[Floats]:
        return self.inner.run(self.first + index, inputs)


def prefill_with(loop: DecodeLoop, prefill: PrefillSet, tokens: Sequence[int], *, logits: bool = True,
                 stop: Callable[[], bool] | None = None) -> Floats | None:
    """``tokens`` through ``loop`` from its current position: full chunks through the prefill graphs, the rest
    through the decode step. Returns the last token's logits [vocab] (None when ``logits`` is False, or when
    ``stop()`` said to stop before the last chunk)."""
    runner = _Offset(loop.runner, prefill.first_index)
    return run_prefill(loop, prefill.graphs, runner, tokens, prefill.lengths, logits=logits, stop=stop)


def run_prefill(loop: DecodeLoop, graphs: Sequence[PrefillGraph], runner: GraphRunner, tokens: Sequence[int],
                chunks: Sequence[int], *, all_logits: bool = False, logits: bool = True,
                stop: Callable[[], bool] | None = None) -> Floats | None:
    """Feeds ``tokens`` from the loop's current position: chunks through the prefill graphs (run by ``runner``,
    numbered like ``graphs``), the rest through the loop's decode step, states shared with the loop; when
    ``chunks`` holds 1, the rest goes through the prefill graph at T = 1 instead (one multi-shape model serving as
    the decode step too). Returns the last token's logits [vocab] (the head graphs of the loop; None when
    ``logits`` is False), or with ``all_logits`` every token's [len, vocab] (for verification: the head runs once
    per token). ``stop`` is asked before each chunk or token (an aborted run): when it says so, None."""
    import numpy as np

    if not tokens:
        from rkedge.errors import InputError

        raise InputError("an empty prompt has nothing to prefill.", fix="pass at least one token")
    rows: list[Floats] = []
    done = 0
    for length in plan_prompt(len(tokens), chunks):
        if stop is not None and stop():
            return None
        part = tokens[done:done + length]
        done += length
        wanted_last = logits and done == len(tokens)
        if length == 1 and 1 not in chunks:
            row = loop.step(part[0], logits=all_logits or wanted_last)
            if row is not None:
                rows.append(row.reshape(1, -1))
            continue
        x = run_chunk(loop, graphs, runner, part)
        wanted = range(length) if all_logits else ([length - 1] if wanted_last else [])
        for t in wanted:
            rows.append(head_logits(loop, x[:, t:t + 1, :]).reshape(1, -1))
    if all_logits:
        every: Floats = np.concatenate(rows).astype(np.float32)
        return every
    return rows[-1].reshape(-1) if rows else None


def run_chunk(loop: DecodeLoop, graphs: Sequence[PrefillGraph], runner: GraphRunner, part: Sequence[int]
              ) -> Floats:
    """One chunk of tokens through every layer group's prefill graph; the loop's states and position advance.
    Returns the last group's hidden rows [1, len, hidden]."""
    import numpy as np

    length = len(part)
    x: Floats = loop.embedding[list(part)].astype(np.float32).reshape(1, length, -1)
    features = chunk_features(loop.position, length, rotary_dim=loop.rotary_dim, rope_theta=loop.rope_theta,
                              window=loop.window)
    for index, graph in enumerate(graphs):
        values = {"x": x, **features, **loop.states}
        outputs = runner.run(index, [values[name] for name in graph.inputs])
        x = outputs[0].reshape(1, length, -1).astype(np.float32)
        for name, value in zip(graph.outputs[1:], outputs[1:], strict=True):
            state = name[len("new_"):]
            loop.states[state] = value.reshape(loop.states[state].shape).astype(np.float32)
    loop.position += length
    return x


def head_logits(loop: DecodeLoop, x: Floats) -> Floats:
    """The decode step's head graphs on one hidden row (vocabulary slices concatenated)."""
    import numpy as np

    first = len(loop.chunks)
    parts = [loop.runner.run(first + j, [np.ascontiguousarray(x)])[0].reshape(-1) for j in range(len(loop.heads))]
    joined: Floats = np.concatenate(parts).astype(np.float32)
    return joined


__all__ = ["FEATURE_INPUTS", "MASK_VALUE", "PrefillGraph", "PrefillSet", "chunk_features", "head_logits",
           "plan_prompt", "prefill_with", "run_chunk", "run_prefill"]
