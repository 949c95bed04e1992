"""``rkedge convert MODEL --backend rknn``: RecurrentGemma -> verified decode-step graphs -> rknn-toolkit2 -> bundle.

Steps: inspect and check -> build the decode-step graphs from the model's own weights (torch) and verify them
against transformers' forward pass (max logit difference printed) -> split into graphs sized to the NPU limits and
the build host's RAM -> export ONNX -> calibrate from real decode states of a prompt set -> build each graph in its
own child process (fp16, or w8a8 keeping in fp16 the fewest parts that reach the quality target, chosen in the
simulator on text held out of the calibration set: rkedge.convert.rknn.precision) -> measure quality against
transformers in the simulator (teacher-forced: NLL delta, top-1 agreement, KL, logits cosine) and check it against
the target -> write the bundle atomically (a staging folder renamed into place) with its manifest and a model card.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkedge import __version__
from rkedge._fs import atomic_dir
from rkedge.convert.bnb import base_model_name, dequantize_checkpoint, quality_warning, quantization_of
from rkedge.convert.findings import Finding, raise_on_errors
from rkedge.convert.inspect import inspect_checkpoint, read_json
from rkedge.convert.rknn.precision import QualityTarget
from rkedge.convert.rknn.rules import RKNN_RULES
from rkedge.convert.toolkit.runner import Event, EventHandler, child_environment, run_worker
from rkedge.convert.toolkit.worker import PROTOCOL
from rkedge.errors import InputError, ToolkitError
from rkedge.manifest import BUNDLE_FILE, BUNDLE_SCHEMA, BUNDLE_SCHEMA_VERSION, Manifest

if TYPE_CHECKING:
    from rkedge.convert.rknn.prefill import PrefillBuild
    from rkedge.runtime.rknn.loop import Floats

SOURCE = RKNN_RULES.source
RKNN_DTYPES = RKNN_RULES.dtypes
BUILD_BYTES_PER_PARAM = RKNN_RULES.build_bytes_per_param
GRAPH_WEIGHT_BUDGET = RKNN_RULES.graph_weight_budget
#: The share of the available host memory one graph's build or simulation may plan on (the rest: this process,
#: the page cache the exported ONNX lives in, and the 20-28 bytes/parameter spread of the measured builds).
HOST_RAM_SHARE = 0.6
DEFAULT_EVAL_STEPS = 256
#: The simulator's time per decode step: ~8 ms per graph call (measured on the tiny model, benchmarks/bench_rknn.py)
#: plus ~22 ns per parameter (about a minute per token for the 2.7B model; feasibility section 6).
SIMULATOR_S_PER_GRAPH, SIMULATOR_S_PER_PARAM = 0.008, 2.2e-8
QUALITY_BUDGET_S = 1800
#: The precision search simulates its variants in this process for models up to this size: a child per graph
#: and run (measure_quality) costs a process start and a toolkit import, ~5 s each, for every one of the search's
#: dozens of runs, while such a model's simulated graphs take well under 2 GB.
SEARCH_IN_PROCESS_PARAMS = 50_000_000
#: A search run's hybrid step 2 per graph: ~5 s for a tiny graph, 91-174 s for ~1e9 parameters (feasibility
#: section 6; measured builds, which step 2 is most of).
SEARCH_STEP2_S_PER_GRAPH, SEARCH_STEP2_S_PER_PARAM = 5.0, 1.5e-7
#: A graph build that runs this long is stuck: builds at 2b widths measured 91-174 s (feasibility section 6).
BUILD_TIMEOUT_S = 2 * 3600  # the default quality report stays within about half an hour
#: Calibration runs each prompt this many decode steps at most (through the window wrap on small windows); the
#: activation ranges of a 2048-token window's k/v slots do not need the whole window filled.
CALIBRATION_MAX_STEPS = 256
#: ... and the prompt set is cut to this many decode steps in all. ~100 samples per graph are kept, so more steps
#: only cost time: 20 prompts x 256 steps took ~9 minutes of torch decode at 2b width and 3 layers, and would take
#: over an hour at full depth. The tiny test models (20 prompts x 80 steps) stay under it.
CALIBRATION_MAX_TOTAL_STEPS = 2048
#: Tensors kept in fp16 in the hybrid build when they are not chosen by measurement (manual builds leave
#: fp16_patterns at this; prefill graphs and a search over budget fall back to it): the RG-LRU chain and the conv1d before it, with their recurrent (h,
#: conv) and attention (k/v) state I/O. Chosen by measurement over many steps, not one (benchmarks/
#: bench_rknn_hybrid.py: trained tiny RecurrentGemma, 1024 teacher-forced steps on held-out code, KL to
#: transformers): plain w8a8 0.0072 (top-1 94.7%), + RG-LRU and h/k/v states 0.0044 (96.0%), + conv1d 0.0042
#: (96.0%). The LM head in fp16 gains little more (0.0040, 96.6%) and would cost ~20% of decode speed on the 2b
#: model (0.65 GB more read per token); the residual stream gains nothing. rknn-toolkit2's auto_hybrid does not
#: find these tensors (feasibility section 5).
HYBRID_PATTERNS = (r"/rg_lru/", r"/conv1d/", r"^(h|conv|k|v)\d+_rs$", r"^new_(h|conv|k|v)\d+-rs$")
#: Held-out English text for the quality report when none is given (written for rkedge; not in any training set
#: the checks know of).
DEFAULT_EVAL_TEXT = (
    "The small board on the desk had a fan that hummed whenever the model answered a question. Its owner had "
    "measured everything: the time to the first word, the words per second, the memory the process held. On most "
    "evenings the numbers were steady, and the answers were short and plain. When a question was long, the board "
    "took a moment to read it, then the reply came in a steady trickle of tokens. Nobody expected it to write "
    "novels; it was enough that it could explain a recipe, translate a sentence, or remind its owner what a "
    "function in an old program was meant to do."
)


@dataclass
class RknnRequest:
    model: Path
    out: Path
    dtype: str = "w8a8"
    platform: str = "rk3588"
    hybrid: bool = True
    calibration: str | None = "auto"
    eval_text: str | Path | None = None
    eval_steps: int | None = None  # default: 256, fewer when the simulator would take over QUALITY_BUDGET_S
    graph_params: int | None = None  # max parameters per layer graph (default: from the weight budget and host RAM)
    name: str | None = None
    template: str | None = None
    lora: Path | None = None  # a PEFT adapter merged into the weights first
    #: What the hybrid build keeps in fp16: None chooses it (rkedge.convert.rknn.precision: the fewest parts that
    #: reach quality_target); a tuple of regexes over tensor names is kept as given (benchmarks vary it).
    fp16_patterns: tuple[str, ...] | None = None
    quality_target: str | None = None  # "top1=0.95,nll=1.0" (the default); checked on every build
    quantized_algorithm: str = "normal"  # rknn-toolkit2's: normal, mmse, kl_divergence
    quantized_method: str = "channel"  # rknn-toolkit2's: channel, layer
    precision_budget_s: float | None = None  # the search's simulator time (default: precision.SEARCH_BUDGET_S)
    precision_granularity: str | None = None  # "layer" or "group" parts (default: layer when the budget allows)
    head_dtype: str | None = None  # the LM head graph's dtype (default: dtype)
    build_timeout_s: float | None = BUILD_TIMEOUT_S  # per graph build; the worker's process group is then killed
    #: Tokens per chunked-prefill graph run (None: rkedge.convert.rknn.prefill.choose_chunk; 0: no prefill graphs,
    #: the prompt runs token by token through the decode step)
    prefill_chunk: int | None = None

    @property
    def hybrid_patterns(self) -> list[str]:
        """The patterns of a manual hybrid build, and the fixed set graphs outside the search get (prefill)."""
        patterns = HYBRID_PATTERNS if self.fp16_patterns is None else self.fp16_patterns
        return list(patterns) if self.hybrid and self.dtype == "w8a8" else []

    @property
    def auto_precision(self) -> bool:
        """The decode graphs' fp16 parts are chosen by measurement (w8a8 hybrid without manual patterns)."""
        return self.fp16_patterns is None and self.hybrid and self.dtype == "w8a8"

    @property
    def target(self) -> QualityTarget:
        return QualityTarget.parse(self.quality_target)


