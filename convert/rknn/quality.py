"""Quality of the built graphs against transformers, teacher-forced on held-out text, in the simulator.

Both sides read the same tokens (teacher forcing) and keep their own states, so state drift shows. Reported: the
NLL of the next token (nats/token) on both sides and its relative delta, top-1 agreement, KL(torch || graphs) and
the mean logits cosine. Plain cosine is nearly 1 even for int8 (every logit vector shares a large offset), which
is why NLL, top-1 and KL carry the verdict (recurrentgemma-rknn-feasibility.md section 5).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rkedge.runtime._stderr import capture_native_output
from rkedge.runtime.rknn.bundle import BUNDLE_FILE
from rkedge.runtime.rknn.loop import DecodeLoop


def simulator_loop(folder: Path, bundle: Mapping[str, Any] | None = None, *, lazy: bool = False) -> DecodeLoop:
    """The bundle's decode loop in the rknn-toolkit2 simulator (``bundle``: its manifest, read from the folder when
    not given; ``lazy``: graphs built on first use)."""
    from rkedge.runtime.rknn.engine import SimulatorGraphs

    bundle = bundle or json.loads((folder / BUNDLE_FILE).read_text())
    with capture_native_output():
        runner = SimulatorGraphs(folder, [*bundle["graphs"], *bundle["heads"]], lazy=lazy)
    return DecodeLoop.from_bundle(folder, bundle, runner)


Array = np.ndarray[Any, Any]  # logits of any float dtype


def _log_softmax(x: Array) -> Array:
    shifted = x - x.max(axis=-1, keepdims=True)
    result: Array = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def compare_logits(reference: Array, candidate: Array, tokens: list[int]) -> dict[str, Any]:
    """Metrics of ``candidate`` against ``reference`` logits [steps, vocab], where row i predicts tokens[i + 1]."""
    steps = len(tokens) - 1
    ref, cand = reference[:steps].astype(np.float64), candidate[:steps].astype(np.float64)
    lp_ref, lp_cand = _log_softmax(ref), _log_softmax(cand)
    rows, targets = np.arange(steps), np.asarray(tokens[1:])
    ref_nll, cand_nll = float(-lp_ref[rows, targets].mean()), float(-lp_cand[rows, targets].mean())
    cosines = (ref * cand).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1) + 1e-12)
    return {
        "steps": steps,
        "nll_reference": round(ref_nll, 5),
        "nll_graphs": round(cand_nll, 5),
        "nll_delta_pct": round((cand_nll / ref_nll - 1) * 100, 3),
        "perplexity_reference": round(float(np.exp(ref_nll)), 4),
        "perplexity_graphs": round(float(np.exp(cand_nll)), 4),
        "top1_agreement": round(float((ref.argmax(-1) == cand.argmax(-1)).mean()), 4),
        "kl_divergence": round(float((np.exp(lp_ref) * (lp_ref - lp_cand)).sum(-1).mean()), 5),
        "logits_cosine": round(float(cosines.mean()), 6),
    }


def compare(reference: DecodeLoop | Array, candidate: DecodeLoop, tokens: list[int]) -> dict[str, Any]:
    """Both loops teacher-forced over ``tokens``, each keeping its own state (so state drift shows). ``reference``
    may be that loop's logits already computed (``DecodeLoop.teacher_forced_logits(tokens[:-1])``), so the float
    model need not be held while the candidate runs."""
    inputs = tokens[:-1]
    with capture_native_output():
        ours = candidate.teacher_forced_logits(inputs, getattr(candidate.runner, "release_graph", None))
    expected = reference.teacher_forced_logits(inputs) if isinstance(reference, DecodeLoop) else reference
    return compare_logits(expected, ours, tokens)


def measure_quality(folder: Path, bundle: Mapping[str, Any], reference: DecodeLoop | Array,
                    tokens: list[int]) -> dict[str, Any]:
    """The bundle in the simulator against ``reference`` (transformers' weights in torch, or their teacher-forced
    logits), teacher-forced graph by graph: each graph runs over every step in its own child process
    (:mod:`rkedge.convert.rknn.quality_worker`), so the host holds one simulated graph at a time, its memory goes
    back to the OS when the child exits, and a simulator crash is an error naming the graph."""
    import shutil
    import tempfile

    from rkedge.convert.rknn.quality_worker import run_graph

    inputs = tokens[:-1]
    expected = reference.teacher_forced_logits(inputs) if isinstance(reference, DecodeLoop) else reference
    # The rows of the tokens only: the float32 table of a 256k vocabulary at 2b width is 2.6 GB.
    table = np.load(folder / bundle["embedding"]["file"], mmap_mode="r")
    xs = np.stack([np.asarray(table[t], dtype=np.float32).reshape(1, 1, -1) for t in inputs])
    del table
    work = Path(tempfile.mkdtemp(prefix=".quality-", dir=folder))
    try:
        current = work / "x0.npy"
        np.save(current, xs)
        for index, graph in enumerate(bundle["graphs"]):
            passed_on = work / f"x{index + 1}.npy"
            run_graph(folder, graph, "chunk", bundle["dims"], current, passed_on)
            current = passed_on
        parts = []
        for j, graph in enumerate(bundle["heads"]):
            logits = work / f"logits{j}.npy"
            run_graph(folder, graph, "head", bundle["dims"], current, logits)
            parts.append(np.load(logits))
        ours = np.concatenate(parts, axis=1).astype(np.float32)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**compare_logits(expected, ours, tokens), "backend": "rknn-toolkit2 simulator",
            "method": "teacher-forced on held-out text; both sides keep their own states"}
