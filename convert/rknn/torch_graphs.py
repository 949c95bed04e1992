# mypy: allow-untyped-decorators
# (torch.no_grad is untyped under the project's mypy config, which types torch as Any)
"""Running the decode-step graphs in torch (the reference for verification, calibration and quality)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rkedge.convert.rknn.decode_step import (
    ChunkStep,
    HeadStep,
    embedding_table,
    layer_param_counts,
    plan_chunks,
    plan_head_rows,
)
from rkedge.convert.rknn.shape import GriffinShape
from rkedge.runtime.rknn.loop import DecodeLoop, Floats, GraphSpec


class TorchGraphs:
    """A GraphRunner over torch modules (float32)."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.modules = modules

    @torch.no_grad()
    def run(self, index: int, inputs: list[Floats]) -> list[Floats]:
        out = self.modules[index](*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
        outputs = out if isinstance(out, tuple) else (out,)
        return [t.numpy() for t in outputs]


def graph_spec(module: Any, name: str) -> GraphSpec:
    layers = tuple(getattr(module, "layer_ids", ()))
    return GraphSpec(name, layers, tuple(module.input_names()), tuple(module.output_names()),
                     {k: tuple(v) for k, v in module.input_shapes().items()})


def build_torch_graphs(model: Any, *, max_chunk_params: int | None = None
                       ) -> tuple[GriffinShape, list[ChunkStep], list[HeadStep]]:
    """The layer-chunk graphs and the head graphs, each within ``max_chunk_params`` (default: one of each)."""
    dims = GriffinShape.from_transformers(model.config)
    counts = layer_param_counts(model)
    chunks = plan_chunks(dims, counts, max_params=max_chunk_params or sum(counts))
    steps = [ChunkStep(model, dims, layers).eval() for layers in chunks]
    rows = plan_head_rows(dims, max_params=max_chunk_params or dims.vocab * dims.hidden)
    return dims, steps, [HeadStep(model, dims, r).eval() for r in rows]


def graph_names(chunks: list[ChunkStep], heads: list[HeadStep]) -> list[str]:
    return [f"chunk{i}" for i in range(len(chunks))] + (["head"] if len(heads) == 1 else
                                                          [f"head{i}" for i in range(len(heads))])


def torch_loop(model: Any, *, max_chunk_params: int | None = None) -> DecodeLoop:
    return loop_over(model, *build_torch_graphs(model, max_chunk_params=max_chunk_params))


def loop_over(model: Any, dims: GriffinShape, chunks: list[ChunkStep], heads: list[HeadStep]) -> DecodeLoop:
    """The decode loop over graphs already built (torch, float32)."""
    specs = [graph_spec(m, n) for m, n in zip([*chunks, *heads], graph_names(chunks, heads), strict=True)]
    return DecodeLoop(specs[:len(chunks)], specs[len(chunks):], TorchGraphs([*chunks, *heads]),
                      embedding_table(model, dims).numpy(), rotary_dim=dims.rotary_dim, rope_theta=dims.rope_theta,
                      window=dims.window)


@torch.no_grad()
def verify_against_transformers(model: Any, tokens: list[int], loop: DecodeLoop | None = None) -> dict[str, float]:
    """Max |logit difference| between transformers' forward pass and the decode step fed token by token."""
    loop = loop or torch_loop(model)
    loop.reset()
    reference = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float().numpy()
    ours = np.stack([loop.step(t) for t in tokens])
    diff = np.abs(reference - ours)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "argmax_agreement": float((reference.argmax(-1) == ours.argmax(-1)).mean()), "tokens": len(tokens)}