@dataclass
class RknnResult:
    bundle: Path | None
    findings: list[Finding]
    manifest: Manifest | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False
    request: RknnRequest | None = None

    def summary(self) -> dict[str, Any]:
        return {"ok": not any(f.severity == "error" for f in self.findings), "dry_run": self.dry_run,
                "backend": "rknn", "output": str(self.bundle) if self.bundle else None,
                "findings": [f.to_dict() for f in self.findings], "steps": self.steps,
                "verification": self.manifest.verification if self.manifest else None,
                "quality": self.manifest.quality if self.manifest else None,
                "precision": self.manifest.get("precision") if self.manifest else None}


    def render(self) -> list[str]:
        """What ``rkedge convert --backend rknn`` prints on stdout: the plan (a dry run), or the figures and the
        bundle written."""
        if self.dry_run or self.bundle is None:
            request = self.request
            what = f"{request.dtype}{' hybrid' if request.hybrid_patterns else ''}" if request else "?"
            return [f"plan: RKNN bundle for {request.model.name if request else '?'}, {what}"]
        verification = (self.manifest.verification if self.manifest else None) or {}
        quality = (self.manifest.quality if self.manifest else None) or {}
        lines = [f"decode step vs transformers: max logit difference {verification.get('max_abs_diff', 0):.2e} "
                 f"over {verification.get('tokens')} tokens"]
        prefill = (self.manifest.prefill if self.manifest else None) or {}
        if prefill:
            checked = prefill["verification"]
            lines.append(f"chunked prefill (T = {prefill['chunk']}, weights {prefill['weights']}) vs transformers: "
                         f"max logit difference {checked['max_abs_diff']:.2e} over {checked['tokens']} tokens")
        if quality:
            lines.append(f"quality ({quality['steps']} teacher-forced steps, simulator vs transformers): "
                         f"NLL {quality['nll_reference']:.4f} -> {quality['nll_graphs']:.4f} "
                         f"({quality['nll_delta_pct']:+.2f}%), perplexity {quality['perplexity_reference']:.3f} -> "
                         f"{quality['perplexity_graphs']:.3f}, top-1 agreement {quality['top1_agreement'] * 100:.1f}%, "
                         f"logits cosine {quality['logits_cosine']:.5f}")
        lines += _precision_lines((self.manifest.get("precision") if self.manifest else None) or {})
        lines.append(f"wrote {self.bundle}")
        return lines


def check(request: RknnRequest) -> tuple[Any, list[Finding]]:
    """The request against what rknn-toolkit2 and this backend support, before any heavy work."""
    info = inspect_checkpoint(request.model)
    findings: list[Finding] = []
    rules = RKNN_RULES
    if info.architecture not in rules.architectures:
        findings.append(Finding("rknn.architecture", "error",
                                f"--backend rknn converts RecurrentGemma; {info.architecture} goes through RKLLM.",
                                "drop --backend rknn", SOURCE))
    if request.platform not in rules.platforms:
        findings.append(Finding("rknn.platform", "error",
                                f"the RKNN backend targets {', '.join(rules.platforms)}, not {request.platform}.",
                                f"use --platform {rules.platforms[0]}", SOURCE))
    if request.dtype not in rules.dtypes:
        findings.append(Finding("rknn.dtype", "error",
                                f"rknn-toolkit2 builds for rk3588 in {', '.join(rules.toolkit_dtypes)} (no w4a16); "
                                f"rkedge's RKNN backend offers {', '.join(rules.dtypes)}, not {request.dtype}.",
                                "use --dtype w8a8 (hybrid) or --dtype fp16", SOURCE))
    source = quantization_of(request.model)
    if info.quantization_config and not (source and source.dequantizable):
        findings.append(Finding("F-9", "error", f"a checkpoint with {source.describe() if source else 'quantization'} "
                                "cannot be exported (rkedge dequantizes bitsandbytes 4-bit and 8-bit only).",
                                "use the original fp32/bf16 checkpoint (google/recurrentgemma-2b-it)", "F-9"))
    elif source is not None:
        findings.append(Finding("F-9", "warning", f"{quality_warning(source)}; rkedge dequantizes it first.",
                                "convert the original checkpoint (google/recurrentgemma-2b-it) when you have it",
                                "F-9"))
    if request.prefill_chunk is not None and (request.prefill_chunk < 0 or request.prefill_chunk == 1):
        findings.append(Finding("rknn.prefill_chunk", "error",
                                f"--prefill-chunk {request.prefill_chunk}: a prefill chunk holds 2 tokens or more.",
                                "pass 0 (no prefill graphs) or a chunk length such as 16, 32 or 64", SOURCE))
    findings += _precision_findings(request, info)
    try:
        import rknn.api  # noqa: F401
    except Exception as exc:  # any import failure means no usable toolkit
        findings.append(Finding("rknn.toolkit", "error", f"rknn-toolkit2 is not importable here ({exc}).",
                                "install it: scripts/install-rknn-toolkit2.sh (x86_64, Python 3.8-3.12)", SOURCE))
    return info, findings


