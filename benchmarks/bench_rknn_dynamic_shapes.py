#!/usr/bin/env python3
"""Does one rknn-toolkit2 model built for several input shapes (``dynamic_input``) keep one copy of the weights?

Issue 16 item 3 asks this before designing chunked prefill: if it does, the prefill graph for chunks of T tokens
and the decode step (T = 1) can be one model (convert/rknn/prefill.py builds a graph that is shape-agnostic in
T). Each variant is built fp16 for rk3588 in its own child process (so the memory figures are its own), from the
same prefill graph of all layers of a model:

- ``fixed T=16``: the ONNX exported with static shapes, no ``dynamic_input``;
- ``dynamic {16}``: dynamic ONNX (T symbolic), one shape set;
- ``dynamic {1,16,64}``: the same, three shape sets (decode step, two chunk lengths);
- ``fixed T=1`` and ``fixed T=64``: the other two shapes as models of their own (what three graphs would cost).

Printed per variant: the .rknn size, the process's RSS after the build, after ``init_runtime`` (simulator) and
after inference of every shape, its peak RSS, and each shape's outputs against torch (worst cosine over the
outputs, and max |difference| of x_out). Two models: the trained tiny fixture (tests/data/tiny-recurrentgemma,
~0.45M parameters, so graph metadata weighs as much as the weights) and a wider random RecurrentGemma (hidden
768, ~21M parameters, 42 MB fp16) where the weights dominate the file.

What the simulator cannot tell: the board's memory. rknn.eval_memory needs a connected board; RSS on this host
is the simulator's (it may run the float graph and allocate per shape differently from librknnrt). How librknnrt
lays out the weights of a multi-shape model on the NPU, and whether switching shapes costs time
(rknn_set_input_shapes), only a board can say.

Usage: python benchmarks/bench_rknn_dynamic_shapes.py [--models tiny,wide]   (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/data/tiny-recurrentgemma"
WIDE_CONFIG = {"hidden_size": 768, "intermediate_size": 4608, "num_hidden_layers": 3, "num_attention_heads": 6,
               "num_key_value_heads": 1, "head_dim": 128, "vocab_size": 259, "lru_width": 768,
               "attention_window_size": 64}
VARIANTS = {"fixed T=16": (False, (16,)), "dynamic {16}": (True, (16,)), "dynamic {1,16,64}": (True, (1, 16, 64)),
            "fixed T=1": (False, (1,)), "fixed T=64": (False, (64,))}



def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def load_model(which: str) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if which == "tiny":
        return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    torch.manual_seed(0)
    config = AutoConfig.for_model("recurrent_gemma", **WIDE_CONFIG)
    return AutoModelForCausalLM.from_config(config).eval()


def example_inputs(module: Any, dims: Any, length: int, seed: int) -> list[Any]:
    """Real position features for a chunk at position 80 (past the 64-token window) and random activations and
    states of a plausible scale."""
    import numpy as np

    from rkedge.convert.rknn.prefill import chunk_features

    rng = np.random.default_rng(seed)
    values = {"x": rng.standard_normal((1, length, dims.hidden)).astype(np.float32) * 8,
              **chunk_features(80, length, rotary_dim=dims.rotary_dim, rope_theta=dims.rope_theta,
                               window=dims.window)}
    for name, shape in module.input_shapes(length).items():
        values.setdefault(name, rng.standard_normal(shape).astype(np.float32))
    return [values[name] for name in module.input_names()]


def run_variant(which: str, variant: str, folder: Path) -> dict[str, Any]:
    """One build, in this (child) process."""
    import numpy as np
    import torch
    from rknn.api import RKNN

    from rkedge.convert.rknn.prefill import dynamic_axes, dynamic_input, prefill_module
    from rkedge.convert.rknn.shape import GriffinShape

    dynamic, lengths = VARIANTS[variant]
    model = load_model(which)
    dims = GriffinShape.from_transformers(model.config)
    module = prefill_module(model, dims, range(dims.layers)).eval()
    names = module.input_names()
    onnx = folder / f"{which}-{variant.replace(' ', '_').replace('{', '').replace('}', '').replace(',', '-')}.onnx"
    example = tuple(torch.from_numpy(a) for a in example_inputs(module, dims, lengths[0], 0))
    torch.onnx.export(module, example, str(onnx), opset_version=17, dynamo=False, input_names=names,
                      output_names=module.output_names(),
                      dynamic_axes=dynamic_axes(module) if dynamic else None)
    references = {t: example_inputs(module, dims, t, t) for t in lengths}
    with torch.no_grad():
        expected = {t: [o.numpy() for o in module(*(torch.from_numpy(a) for a in ins))]
                    for t, ins in references.items()}
    params = sum(p.numel() for p in module.parameters())
    del model
    before = rss_mb()
    rknn = RKNN(verbose=False)
    config: dict[str, Any] = {"target_platform": "rk3588"}
    if dynamic:
        config["dynamic_input"] = dynamic_input(module, lengths)
    started = time.time()
    assert rknn.config(**config) == 0
    assert rknn.load_onnx(model=str(onnx)) == 0
    assert rknn.build(do_quantization=False) == 0
    build_s = time.time() - started
    rknn_file = onnx.with_suffix(".rknn")
    assert rknn.export_rknn(str(rknn_file)) == 0
    after_build = rss_mb()
    assert rknn.init_runtime() == 0
    after_init = rss_mb()
    checks = {}
    for t, ins in references.items():
        outputs = rknn.inference(inputs=ins)
        cosines = [float(np.dot(o.ravel(), e.ravel()) / (np.linalg.norm(o) * np.linalg.norm(e) + 1e-30))
                   for o, e in zip(outputs, expected[t], strict=True)]
        checks[t] = {"min_cosine": min(cosines),
                     "x_out_max_abs_diff": float(np.abs(outputs[0].reshape(expected[t][0].shape)
                                                        - expected[t][0]).max()),
                     "shapes_ok": all(o.size == e.size for o, e in zip(outputs, expected[t], strict=True))}
    after_inference = rss_mb()
    rknn.release()
    return {"model": which, "variant": variant, "params": params, "fp16_weight_mb": params * 2 / 1e6,
            "rknn_mb": rknn_file.stat().st_size / 1e6, "build_s": round(build_s, 1),
            "rss_before_mb": before, "rss_after_build_mb": after_build, "rss_after_init_mb": after_init,
            "rss_after_inference_mb": after_inference,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,  # KiB on Linux
            "checks": checks}


def child(which: str, variant: str, folder: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", which, variant, str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            return result
    raise RuntimeError(f"{which} / {variant} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,wide")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from rkedge.runtime._stderr import capture_native_output

        which, variant, folder = args.child
        with capture_native_output():
            result = run_variant(which, variant, Path(folder))
        print("RESULT " + json.dumps(result), flush=True)
        return
    print("rknn-toolkit2 dynamic_input: one model, several shapes (fp16, rk3588, simulator)")
    header = (f"{'model':5} {'variant':18} {'params':>8} {'fp16 w MB':>9} {'.rknn MB':>8} {'build s':>7} "
              f"{'RSS build':>9} {'RSS init':>8} {'RSS infer':>9} {'peak':>6}  outputs vs torch per T")
    print(header)
    results = []
    with tempfile.TemporaryDirectory(prefix="rkedge-dyn-") as tmp:
        for which in args.models.split(","):
            for variant in VARIANTS:
                r = child(which, variant, Path(tmp))
                results.append(r)
                checks = ", ".join(f"T={t}: cos {c['min_cosine']:.6f} |dx| {c['x_out_max_abs_diff']:.1e}"
                                   for t, c in r["checks"].items())
                print(f"{which:5} {variant:18} {r['params']:>8} {r['fp16_weight_mb']:9.2f} {r['rknn_mb']:8.2f} "
                      f"{r['build_s']:7.1f} {r['rss_after_build_mb']:9.0f} {r['rss_after_init_mb']:8.0f} "
                      f"{r['rss_after_inference_mb']:9.0f} {r['peak_rss_mb']:6.0f}  {checks}", flush=True)
    for which in args.models.split(","):
        by = {r["variant"]: r for r in results if r["model"] == which}
        one, three = by["dynamic {16}"]["rknn_mb"], by["dynamic {1,16,64}"]["rknn_mb"]
        separate = sum(by[v]["rknn_mb"] for v in ("fixed T=1", "fixed T=16", "fixed T=64"))
        weights = by["fixed T=16"]["fp16_weight_mb"]
        per_shape = (three - one) / 2
        program = one - weights  # what a one-shape file holds besides the weights (per-shape graph and code)
        if weights < 2 * program:
            verdict = (f"inconclusive here: the weights ({weights:.2f} MB) weigh less than one shape's graph code "
                       f"(~{program:.2f} MB)")
        else:
            verdict = "shared" if per_shape < 0.5 * weights else "NOT shared"
        print(f"{which}: three shapes in one model add {three - one:.2f} MB to one shape's {one:.2f} MB, "
              f"{per_shape:.2f} MB per added shape (fp16 weights {weights:.2f} MB; three separate models "
              f"{separate:.2f} MB): the weights are {verdict}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
