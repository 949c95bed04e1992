"""The host side of one decode step: embedding lookup, position features, state, graph chaining.

Everything here is numpy; the graphs themselves run wherever the runner puts them (torch on the host for
verification and calibration, the rknn-toolkit2 simulator, or RKNNLite on the board).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias, cast

import numpy as np

from rkedge.runtime.rknn.prefill import FEATURE_INPUTS, PrefillSet, prefill_with

#: What flows between the graphs: float32 tensors (numpy.typing is not followed by the type checker).
Floats: TypeAlias = "np.ndarray[Any, np.dtype[np.float32]]"

MASK_VALUE = -30.0


def _floats(value: Any) -> Floats:
    """``value`` as float32, no copy when it already is (numpy's own types are not followed: its results are Any)."""
    return cast(Floats, np.asarray(value, dtype=np.float32))


class GraphRunner(Protocol):
    def run(self, index: int, inputs: list[Floats]) -> list[Floats]: ...


@dataclass(frozen=True)
class GraphSpec:
    name: str
    layers: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphSpec:
        return cls(data["name"], tuple(data.get("layers", ())), tuple(data["inputs"]), tuple(data["outputs"]),
                   {k: tuple(v) for k, v in data["shapes"].items()})


def position_features(position: int, *, rotary_dim: int, rope_theta: float, window: int) -> dict[str, Floats]:
    """cos/sin of RoPE, the reset flag and the attention window mask for one position."""
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    freqs = np.float32(position) * inv_freq
    emb = np.concatenate([freqs, freqs]).astype(np.float32)
    slots = np.arange(window)
    mask = np.where(slots >= (window - 1) - position, 0.0, MASK_VALUE).astype(np.float32)
    return {"cos": np.cos(emb).reshape(1, 1, -1).astype(np.float32),
            "sin": np.sin(emb).reshape(1, 1, -1).astype(np.float32),
            "reset": np.full((1, 1, 1), 1.0 if position == 0 else 0.0, dtype=np.float32),
            "mask": mask.reshape(1, 1, window)}


#: The closed-form scan's matrices for a one-token chunk (``rkedge.runtime.rknn.prefill.chunk_features``): what a
#: prefill graph serving as the decode step reads besides the decode step's own features.
ONE_TOKEN_SCAN = {"scan": np.array([[[1.0], [0.0]]], dtype=np.float32),
                  "causal": np.ones((1, 1, 2), dtype=np.float32)}


class DecodeLoop:
    """Feeds tokens through the chunk graphs and the head graphs, keeping every state between steps. The runner
    numbers the graphs chunks first, then heads; the heads' logits are concatenated in order (vocabulary slices).

    With ``prefill`` (a bundle's prefill graphs), :meth:`prefill` runs a prompt's full chunks through them."""

    def __init__(self, chunks: Sequence[GraphSpec], heads: Sequence[GraphSpec], runner: GraphRunner,
                 embedding: Floats, *, rotary_dim: int, rope_theta: float, window: int,
                 prefill: PrefillSet | None = None) -> None:
        self.chunks = list(chunks)
        self.prefill_set = prefill
        self.heads = list(heads)
        self.runner = runner
        self.embedding = embedding
        self.rotary_dim, self.rope_theta, self.window = rotary_dim, rope_theta, window
        self.states: dict[str, Floats] = {}
        self.position = 0
        self.reset()

    def reset(self) -> None:
        self.states = {name: np.zeros(spec.shapes[name], dtype=np.float32)
                       for spec in self.chunks for name in spec.inputs
                       if name not in FEATURE_INPUTS}
        self.position = 0

    def snapshot(self) -> tuple[int, dict[str, Floats]]:
        return self.position, {k: v.copy() for k, v in self.states.items()}

    def restore(self, snapshot: tuple[int, dict[str, Floats]]) -> None:
        self.position, states = snapshot
        self.states = {k: v.copy() for k, v in states.items()}

    def step(self, token: int, *, logits: bool = True) -> Floats | None:
        """One token through every graph; returns the logits [vocab] (or None when ``logits`` is False, e.g. for
        prompt tokens whose predictions nobody reads)."""
        x = self._embed(token)
        features = self._features(self.position)
        for index in range(len(self.chunks)):
            x = self._run_chunk(index, x, features)
        self.position += 1
        if not logits:
            return None
        parts = [self._run_head(j, x) for j in range(len(self.heads))]
        return _floats((parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(np.float32))

    def prefill(self, tokens: Sequence[int], *, logits: bool = True, stop: Callable[[], bool] | None = None
                ) -> Floats | None:
        """``tokens`` from the current position (a prompt, or a chat turn's new tokens after the kept state): full
        chunks through the prefill graphs when the bundle has them, the rest (or everything, without them) through
        the decode step. Returns the last token's logits [vocab] (None when ``logits`` is False, or when ``stop()``,
        asked before each chunk or token, said to stop)."""
        if self.prefill_set is None:
            last: Floats | None = None
            for index, token in enumerate(tokens):
                if stop is not None and stop():
                    return None
                last = self.step(token, logits=logits and index == len(tokens) - 1)
            return last
        return prefill_with(self, self.prefill_set, tokens, logits=logits, stop=stop)

    def teacher_forced_logits(self, tokens: Sequence[int],
                              release: Callable[[int], None] | None = None) -> Floats:
        """The logits after each of ``tokens`` [len, vocab], from a fresh state, computed graph by graph: every
        step through the first graph, then every step through the next. With the tokens given this equals
        stepping token by token (no graph feeds an earlier one), and only one graph need be loaded at a time:
        ``release(index)`` is called when graph ``index`` is done with."""
        self.reset()
        xs = [self._embed(t) for t in tokens]
        features = [self._features(p) for p in range(len(tokens))]
        for index in range(len(self.chunks)):
            xs = [self._run_chunk(index, x, f) for x, f in zip(xs, features, strict=True)]
            if release is not None:
                release(index)
        parts = []
        for j in range(len(self.heads)):
            parts.append(np.stack([self._run_head(j, x) for x in xs]))
            if release is not None:
                release(len(self.chunks) + j)
        self.position = len(tokens)
        return _floats(np.concatenate(parts, axis=1).astype(np.float32))

    def _embed(self, token: int) -> Floats:
        return _floats(self.embedding[token].astype(np.float32).reshape(1, 1, -1))

    def _features(self, position: int) -> dict[str, Floats]:
        features = position_features(position, rotary_dim=self.rotary_dim, rope_theta=self.rope_theta,
                                     window=self.window)
        return {**features, **ONE_TOKEN_SCAN} if self.prefill_set and self.prefill_set.serves_decode else features

    def _run_chunk(self, index: int, x: Floats, features: dict[str, Floats]) -> Floats:
        """Chunk graph ``index`` on hidden vector ``x``; its states are updated in place."""
        spec = self.chunks[index]
        values = {"x": x, **features, **self.states}
        outputs = self.runner.run(index, [values[name] for name in spec.inputs])
        for name, value in zip(spec.outputs[1:], outputs[1:], strict=False):
            state = name[len("new_"):]
            self.states[state] = _floats(value.reshape(spec.shapes[state]).astype(np.float32))
        return _floats(outputs[0].reshape(1, 1, -1).astype(np.float32))

    def _run_head(self, j: int, x: Floats) -> Floats:
        return _floats(self.runner.run(len(self.chunks) + j, [x])[0].reshape(-1))

    @classmethod
    def from_bundle(cls, folder: str | Path, bundle: Mapping[str, Any], runner: GraphRunner, *,
                    prefill: bool = False) -> DecodeLoop:
        """The loop of a bundle (``bundle.json`` read), its graphs run by ``runner`` in :func:`bundle_graphs`
        order. Without ``prefill`` (or without the bundle's ``prefill`` section) the decode graphs run every token."""
        embedding = np.load(Path(folder) / bundle["embedding"]["file"]).astype(np.float32)
        dims = bundle["dims"]
        section = bundle.get("prefill") if prefill else None
        chunks = [GraphSpec.from_dict(g) for g in bundle["graphs"]]
        prefill_set = None
        if section:
            if section.get("serves_decode"):
                # one multi-shape model per layer group serves both: its T = 1 shape is the decode step
                chunks = [GraphSpec(g["name"], tuple(g.get("layers", ())), tuple(g["inputs"]), tuple(g["outputs"]),
                                    spec.shapes) for g, spec in zip(section["graphs"], chunks, strict=True)]
                prefill_set = PrefillSet.from_manifest(section, 0)
            else:
                prefill_set = PrefillSet.from_manifest(section, len(chunks) + len(bundle["heads"]))
        return cls(chunks, [GraphSpec.from_dict(g) for g in bundle["heads"]], runner, embedding,
                   rotary_dim=dims["rotary_dim"], rope_theta=dims["rope_theta"], window=dims["window"],
                   prefill=prefill_set)


def bundle_graphs(bundle: Mapping[str, Any], *, prefill: bool = False) -> list[Any]:
    """The graphs a runner loads for :meth:`DecodeLoop.from_bundle`, in its numbering: decode chunks (or the
    prefill graphs when they serve as the decode step), heads, then prefill graphs held separately."""
    section = bundle.get("prefill") if prefill else None
    if not section:
        return [*bundle["graphs"], *bundle["heads"]]
    if section.get("serves_decode"):
        return [*section["graphs"], *bundle["heads"]]
    return [*bundle["graphs"], *bundle["heads"], *section["graphs"]]