def _precision_findings(request: RknnRequest, info: Any) -> list[Finding]:
    """The quality target and quantization options as given, and whether the built-in calibration prompts and
    quality text fit the model (issue 16: a code model measured on them looked 5% worse than it was)."""
    from rkedge.convert.rknn.precision import domain_findings

    findings = []
    try:
        request.target  # noqa: B018 - parsed here so a typo fails before any heavy work
    except InputError as exc:
        findings.append(Finding("rknn.quality_target", "error", exc.message, exc.fix or "", SOURCE))
    if request.quantized_algorithm not in RKNN_RULES.quantized_algorithms:
        findings.append(Finding("rknn.quantized_algorithm", "error",
                                f"rknn-toolkit2 quantizes with {', '.join(RKNN_RULES.quantized_algorithms)}, not "
                                f"{request.quantized_algorithm!r}.", "use normal (the default) or mmse", SOURCE))
    if request.quantized_method not in RKNN_RULES.quantized_methods:
        findings.append(Finding("rknn.quantized_method", "error",
                                f"rknn-toolkit2 quantizes per {' or per '.join(RKNN_RULES.quantized_methods)}, not "
                                f"{request.quantized_method!r}.", "use channel (the default)", SOURCE))
    calibration = request.calibration
    if calibration not in (None, "auto") and not Path(calibration).is_file():
        findings.append(Finding("rknn.calibration", "error", f"calibration file not found: {calibration}",
                                "pass a .txt file of plain text or a JSON list of prompts, or --calibration auto",
                                SOURCE))
    findings += domain_findings(has_chat_template=bool(info.chat_template), dtype=request.dtype,
                                calibration=calibration, eval_text=request.eval_text)
    return findings


def convert_rknn(request: RknnRequest, *, dry_run: bool = False,
                 progress: Callable[[str, str], None] | None = None,
                 log: Callable[[str], None] | None = None) -> RknnResult:
    """``progress(step, detail)`` at each step; ``log(line)`` for every line the build workers print."""
    report = progress or (lambda step, detail: None)
    info, findings = check(request)
    if dry_run:
        return RknnResult(None, findings, dry_run=True, request=request)
    raise_on_errors(findings, "this RKNN conversion")
    started = time.monotonic()
    steps: list[dict[str, Any]] = []
    request.out.mkdir(parents=True, exist_ok=True)
    merged_dir = request.out / f".merged-{os.getpid()}"
    dequantized_dir = request.out / f".dequantized-{os.getpid()}"
    model_dir = request.model
    try:
        source = quantization_of(request.model)
        if source is not None and source.dequantizable:  # check() refused every other quantization
            report("dequantize", f"{source.describe()}, shard by shard")
            shutil.rmtree(dequantized_dir, ignore_errors=True)
            dequantized = dequantize_checkpoint(request.model, dequantized_dir,
                                                progress=lambda line: report("dequantize", line))
            steps.append({"name": "dequantize", **dequantized.to_dict()})
            model_dir = dequantized_dir
        if request.lora is not None:
            from rkedge.lora.merge import merge_lora

            report("merge", f"LoRA {request.lora} into {model_dir}")
            shutil.rmtree(merged_dir, ignore_errors=True)
            merge_lora(model_dir, request.lora, merged_dir, dtype="float32")
            steps.append({"name": "merge", "adapter": str(request.lora.resolve())})
            model_dir = merged_dir
        return _convert(request, info, model_dir, findings, steps, started, report, _build_events(log))
    finally:
        shutil.rmtree(merged_dir, ignore_errors=True)
        shutil.rmtree(dequantized_dir, ignore_errors=True)


