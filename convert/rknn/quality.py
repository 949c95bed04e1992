"""Quality of the built graphs against transformers, teacher-forced on held-out text, in the simulator.

Both sides read the same tokens (teacher forcing) and keep their own states, so state drift shows. Reported: the
NLL of the next token (nats/token) on both sides and its relative delta, top-1 agreement, KL(torch || graphs) and
the mean logits cosine. Plain cosine is nearly 1 even for int8 (every logit vector shares a large offset), which
is why NLL, top-1 and KL carry the verdict (recurrentgemma-rknn-feasibility.md section 5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rkedge.runtime._stderr import capture_native_output
from rkedge.runtime.rknn.bundle import BUNDLE_FILE
from rkedge.runtime.rknn.loop import DecodeLoop


def simulator_loop(folder: Path) -> DecodeLoop:
    from rkedge.runtime.rknn.engine import SimulatorGraphs

    bundle = json.loads((folder / BUNDLE_FILE).read_text())
    with capture_native_output():
        runner = SimulatorGraphs(folder, [*bundle["graphs"], *bundle["heads"]])
    return DecodeLoop.from_bundle(folder, bundle, runner)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def compare(reference: DecodeLoop, candidate: DecodeLoop, tokens: list[int]) -> dict[str, Any]:
    reference.reset()
    candidate.reset()
    nll_ref, nll_cand, agree, kls, cosines = [], [], [], [], []
    with capture_native_output():
        for index in range(len(tokens) - 1):
            ref = reference.step(tokens[index])
            cand = candidate.step(tokens[index])
            target = tokens[index + 1]
            lp_ref, lp_cand = _log_softmax(ref.astype(np.float64)), _log_softmax(cand.astype(np.float64))
            nll_ref.append(-lp_ref[target])
            nll_cand.append(-lp_cand[target])
            agree.append(int(np.argmax(ref) == np.argmax(cand)))
            kls.append(float(np.sum(np.exp(lp_ref) * (lp_ref - lp_cand))))
            cosines.append(float(np.dot(ref, cand) / (np.linalg.norm(ref) * np.linalg.norm(cand) + 1e-12)))
    ref_nll, cand_nll = float(np.mean(nll_ref)), float(np.mean(nll_cand))
    return {
        "steps": len(tokens) - 1,
        "nll_reference": round(ref_nll, 5),
        "nll_graphs": round(cand_nll, 5),
        "nll_delta_pct": round((cand_nll / ref_nll - 1) * 100, 3),
        "perplexity_reference": round(float(np.exp(ref_nll)), 4),
        "perplexity_graphs": round(float(np.exp(cand_nll)), 4),
        "top1_agreement": round(float(np.mean(agree)), 4),
        "kl_divergence": round(float(np.mean(kls)), 5),
        "logits_cosine": round(float(np.mean(cosines)), 6),
    }


def measure_quality(folder: Path, reference: DecodeLoop, tokens: list[int]) -> dict[str, Any]:
    candidate = simulator_loop(folder)
    try:
        return {**compare(reference, candidate, tokens), "backend": "rknn-toolkit2 simulator",
                "method": "teacher-forced on held-out text; both sides keep their own states"}
    finally:
        candidate.runner.release()
