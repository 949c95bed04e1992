"""``rkedge convert MODEL --backend rknn``: RecurrentGemma -> verified decode-step graphs -> rknn-toolkit2 -> bundle.

Steps: inspect and check -> build the decode-step graphs from the model's own weights (torch) and verify them
against transformers' forward pass (max logit difference printed) -> split into graphs sized to the NPU limits and
the build host's RAM -> export ONNX -> calibrate from real decode states of a prompt set -> build each graph in its
own child process (fp16, or w8a8 with the RG-LRU path and the state I/O kept in fp16) -> measure quality against
transformers in the simulator (teacher-forced: NLL delta, top-1 agreement, logits cosine) -> write the bundle
atomically (a staging folder renamed into place) with its manifest and a model card.
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
from rkedge.convert.rknn.rules import RKNN_RULES
from rkedge.convert.toolkit.runner import Event, EventHandler, child_environment, run_worker
from rkedge.convert.toolkit.worker import PROTOCOL
from rkedge.errors import InputError, ToolkitError
from rkedge.manifest import BUNDLE_FILE, BUNDLE_SCHEMA, BUNDLE_SCHEMA_VERSION, Manifest

if TYPE_CHECKING:
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
#: A graph build that runs this long is stuck: builds at 2b widths measured 91-174 s (feasibility section 6).
BUILD_TIMEOUT_S = 2 * 3600  # the default quality report stays within about half an hour
#: Calibration runs each prompt this many decode steps at most (through the window wrap on small windows); the
#: activation ranges of a 2048-token window's k/v slots do not need the whole window filled.
CALIBRATION_MAX_STEPS = 256
#: ... and the prompt set is cut to this many decode steps in all. ~100 samples per graph are kept, so more steps
#: only cost time: 20 prompts x 256 steps took ~9 minutes of torch decode at 2b width and 3 layers, and would take
#: over an hour at full depth. The tiny test models (20 prompts x 80 steps) stay under it.
CALIBRATION_MAX_TOTAL_STEPS = 2048
#: Tensors kept in fp16 in the hybrid build: the RG-LRU chain and the conv1d before it, with their recurrent (h,
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
    fp16_patterns: tuple[str, ...] = HYBRID_PATTERNS  # what the hybrid build keeps in fp16 (benchmarks vary it)
    head_dtype: str | None = None  # the LM head graph's dtype (default: dtype)
    build_timeout_s: float | None = BUILD_TIMEOUT_S  # per graph build; the worker's process group is then killed

    @property
    def hybrid_patterns(self) -> list[str]:
        return list(self.fp16_patterns) if self.hybrid and self.dtype == "w8a8" else []


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
                "quality": self.manifest.quality if self.manifest else None}


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
        if quality:
            lines.append(f"quality ({quality['steps']} teacher-forced steps, simulator vs transformers): "
                         f"NLL {quality['nll_reference']:.4f} -> {quality['nll_graphs']:.4f} "
                         f"({quality['nll_delta_pct']:+.2f}%), perplexity {quality['perplexity_reference']:.3f} -> "
                         f"{quality['perplexity_graphs']:.3f}, top-1 agreement {quality['top1_agreement'] * 100:.1f}%, "
                         f"logits cosine {quality['logits_cosine']:.5f}")
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
    try:
        import rknn.api  # noqa: F401
    except Exception as exc:  # any import failure means no usable toolkit
        findings.append(Finding("rknn.toolkit", "error", f"rknn-toolkit2 is not importable here ({exc}).",
                                "install it: scripts/install-rknn-toolkit2.sh (x86_64, Python 3.8-3.12)", SOURCE))
    return info, findings


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
    eval_tokens = _eval_tokens(request, encode, tokenizer_spec, eval_steps)
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
            datasets = _calibration(loop, request, encode, tokenizer_spec, staging / "calibration", len(graphs))
        quality_tokens = eval_tokens[: eval_steps + 1]
        # The reference side of the quality report, computed now so the float model is gone before the builds:
        # at 2b width the parent held ~9 GB (float32 weights, embedding copies) next to a build needing ~28 bytes
        # per parameter, and the two together outgrew a 24 GB host.
        reference_logits = reference_quality_logits(loop, quality_tokens)
        np.save(staging / "embedding.npy", loop.embedding.astype(np.float16))
        specs = [graph_spec(module, graph_name) for graph_name, module in graphs]
        del model, loop, chunks, heads, modules, graphs
        gc.collect()
        built = []
        for index, spec in enumerate(specs):
            report("build", f"{spec.name} ({request.dtype}{', hybrid' if request.hybrid_patterns else ''})")
            built.append(_build_graph(staging, spec.name, request, datasets.get(index), on_event=on_event))
        for file in tokenizer_files:
            shutil.copyfile(file, staging / file.name)
        draft = _manifest(request, info, dims, counts, specs, built, tokenizer_spec, verification, name)
        shutil.rmtree(staging / "calibration", ignore_errors=True)

        report("quality", f"simulator vs transformers, {eval_steps} teacher-forced steps"
               + ("" if request.eval_steps else " (--eval-steps to change)"))
        from rkedge.convert.rknn.quality import measure_quality

        quality = measure_quality(staging, draft, reference_logits, quality_tokens)
        manifest = Manifest.from_dict({**draft, "quality": quality,
                                       "wall_time_s": round(time.monotonic() - started, 1)}, backend="rknn")
        (staging / BUNDLE_FILE).write_text(manifest.to_json(), encoding="utf-8")
        (staging / "README.md").write_text(_card(manifest, name), encoding="utf-8")
    return RknnResult(final, findings, manifest, steps, request=request)


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


def _eval_tokens(request: RknnRequest, encode: Callable[[str], list[int]], spec: dict[str, Any],
                 steps: int) -> list[int]:
    text = Path(request.eval_text).read_text(encoding="utf-8", errors="replace") if request.eval_text \
        else DEFAULT_EVAL_TEXT
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


def _calibration(loop: Any, request: RknnRequest, encode: Callable[[str], list[int]], spec: dict[str, Any],
                 folder: Path, graph_count: int) -> dict[int, Path]:
    """Real decode-step inputs of every graph, captured from torch trajectories over a prompt set (positions from 0,
    through the attention window wrap), written as one .npy per input and one dataset line per sample.

    Streamed: the steps to keep are known before the first one runs (every prompt runs the same number of steps),
    so each kept sample goes to disk as it is captured and the rest are never held. Holding every step's inputs
    took ~4 MB per step per attention graph at 2b width (a 2047-slot k/v window), 24 GB for 20 prompts; now the
    host holds one step. The LM head graphs are not run: their input is the last chunk's output."""
    import numpy as np

    from rkedge.convert import calibration as calib

    items = calib.load_prompts(request.calibration)
    prompts = [item.get("prompt") or item.get("input") or "" for item in items]
    bos = spec.get("bos_token_id")
    steps = min(loop.window + 16, CALIBRATION_MAX_STEPS)
    prompts = prompts[: max(1, CALIBRATION_MAX_TOTAL_STEPS // steps)]
    sample_of = {step: number for number, step in enumerate(calibration_sample_steps(len(prompts) * steps))}
    specs = [*loop.chunks, *loop.heads]
    last_chunk = len(loop.chunks) - 1
    folder.mkdir(parents=True, exist_ok=True)
    lines: dict[int, list[str]] = {i: [] for i in range(graph_count)}

    def save(index: int, number: int, inputs: list[Floats]) -> None:
        paths = []
        for input_name, array in zip(specs[index].inputs, inputs, strict=True):
            path = folder / f"g{index}_{number}_{input_name}.npy"
            np.save(path, np.asarray(array).astype(np.float32))
            paths.append(str(path.resolve()))
        lines[index].append(" ".join(paths))

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
    datasets = {}
    for index, graph_lines in lines.items():
        dataset = folder / f"dataset_{index}.txt"
        dataset.write_text("\n".join(graph_lines) + "\n")
        datasets[index] = dataset
    return datasets


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
                 on_event: EventHandler | None = None) -> dict[str, Any]:
    """Builds one graph in a build worker on the toolkit seam's runner (timeout, process-group kill, events)."""
    dtype = (request.head_dtype or request.dtype) if name.startswith("head") else request.dtype
    job = {"protocol": PROTOCOL, "onnx": str(_onnx_path(staging, name).resolve()), "out_dir": str(staging.resolve()),
           "name": name, "dtype": dtype, "dataset": str(dataset) if dataset else None,
           "hybrid_patterns": request.hybrid_patterns}
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


def _card(manifest: Manifest, name: str) -> str:
    from rkedge.convert.modelcard import with_front_matter

    quality = manifest.get("quality") or {}
    lines = [f"# {name}", "",
             f"RecurrentGemma for the RK3588 NPU through rknn-toolkit2 {manifest['versions']['rknn_toolkit2']} "
             f"(RKLLM has no RG-LRU support). {len(manifest['graphs'])} layer graph(s) + {len(manifest['heads'])} "
             "LM head graph(s), chained through their states; the embedding is looked up on the host.", "",
             "| | |", "|---|---|",
             f"| dtype | {manifest['dtype']}"
             f"{' (hybrid: RG-LRU, conv1d and state I/O in fp16)' if manifest['hybrid']['enabled'] else ''} |",
             f"| decode step vs transformers | max logit difference {manifest['verification']['max_abs_diff']:.2e} |"]
    if quality:
        lines += [f"| quality ({quality['steps']} teacher-forced steps, simulator) | NLL delta "
                  f"{quality['nll_delta_pct']:+.2f}%, top-1 agreement {quality['top1_agreement'] * 100:.1f}%, "
                  f"logits cosine {quality['logits_cosine']:.4f} |"]
    source = (manifest.get("inputs") or {}).get("source_quantization")
    if source:
        lines += ["", f"> **Warning**: {source['warning']}."]
    lines += ["", "## Run it", "", "```sh", f"rkedge chat {name}            # on the board (RKNNLite)",
              f"rkedge chat {name} --mock     # on an x86_64 host (rknn-toolkit2 simulator)", "```", ""]
    return with_front_matter(lines, tags=["rknn", "rockchip", "rk3588", manifest["dtype"], "recurrentgemma"])