def _convert(request: RknnRequest, info: Any, source: Path, findings: list[Finding], steps: list[dict[str, Any]],
             started: float, report: Callable[[str, str], None], on_event: EventHandler | None) -> RknnResult:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from rkedge.convert.rknn.decode_step import ChunkStep, HeadStep, layer_param_counts
    from rkedge.convert.rknn.prefill import graph_dynamic_input, prefill_section
    from rkedge.convert.rknn.torch_graphs import (
        build_torch_graphs,
        graph_names,
        graph_spec,
        loop_over,
        verify_against_transformers,
    )

    report("load", f"{source} (float32, transformers)")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer_spec, tokenizer_files = _tokenizer(request.model, info)
    encode = _encoder(request.model, tokenizer_spec)
    from rkedge.convert.host import host_memory

    budget = request.graph_params or graph_param_budget(
        request.dtype, available=host_memory()[0], held=model.config.vocab_size * model.config.hidden_size * 4)
    dims, chunks, heads = build_torch_graphs(model, max_chunk_params=budget)
    counts = layer_param_counts(model)
    loop = loop_over(model, dims, chunks, heads)

    report("verify", "decode step vs transformers' forward pass")
    eval_steps = request.eval_steps or auto_eval_steps(sum(counts) + dims.vocab * dims.hidden,
                                                       len(chunks) + len(heads))
    texts = quality_texts(request)
    eval_tokens = _text_tokens(texts.report_text, encode, tokenizer_spec, eval_steps)
    verification = verify_against_transformers(model, eval_tokens[:96], loop)
    steps.append({"name": "verify", **verification})
    if verification["max_abs_diff"] > 1e-3:
        raise ToolkitError(f"the decode-step graph differs from transformers by {verification['max_abs_diff']:.2e}.",
                           fix="this transformers version's RecurrentGemma may differ; report it")

    name = request.name or f"{request.model.name}_{request.dtype}_{request.platform}_rknn"
    out = request.out
    final = out / name
    with atomic_dir(final) as staging:  # an earlier bundle stays whole until this one is complete
        modules: list[ChunkStep | HeadStep] = [*chunks, *heads]
        graphs = list(zip(graph_names(chunks, heads), modules, strict=True))
        report("export", f"{len(graphs)} ONNX graphs (opset 17)")
        _export_onnx(staging, graphs)
        datasets: dict[int, Path] = {}
        if request.dtype == "w8a8":
            report("calibrate", "decode states of the prompt set")
            datasets = _calibration(loop, request, encode, tokenizer_spec, staging / "calibration", len(graphs),
                                    prompts=texts.calibration)
        quality_tokens = eval_tokens[: eval_steps + 1]
        # The reference side of the quality report, computed now so the float model is gone before the builds:
        # at 2b width the parent held ~9 GB (float32 weights, embedding copies) next to a build needing ~28 bytes
        # per parameter, and the two together outgrew a 24 GB host.
        reference_logits = reference_quality_logits(loop, quality_tokens)
        search: list[tuple[list[int], Floats]] | None = None  # the search's texts' tokens and their float logits
        if request.auto_precision:
            search = []
            for text in texts.search_texts:
                search_tokens = _text_tokens(text, encode, tokenizer_spec, eval_steps)[: eval_steps + 1]
                search.append((search_tokens, reference_logits if search_tokens == quality_tokens
                               else reference_quality_logits(loop, search_tokens)))
        np.save(staging / "embedding.npy", loop.embedding.astype(np.float16))
        specs = [graph_spec(module, graph_name) for graph_name, module in graphs]
        prefill = _prepare_prefill(request, model, loop, staging, encode, tokenizer_spec, eval_tokens, report)
        if prefill is not None:
            steps.append({"name": "verify_prefill", **prefill.verification})
        del model, loop, chunks, heads, modules, graphs
        gc.collect()
        plan = _precision_plan(request, dims, specs, eval_steps * len(search), findings) if search else None
        if plan is None:
            search = None  # no search (or one over budget: the fixed set is built at once)
        built = []
        for index, spec in enumerate(specs):
            kind = ", plain: the fp16 search starts there" if search is not None else \
                ", hybrid" if request.hybrid_patterns else ""
            report("build", f"{spec.name} ({request.dtype}{kind})")
            built.append(_build_graph(staging, spec.name, request, datasets.get(index), on_event=on_event,
                                      patterns=[] if search is not None else None))
        precision = _manual_precision(request)
        if search is not None:  # plain w8a8 built: now what to keep in fp16, then those graphs rebuilt
            def draft_of(graphs_built: list[dict[str, Any]]) -> dict[str, Any]:
                return _manifest(request, info, dims, counts, specs, graphs_built, tokenizer_spec, verification, name)

            precision, built = _choose_precision(request, staging, dims, specs, built, plan, datasets, search, texts,
                                                 draft_of, report, on_event)
        prefill_built = []
        # prefill graph i holds the layers of decode graph i: it keeps the same parts in fp16
        by_graph = precision["patterns"] if isinstance(precision.get("patterns"), dict) else None
        for index, graph in enumerate(prefill.specs if prefill is not None else []):
            assert prefill is not None
            patterns = None if by_graph is None else list(by_graph.get(specs[index].name, []))
            report("build", f"{graph['name']} (prefill, {request.dtype}"
                   f"{', hybrid' if (request.hybrid_patterns if patterns is None else patterns) else ''})")
            prefill_built.append(_build_graph(staging, graph["name"], request, prefill.datasets.get(index),
                                              on_event=on_event, dynamic_input=graph_dynamic_input(prefill, index),
                                              patterns=patterns))
        for file in tokenizer_files:
            shutil.copyfile(file, staging / file.name)
        draft = _manifest(request, info, dims, counts, specs, built, tokenizer_spec, verification, name)
        draft["precision"] = precision
        if precision.get("mode") == "auto":
            draft["hybrid"] = {**draft["hybrid"], "enabled": any(g.get("fp16_tensors") for g in built),
                               "patterns": sorted({p for ps in precision["patterns"].values() for p in ps}),
                               "why": "the fp16 parts were chosen by measurement to reach the quality target "
                                      "(precision; rkedge.convert.rknn.precision)" if precision["mode"] == "auto"
                                      else draft["hybrid"]["why"]}
        if prefill is not None:
            draft["prefill"] = prefill_section(prefill, prefill_built, draft["graphs"])
        shutil.rmtree(staging / "calibration-prefill", ignore_errors=True)
        shutil.rmtree(staging / "calibration", ignore_errors=True)

        report("quality", f"simulator vs transformers, {eval_steps} teacher-forced steps"
               + ("" if request.eval_steps else " (--eval-steps to change)"))
        from rkedge.convert.rknn.quality import measure_quality

        quality = {**measure_quality(staging, draft, reference_logits, quality_tokens), "text": texts.report_source}
        draft["precision"] = {**precision, **_target_verdict(request, quality, findings)}
        manifest = Manifest.from_dict({**draft, "quality": quality,
                                       "wall_time_s": round(time.monotonic() - started, 1)}, backend="rknn")
        (staging / BUNDLE_FILE).write_text(manifest.to_json(), encoding="utf-8")
        (staging / "README.md").write_text(_card(manifest, name), encoding="utf-8")
    return RknnResult(final, findings, manifest, steps, request=request)


def _prepare_prefill(request: RknnRequest, model: Any, loop: Any, staging: Path, encode: Callable[[str], list[int]],
                     spec: dict[str, Any], eval_tokens: list[int], report: Callable[[str, str], None]
                     ) -> PrefillBuild | None:
    """The prefill graphs' export, verification and calibration while the float model is loaded (None with
    --prefill-chunk 0). Calibration chunks come from the same prompt set as the decode graphs'."""
    from rkedge.convert.rknn.prefill import choose_chunk, prepare_prefill
    from rkedge.convert.rknn.shape import GriffinShape

    if request.prefill_chunk == 0:
        return None
    dims = GriffinShape.from_transformers(model.config)
    chunk = request.prefill_chunk or choose_chunk(dims, request.dtype)
    calibration_tokens: list[list[int]] = []
    if request.dtype == "w8a8":
        bos = spec.get("bos_token_id")
        length = min(max(loop.window + 16, 2 * chunk), CALIBRATION_MAX_STEPS)
        # calibration_prompts: .txt files too, and without the share the quality report holds out
        for prompt in calibration_prompts(request)[: max(1, CALIBRATION_MAX_TOTAL_STEPS // length)]:
            tokens = ([int(bos)] if bos is not None else []) + encode(prompt)
            while len(tokens) < length:
                tokens += encode(" " + prompt) or [tokens[-1] if tokens else 0]
            calibration_tokens.append(tokens[:length])
    return prepare_prefill(model, loop, staging, chunk=chunk, dtype=request.dtype, hybrid=bool(request.hybrid_patterns),
                           verify_tokens=eval_tokens, calibration_tokens=calibration_tokens, report=report)


def _manual_precision(request: RknnRequest) -> dict[str, Any]:
    """The manifest's "precision" of a build whose fp16 set was not searched."""
    mode = "fp16" if request.dtype == "fp16" else "fixed" if request.auto_precision else \
        "manual" if request.hybrid_patterns else "plain"
    return {"mode": mode, "target": request.target.to_dict(), "patterns": request.hybrid_patterns,
            "quantized_algorithm": request.quantized_algorithm, "quantized_method": request.quantized_method}


def _precision_plan(request: RknnRequest, dims: Any, specs: list[Any], steps: int, findings: list[Finding]) -> Any:
    """The search's parts and its cap, decided before any build (a search over budget builds the fixed set at
    once). A run's time is predicted: every graph's hybrid step 2 (about its build: ~5 s for a tiny graph, 91-174
    s for a ~1 GB graph at 2b width) and the teacher-forced steps. Returns None when there is no search."""
    from rkedge.convert.rknn import precision as prec

    names = [spec.name for spec in specs]
    graphs = [prec.GraphLayers(s.name, tuple(s.layers)) for s in specs if not s.name.startswith("head")]
    heads = [] if request.head_dtype == "fp16" else [n for n in names if n.startswith("head")]
    parts = prec.layer_parts(dims, graphs, heads)  # an fp16-built head (head_dtype) is not a part
    params = dims.layer_params + dims.vocab * dims.hidden
    per_run = len(specs) * SEARCH_STEP2_S_PER_GRAPH + params * SEARCH_STEP2_S_PER_PARAM + steps * (
        SIMULATOR_S_PER_GRAPH * len(specs) + SIMULATOR_S_PER_PARAM * params)
    budget = request.precision_budget_s or prec.SEARCH_BUDGET_S
    plan = prec.search_plan(parts, per_run, budget_s=budget, granularity=request.precision_granularity)
    if plan.granularity != "none":
        return plan
    findings.append(Finding(
        "rknn.precision_search", "warning",
        f"the fp16 search would take ~{per_run:.0f} s per simulator run, {plan.max_evaluations} run(s) within its "
        f"budget of {budget:.0f} s: this build keeps the fixed set (RG-LRU, conv1d, state I/O in fp16) instead, "
        "and its quality report says whether that reaches the target.",
        "pass fewer --eval-steps (each run of the search teacher-forces that many steps)", prec.SOURCE))
    return None


def _choose_precision(request: RknnRequest, staging: Path, dims: Any, specs: list[Any], built: list[dict[str, Any]],
                      plan: Any, datasets: dict[int, Path], search: list[tuple[list[int], Floats]],
                      texts: QualityTexts,
                      draft_of: Callable[[list[dict[str, Any]]], dict[str, Any]], report: Callable[[str, str], None],
                      on_event: EventHandler | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The fp16 parts of the decode graphs, chosen on the simulator from the plain-w8a8 builds (each variant is
    the same step-1 files with another cfg: no build), then the graphs that keep any part rebuilt with them.
    Returns the manifest's "precision" and the graphs as built."""
    import copy

    from rkedge.convert.rknn import precision as prec
    from rkedge.convert.rknn.build_worker import edit_cfg
    from rkedge.convert.rknn.quality import compare, measure_quality, simulator_loop

    names = [spec.name for spec in specs]
    costs = prec.cost_model(dims)
    params = dims.layer_params + dims.vocab * dims.hidden
    target = request.target
    base: dict[str, Any] = {"mode": "auto", "target": target.to_dict(), "searched_on": texts.search_source,
                            "steps": sum(len(tokens) - 1 for tokens, _ in search), "quantized_algorithm": request.quantized_algorithm,
                            "quantized_method": request.quantized_method,
                            "parts": {p.name: {"group": p.group, "layers": list(p.layers), "graphs": list(p.graphs),
                                               "patterns": list(p.patterns), "fp16_weights": p.weights,
                                               "extra_ms_per_token": round(costs.ms(p), 4)} for p in plan.parts}}
    draft = draft_of(built)
    folder = staging / "precision"
    runs = [0]

    def evaluate(kept: list[prec.Part] | Any) -> dict[str, Any]:
        runs[0] += 1
        report("precision", f"run {runs[0]}: fp16 {', '.join(p.name for p in kept) or 'nothing (plain w8a8)'}")
        by_graph = prec.patterns_by_graph(kept, names)
        bundle = copy.deepcopy(draft)
        for graph in [*bundle["graphs"], *bundle["heads"]]:
            if by_graph.get(graph["name"]):
                cfg = staging / graph["simulator"]["cfg"]
                variant = folder / str(runs[0]) / cfg.name
                variant.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cfg, variant)
                edit_cfg(variant, by_graph[graph["name"]])
                graph["simulator"] = {**graph["simulator"], "cfg": variant.relative_to(staging).as_posix()}
        if params > SEARCH_IN_PROCESS_PARAMS:
            return prec.worst([measure_quality(staging, bundle, reference, tokens) for tokens, reference in search])
        candidate = simulator_loop(staging, bundle, lazy=True)
        try:
            return prec.worst([compare(reference, candidate, tokens) for tokens, reference in search])
        finally:
            release = getattr(candidate.runner, "release", None)  # SimulatorGraphs: what simulator_loop runs
            if release is not None:
                release()

    try:
        choice = prec.choose(plan.parts, evaluate, target, costs, max_evaluations=plan.max_evaluations,
                             granularity=plan.granularity)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    chosen = prec.patterns_by_graph(choice.chosen, names)
    base = {**base, **choice.to_dict(), "search_quality": dict(choice.quality)}
    for line in prec.render_table(choice.table, [p.name for p in choice.chosen]):
        report("precision", line)
    built = list(built)
    for index, spec in enumerate(specs):
        if chosen.get(spec.name):
            report("build", f"{spec.name} (w8a8, {len(chosen[spec.name])} fp16 pattern(s))")
            built[index] = _build_graph(staging, spec.name, request, datasets.get(index), on_event=on_event,
                                        patterns=chosen[spec.name])
    return {**base, "patterns": {name: list(chosen.get(name, [])) for name in names}}, built


def _target_verdict(request: RknnRequest, quality: dict[str, Any], findings: list[Finding]) -> dict[str, Any]:
    """The quality report against the target: the manifest's verdict, and a warning finding when below it."""
    from rkedge.convert.rknn.precision import below_target_finding

    target = request.target
    finding = below_target_finding(quality, target, dtype=request.dtype, searched=request.auto_precision,
                                   calibration_given=request.calibration not in (None, "auto"))
    if finding is None:
        return {"met": True}
    findings.append(finding)
    return {"met": False, "below_target": {"shortfalls": target.shortfalls(quality), "try": finding.fix}}


def graph_param_budget(dtype: str, *, available: int, held: int = 0) -> int:
    """Parameters per graph: the NPU weight budget, and what the host can build and simulate next to what this
    process keeps (``held`` bytes, the quality step's float32 embedding table) with HOST_RAM_SHARE of the memory
    ``available`` now. The simulator loads a built graph with about the build's own memory: at 2b width a single
    655M-parameter LM head graph took 13 GB to simulate next to the parent's 4 GB (17 GB peak)."""
    per = 1 if dtype == "w8a8" else 2
    if not available:
        return GRAPH_WEIGHT_BUDGET // per
    host_cap = int(max(available - held, 0) * HOST_RAM_SHARE / BUILD_BYTES_PER_PARAM)
    return max(1, min(GRAPH_WEIGHT_BUDGET // per, host_cap))


def _tokenizer(model_dir: Path, info: Any) -> tuple[dict[str, Any], list[Path]]:
    own = model_dir / "rkedge_tokenizer.json"
    if own.is_file():
        spec = read_json(own)
        return spec, [own]
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"{model_dir} has no tokenizer.json.", fix="copy the base model's tokenizer files")
    eos = info.token_id("eos")
    tokenizer_config = info.tokenizer_config
    spec = {"type": "tokenizers", "file": "tokenizer.json", "bos_token_id": info.token_id("bos"),
            "eos_token_id": eos, "chat_template": bool(info.chat_template)}
    # Gemma-family instruct models end a turn with <end_of_turn>: stop on it too.
    added = {t.get("content"): int(k) for k, t in (tokenizer_config.get("added_tokens_decoder") or {}).items()}
    if "<end_of_turn>" in added:
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        spec["eos_token_id"] = sorted({*ids, added["<end_of_turn>"]})
    files = [model_dir / n for n in ("tokenizer.json", "tokenizer_config.json") if (model_dir / n).is_file()]
    return spec, files


def _encoder(model_dir: Path, spec: dict[str, Any]) -> Callable[[str], list[int]]:
    from rkedge.runtime.rknn.engine import make_tokenizer

    tokenizer = make_tokenizer(model_dir, spec)
    return tokenizer.encode


def auto_eval_steps(params: int, graphs: int) -> int:
    """256 steps, or as many as the simulator runs in QUALITY_BUDGET_S (at least 16)."""
    per_step = SIMULATOR_S_PER_GRAPH * graphs + SIMULATOR_S_PER_PARAM * params
    return int(max(16, min(DEFAULT_EVAL_STEPS, QUALITY_BUDGET_S // per_step)))


@dataclass(frozen=True)
class QualityTexts:
    """Where the calibration prompts, the search's text and the quality report's text come from: a calibration
    file gives up a held-out share (precision.hold_out) that the search reads, and the report too unless
    --eval-text is given; without either, the built-in chat prompts and English paragraph."""

    calibration: list[str]  # the prompts calibration runs
    search_text: str
    search_source: str
    report_text: str
    report_source: str
    #: More text the search reads (--eval-text next to a held-out split: a held-out share of a small calibration
    #: set can miss the domain, as a 6-layer code model's plain w8a8 showed: 97.7% top-1 on the split, 94.9% and
    #: NLL +3.2% on its held-out file)
    search_also: list[str] = field(default_factory=list)

    @property
    def search_texts(self) -> list[str]:
        return [self.search_text, *self.search_also]


def _file_prompts(source: str) -> list[str]:
    """A calibration file's prompts: plain text (.txt, split by precision.text_prompts) or JSON (prompts or
    {input, target} items, rkedge.convert.calibration)."""
    from rkedge.convert import calibration as calib
    from rkedge.convert.rknn.precision import text_prompts

    path = Path(source)
    if path.suffix.lower() in (".txt", ".text", ".md", ".rst", ".py"):
        try:
            prompts = text_prompts(path.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            raise InputError(f"cannot read the calibration file {path} ({exc}).", fix="pass a readable text file") \
                from exc
        if not prompts:
            raise InputError(f"{path} holds no text to calibrate on.", fix="pass a file of the model's kind of text")
        return prompts
    return [item.get("prompt") or item.get("input") or "" for item in calib.load_prompts(source)]


def quality_texts(request: RknnRequest) -> QualityTexts:
    from rkedge.convert import calibration as calib
    from rkedge.convert.rknn.precision import hold_out

    eval_text = Path(request.eval_text).read_text(encoding="utf-8", errors="replace") if request.eval_text \
        else None
    if request.calibration in (None, "auto"):
        prompts = [item["prompt"] for item in calib.load_prompts(None)]
        held: list[str] = []
    else:
        prompts, held = hold_out(_file_prompts(str(request.calibration)))
    also: list[str] = []
    if held:
        search_text, search_source = "\n".join(held), f"{len(held)} prompt(s) held out of {request.calibration}"
        if eval_text is not None:  # the user's own text says what the domain is: a choice must hold on both
            also = [eval_text]
            search_source += f" and --eval-text {request.eval_text}"
    elif eval_text is not None:
        search_text, search_source = eval_text, f"--eval-text {request.eval_text}"
    else:
        search_text, search_source = DEFAULT_EVAL_TEXT, "the built-in English paragraph"
    if eval_text is not None:
        report_text, report_source = eval_text, f"--eval-text {request.eval_text}"
    else:
        report_text, report_source = search_text, search_source
    return QualityTexts(prompts, search_text, search_source, report_text, report_source, also)


def calibration_prompts(request: RknnRequest) -> list[str]:
    """The prompts calibration runs (a calibration file's held-out share excluded)."""
    return quality_texts(request).calibration


def _eval_tokens(request: RknnRequest, encode: Callable[[str], list[int]], spec: dict[str, Any],
                 steps: int) -> list[int]:
    text = Path(request.eval_text).read_text(encoding="utf-8", errors="replace") if request.eval_text \
        else DEFAULT_EVAL_TEXT
    return _text_tokens(text, encode, spec, steps)


def _text_tokens(text: str, encode: Callable[[str], list[int]], spec: dict[str, Any], steps: int) -> list[int]:
    """BOS + the text's tokens, repeated to cover the verification (96) and ``steps`` + 1 quality tokens."""
    tokens = encode(text)
    bos = spec.get("bos_token_id")
    tokens = ([int(bos)] if bos is not None else []) + tokens
    while len(tokens) < max(steps + 1, 97):  # 96 for the verification, steps + 1 for the quality report
        tokens += tokens[1:]
    return tokens


def calibration_sample_steps(total: int) -> list[int]:
    """Which of ``total`` captured decode steps become calibration samples: always positions 0-3 (the reset and
    the first window slots), then about 96 evenly spaced."""
    return sorted({*range(min(4, total)), *range(4, total, max(1, total // 96))})


class CalibrationSamples:
    """Calibration inputs of each graph in rknn-toolkit2's dataset format: one .npy per input of a sample, and per
    graph a dataset file with one line per sample (its inputs' files). Used for the decode and the prefill graphs."""

    def __init__(self, folder: Path, input_names: list[list[str]], *, prefix: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.input_names, self.prefix = folder, input_names, prefix
        self.lines: dict[int, list[str]] = {i: [] for i in range(len(input_names))}

    def save(self, index: int, number: int, inputs: list[Floats]) -> None:
        import numpy as np

        paths = []
        for input_name, array in zip(self.input_names[index], inputs, strict=True):
            path = self.folder / f"{self.prefix}{index}_{number}_{input_name}.npy"
            np.save(path, np.asarray(array).astype(np.float32))
            paths.append(str(path.resolve()))
        self.lines[index].append(" ".join(paths))

    def datasets(self) -> dict[int, Path]:
        datasets = {}
        for index, graph_lines in self.lines.items():
            dataset = self.folder / f"dataset_{index}.txt"
            dataset.write_text("\n".join(graph_lines) + "\n")
            datasets[index] = dataset
        return datasets


def _calibration(loop: Any, request: RknnRequest, encode: Callable[[str], list[int]], spec: dict[str, Any],
                 folder: Path, graph_count: int, prompts: list[str] | None = None) -> dict[int, Path]:
    """Real decode-step inputs of every graph, captured from torch trajectories over a prompt set (positions from 0,
    through the attention window wrap), written as one .npy per input and one dataset line per sample.

    Streamed: the steps to keep are known before the first one runs (every prompt runs the same number of steps),
    so each kept sample goes to disk as it is captured and the rest are never held. Holding every step's inputs
    took ~4 MB per step per attention graph at 2b width (a 2047-slot k/v window), 24 GB for 20 prompts; now the
    host holds one step. The LM head graphs are not run: their input is the last chunk's output."""
    import numpy as np

    from rkedge.convert import calibration as calib

    if prompts is None:  # the request's whole prompt set
        prompts = [item.get("prompt") or item.get("input") or "" for item in calib.load_prompts(request.calibration)]
    bos = spec.get("bos_token_id")
    steps = min(loop.window + 16, CALIBRATION_MAX_STEPS)
    prompts = prompts[: max(1, CALIBRATION_MAX_TOTAL_STEPS // steps)]
    sample_of = {step: number for number, step in enumerate(calibration_sample_steps(len(prompts) * steps))}
    specs = [*loop.chunks, *loop.heads]
    last_chunk = len(loop.chunks) - 1
    samples = CalibrationSamples(folder, [spec.inputs for spec in specs][:graph_count], prefix="g")
    save = samples.save

    inner = loop.runner
    step_counter = [0]

    class Capture:
        def run(self, index: int, inputs: list[Floats]) -> list[Floats]:
            outputs: list[Floats] = inner.run(index, inputs)
            number = sample_of.get(step_counter[0])
            if number is not None:
                save(index, number, inputs)
                if index == last_chunk:  # what DecodeLoop hands every head graph
                    head_input = np.asarray(outputs[0]).reshape(1, 1, -1).astype(np.float32)
                    for head in range(len(loop.heads)):
                        save(last_chunk + 1 + head, number, [head_input])
            if index == last_chunk:
                step_counter[0] += 1
            return outputs

    loop.runner = Capture()
    try:
        for prompt in prompts:
            tokens = ([int(bos)] if bos is not None else []) + encode(prompt)
            while len(tokens) < steps:
                tokens += encode(" " + prompt)
            loop.reset()
            for token in tokens[:steps]:
                loop.step(token, logits=False)
    finally:
        loop.runner = inner
    return samples.datasets()


def reference_quality_logits(loop: Any, tokens: list[int]) -> Floats:
    """The float model's teacher-forced logits over ``tokens[:-1]`` (torch): the reference of the quality report."""
    logits: Floats = loop.teacher_forced_logits(tokens[:-1])
    return logits


def _export_onnx(staging: Path, graphs: list[tuple[str, Any]]) -> None:
    import torch

    for graph_name, module in graphs:
        example = tuple(torch.zeros(shape) for shape in module.input_shapes().values())
        # One folder per graph: a graph over 2 GB keeps its weights as external data files named after the
        # tensors, and the chunks' tensor names repeat (blocks.0... in every chunk).
        onnx_file = _onnx_path(staging, graph_name)
        onnx_file.parent.mkdir(parents=True)
        torch.onnx.export(module, example, str(onnx_file), opset_version=17, dynamo=False,
                          input_names=module.input_names(), output_names=module.output_names())


def _onnx_path(staging: Path, name: str) -> Path:
    return staging / "onnx" / name / f"{name}.onnx"


def _build_events(log: Callable[[str], None] | None) -> EventHandler | None:
    """The build workers' log lines and toolkit calls as ``log`` lines."""
    if log is None:
        return None

    def on_event(event: Event) -> None:
        if event.get("type") == "log":
            log(str(event.get("line", "")))
        elif event.get("type") == "progress":
            log(f"[{event.get('step')}] {event.get('state')}")

    return on_event


def _build_graph(staging: Path, name: str, request: RknnRequest, dataset: Path | None, *,
                 on_event: EventHandler | None = None, dynamic_input: list[Any] | None = None,
                 patterns: list[str] | None = None) -> dict[str, Any]:
    """Builds one graph in a build worker on the toolkit seam's runner (timeout, process-group kill, events);
    ``dynamic_input``: the shape sets of a multi-shape (fp16) graph; ``patterns``: what this graph keeps in fp16
    (default: the request's hybrid patterns)."""
    dtype = (request.head_dtype or request.dtype) if name.startswith("head") else request.dtype
    job = {"protocol": PROTOCOL, "onnx": str(_onnx_path(staging, name).resolve()), "out_dir": str(staging.resolve()),
           "name": name, "dtype": dtype, "dataset": str(dataset) if dataset else None,
           "hybrid_patterns": request.hybrid_patterns if patterns is None else patterns,
           "dynamic_input": dynamic_input, "algorithm": request.quantized_algorithm,
           "method": request.quantized_method}
    run = run_worker([sys.executable, "-m", "rkedge.convert.rknn.build_worker", "--job"], job, what="rknn-toolkit2",
                     env=child_environment(), on_event=on_event, timeout=request.build_timeout_s, cwd=staging)
    result = run.result_event
    if run.error is not None or result is None or not result.get("ok"):
        if run.killed_by_sigkill:
            fix = (f"the build needs ~{BUILD_BYTES_PER_PARAM} bytes of host RAM per parameter: pass a smaller "
                   "--graph-params, free memory or add swap (F-11)")
        elif run.timed_out:
            fix = "a graph build takes minutes (about 3 at 2b widths); look for what stalled in the log (-v)"
        else:
            fix = "rerun with the same rknn-toolkit2 version; see the toolkit's log (-v)"
        said = "".join(f"\n  the toolkit said: {line.strip()}" for line in run.log_lines[-3:] if line.strip())
        raise ToolkitError(f"rknn-toolkit2 could not build {name}: {run.error or 'no result'}{said}", fix=fix)
    return {k: v for k, v in result.items() if k not in ("type", "ok")}


def _manifest(request: RknnRequest, info: Any, dims: Any, counts: list[int], specs: list[Any],
              built: list[dict[str, Any]], tokenizer_spec: dict[str, Any], verification: dict[str, Any],
              name: str) -> dict[str, Any]:
    from rkedge.convert.chat_family import detect_family

    family = request.template or tokenizer_spec.get("chat_family")
    if family is None and info.chat_template:
        try:
            family = detect_family(info.chat_template, bos_token="<bos>", eos_token="<eos>")
        except ImportError:
            family = None
    graphs = []
    for spec, result in zip(specs, built, strict=True):
        graphs.append({"name": spec.name, "layers": list(spec.layers), "inputs": list(spec.inputs),
                       "outputs": list(spec.outputs), "shapes": {k: list(v) for k, v in spec.shapes.items()},
                       "rknn": result["rknn"], "dtype": result["dtype"], "rknn_bytes": result["rknn_bytes"],
                       "simulator": result["simulator"],
                       "fp16_tensors": result.get("fp16_tensors", []), "build_seconds": result["seconds"],
                       # RKNN layers on the NPU and ops on the CPU, from the toolkit's own layer table
                       # (rkedge.convert.rknn.layers); "layers" above are the model's layer indices
                       "rknn_layers": result.get("rknn_layers")})
    from importlib.metadata import version

    source = quantization_of(request.model)
    return {
        "schema": BUNDLE_SCHEMA, "schema_version": BUNDLE_SCHEMA_VERSION, "backend": "rknn", "name": name,
        "architecture": info.architecture, "platform": request.platform, "dtype": request.dtype,
        "hybrid": {"enabled": bool(request.hybrid_patterns), "patterns": request.hybrid_patterns,
                   "why": "keeps the RG-LRU chain, the conv1d and the recurrent and attention state I/O in fp16: "
                          "plain w8a8 lets the recurrent state drift over steps (feasibility section 5; measured by "
                          "benchmarks/bench_rknn_hybrid.py)"},
        "graphs": [g for g in graphs if not g["name"].startswith("head")],
        "heads": [g for g in graphs if g["name"].startswith("head")],
        "dims": {"hidden": dims.hidden, "lru_width": dims.lru_width, "window": dims.window,
                 "rotary_dim": dims.rotary_dim, "rope_theta": dims.rope_theta, "vocab": dims.vocab,
                 "layers": len(dims.kinds), "kinds": list(dims.kinds), "normalizer": dims.normalizer},
        "parameters": {"layers": sum(counts), "per_layer": counts},
        "embedding": {"file": "embedding.npy", "dtype": "float16", "scaled_by_normalizer": True,
                      "where": "host lookup: one row per token (a 256k-row Gather on the NPU would double the weight "
                               "memory)"},
        "lm_head": f"on the NPU in {len([g for g in graphs if g['name'].startswith('head')])} graph(s) split by "
                   "vocabulary rows (tied to the embedding; read once per token, logits concatenated on the host)",
        "tokenizer": tokenizer_spec, "chat_family": family,
        "verification": verification,
        "versions": {"rkedge": __version__, "rknn_toolkit2": version("rknn-toolkit2"),
                     "torch": version("torch"), "transformers": version("transformers")},
        "inputs": {"model": str(request.model.resolve()), "source": info.source_name,
                   "lora": str(request.lora.resolve()) if request.lora else None,
                   "source_quantization": source.to_dict() if source else None,
                   "base_model": base_model_name(request.model) if source else None},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _hybrid_note(manifest: Manifest) -> str:
    if not manifest["hybrid"]["enabled"]:
        return ""
    precision = manifest.get("precision") or {}
    if precision.get("mode") == "auto":
        return f" (hybrid: {', '.join(precision.get('chosen') or [])} in fp16, chosen by measurement)"
    return " (hybrid: RG-LRU, conv1d and state I/O in fp16)"


def _precision_lines(precision: dict[str, Any]) -> list[str]:
    """The precision choice and its verdict, as the CLI prints them (the finding carries the warning too)."""
    from rkedge.convert.rknn.precision import QualityTarget, render_table

    if not precision:
        return []
    target = precision.get("target") or {}
    goal = QualityTarget(target.get("top1", 0.95), target.get("nll_delta_pct", 1.0)).describe()
    lines = []
    if precision.get("mode") == "auto":
        chosen = precision.get("chosen") or []
        lines.append(f"fp16 parts chosen for {goal} on {precision.get('searched_on')} "
                     f"({precision.get('evaluations')} simulator runs, by {precision.get('granularity')}): "
                     f"{', '.join(chosen) or 'none (plain w8a8)'}")
        lines += ["  " + line for line in render_table(precision.get("table") or [], chosen)]
    below = precision.get("below_target")
    if below:
        lines.append(f"WARNING: below the quality target ({goal}): {'; '.join(below['shortfalls'])}; {below['try']}")
    return lines


def _card(manifest: Manifest, name: str) -> str:
    from rkedge.convert.modelcard import with_front_matter

    quality = manifest.get("quality") or {}
    lines = [f"# {name}", "",
             f"RecurrentGemma for the RK3588 NPU through rknn-toolkit2 {manifest['versions']['rknn_toolkit2']} "
             f"(RKLLM has no RG-LRU support). {len(manifest['graphs'])} layer graph(s) + {len(manifest['heads'])} "
             "LM head graph(s), chained through their states; the embedding is looked up on the host.", "",
             "| | |", "|---|---|",
             f"| dtype | {manifest['dtype']}"
             f"{_hybrid_note(manifest)} |",
             f"| decode step vs transformers | max logit difference {manifest['verification']['max_abs_diff']:.2e} |"]
    if quality:
        lines += [f"| quality ({quality['steps']} teacher-forced steps, simulator) | NLL delta "
                  f"{quality['nll_delta_pct']:+.2f}%, top-1 agreement {quality['top1_agreement'] * 100:.1f}%, "
                  f"logits cosine {quality['logits_cosine']:.4f} |"]
    prefill = manifest.get("prefill")
    if prefill:
        lines += [f"| chunked prefill | {prefill['chunk']} tokens per graph run, weights {prefill['weights']} "
                  f"(+{prefill['extra_bytes'] / 1e6:.1f} MB); max logit difference "
                  f"{prefill['verification']['max_abs_diff']:.2e} vs transformers |"]
    precision = manifest.get("precision") or {}
    below = precision.get("below_target")
    if precision.get("mode") == "auto":
        from rkedge.convert.rknn.precision import render_table

        chosen = precision.get("chosen") or []
        lines += ["", "## Precision", "",
                  f"Kept in fp16 to reach the quality target (top-1 >= {precision['target']['top1'] * 100:g}%, "
                  f"|NLL delta| <= {precision['target']['nll_delta_pct']:g}%), chosen on "
                  f"{precision.get('searched_on')}: {', '.join(chosen) or 'nothing (plain w8a8)'}.", "",
                  "```", *render_table(precision.get("table") or [], chosen), "```"]
    if below:
        lines += ["", f"> **Warning**: this build is below its quality target: {'; '.join(below['shortfalls'])}. "
                      f"{below['try'][0].upper()}{below['try'][1:]}."]
    source = (manifest.get("inputs") or {}).get("source_quantization")
    if source:
        lines += ["", f"> **Warning**: {source['warning']}."]
    lines += ["", "## Run it", "", "```sh", f"rkedge chat {name}            # on the board (RKNNLite)",
              f"rkedge chat {name} --mock     # on an x86_64 host (rknn-toolkit2 simulator)", "```", ""]
    return with_front_matter(lines, tags=["rknn", "rockchip", "rk3588", manifest["dtype"], "recurrentgemma"])
