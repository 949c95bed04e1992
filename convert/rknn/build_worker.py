"""Builds one decode-step graph with rknn-toolkit2 in a child process:
``python -m rkedge.convert.rknn.build_worker --job JOB.json``, run by :func:`rkedge.convert.toolkit.runner.run_worker`.

A child per graph keeps the host's memory to one graph's build (rknn-toolkit2 needs ~20-28 bytes per parameter;
recurrentgemma-rknn-feasibility.md section 6) and its working folder to itself (hybrid quantization writes its
``.model``/``.data``/``.quantization.cfg`` into the current folder). rknn-toolkit2 both raises and returns -1 on
failure; both become an error here.

It speaks the rkllm worker's JSON-line protocol (``toolkit/worker.py``): the real stdout carries only events
(``progress`` per toolkit call, then ``result`` or ``error``); everything the toolkit prints goes to stderr and
reaches the host as ``log`` events. Exit 0 (built), 1 (the toolkit failed), 2 (bad job file).

Job: {"protocol", "onnx", "out_dir", "name", "dtype": "fp16"|"w8a8", "dataset": path|null,
"hybrid_patterns": [regex...], "algorithm": "normal", "method": "channel", "dynamic_input": [[shape...]...] | null (fp16 only)}.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from rkedge.convert.rknn.layers import LOG_LEVEL_ENV, ToolkitStdout
from rkedge.convert.toolkit.worker import EXIT_BAD_JOB, EXIT_FAILED, EXIT_OK, PROTOCOL, exit_with_parent

CFG_HEADER = "custom_quantize_layers: {}\n"


def hybrid_keys(cfg_text: str, patterns: list[str]) -> list[str]:
    """The int8 tensors of a step-1 quantization cfg whose names match ``patterns`` (raw graph inputs and float
    tensors are not valid operands for custom_quantize_layers)."""
    entries = re.findall(r"^    ([^ ].*):\n(?:        (?!dtype).*\n)*        dtype: (\w+)", cfg_text, re.M)
    return [key for key, dtype in entries if dtype == "int8" and any(re.search(p, key) for p in patterns)]


def edit_cfg(cfg: Path, patterns: list[str]) -> list[str]:
    """Marks the matching tensors float16. Only the first line is rewritten: the toolkit refuses a cfg whose
    other values were re-serialised ('... is not allowed to be modified')."""
    text = cfg.read_text(encoding="utf-8")
    if not text.startswith(CFG_HEADER):
        raise RuntimeError(f"unexpected quantization cfg layout in {cfg}")
    keys = hybrid_keys(text, patterns)
    block = "custom_quantize_layers:\n" + "".join(f"    '{key}': float16\n" for key in keys) if keys else CFG_HEADER
    cfg.write_text(block + text[len(CFG_HEADER):], encoding="utf-8")
    return keys


class Events:
    """The protocol stream: a copy of the real stdout, taken before fd 1 is pointed at stderr."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self.stream: IO[str] = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        # the toolkit's prints (Python and C) become log lines on stderr, read on the way for the layer table
        self.toolkit = ToolkitStdout(forward_fd=2)
        self.step: str | None = None

    def emit(self, event: dict[str, Any]) -> None:
        self.toolkit.sync()  # what the toolkit printed before this event reaches the host before it
        sys.stderr.flush()
        self.stream.write(json.dumps(event, default=repr) + "\n")
        self.stream.flush()

    def call(self, step: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One toolkit call between progress events; a return value other than 0 is a failure."""
        self.step = step
        self.emit({"type": "progress", "step": step, "state": "start", "fraction": 0.0})
        ret = function(*args, **kwargs)
        if ret != 0:
            raise RuntimeError(f"rknn-toolkit2 {step} returned {ret}")
        self.emit({"type": "progress", "step": step, "state": "done", "fraction": 1.0, "ret": ret})
        return ret


def build(job: dict[str, Any], events: Events) -> dict[str, Any]:
    os.environ.update(LOG_LEVEL_ENV)  # librknnc prints its layer table (rkedge.convert.rknn.layers); before import
    from rknn.api import RKNN

    out = Path(job["out_dir"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    name = job["name"]
    onnx = Path(job["onnx"]).resolve()
    started = time.time()
    result: dict[str, Any] = {"name": name, "dtype": job["dtype"], "rknn": f"{name}.rknn"}
    rknn = RKNN(verbose=False)
    if job["dtype"] == "fp16":
        # dynamic_input: one model for several input shapes, one copy of the weights (a prefill graph for T and 1)
        shapes = {"dynamic_input": job["dynamic_input"]} if job.get("dynamic_input") else {}
        events.call("config", rknn.config, target_platform="rk3588", **shapes)
        events.call("load_onnx", rknn.load_onnx, model=str(onnx))
        events.call("build", rknn.build, do_quantization=False)
        result["simulator"] = {"build": "float", "onnx": onnx.relative_to(out).as_posix(), **shapes}
    else:
        events.call("config", rknn.config, target_platform="rk3588", quantized_dtype="w8a8",
                    quantized_algorithm=job.get("algorithm", "normal"),
                    quantized_method=job.get("method", "channel"))
        events.call("load_onnx", rknn.load_onnx, model=str(onnx))
        events.call("hybrid_quantization_step1", rknn.hybrid_quantization_step1, dataset=job["dataset"])
        rknn.release()
        stem = onnx.stem
        model, data, cfg = (out / f"{stem}.model", out / f"{stem}.data", out / f"{stem}.quantization.cfg")
        keys = edit_cfg(cfg, job.get("hybrid_patterns") or [])
        # step 2 takes its config from step 1's files (calling config again can clash); verbose, because step 2
        # prints its layer table only then (it loads no ONNX, so verbose dumps no check*.onnx files here)
        rknn = RKNN(verbose=True)
        events.call("hybrid_quantization_step2", rknn.hybrid_quantization_step2, model_input=str(model),
                    data_input=str(data), model_quantization_cfg=str(cfg))
        result["simulator"] = {"build": "hybrid", "model": model.name, "data": data.name, "cfg": cfg.name}
        result["fp16_tensors"] = keys
    events.call("export_rknn", rknn.export_rknn, str(out / f"{name}.rknn"))
    rknn.release()
    layers = events.toolkit.count()  # None when the toolkit printed no table (an older or a stand-in toolkit)
    result["rknn_layers"] = layers.to_dict() if layers else None
    events.emit({"type": "layers", "graph": name, **(layers.to_dict() if layers else {"npu": None, "cpu": None})})
    result["seconds"] = round(time.time() - started, 2)
    result["rknn_bytes"] = (out / f"{name}.rknn").stat().st_size
    return result


def read_job(path: str) -> dict[str, Any]:
    job = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(job, dict) or job.get("protocol") != PROTOCOL:
        raise ValueError(f"job protocol {job.get('protocol') if isinstance(job, dict) else None!r} is not "
                         f"supported (this worker speaks {PROTOCOL})")
    return job


class JobEvents(Protocol):
    step: str | None

    def emit(self, event: dict[str, Any]) -> None: ...


def serve_job(argv: list[str], worker: str, events: JobEvents,
              work: Callable[[dict[str, Any], Any], dict[str, Any]]) -> int:
    """The job protocol of both RKNN workers (this one and the quality worker): read the job file named by
    ``--job``, run ``work(job, events)``, report one error event or one result event; the exit code says which."""
    if len(argv) != 2 or argv[0] != "--job":
        events.emit({"type": "error", "step": "job", "message": f"usage: {worker} --job JOB.json"})
        return EXIT_BAD_JOB
    try:
        job = read_job(argv[1])
    except (OSError, ValueError) as exc:
        events.emit({"type": "error", "step": "job", "message": f"cannot read job file {argv[1]}: {exc}"})
        return EXIT_BAD_JOB
    exit_with_parent()
    try:
        result = work(job, events)
    except Exception as exc:  # any failure is reported to the parent as an event
        events.emit({"type": "error", "step": events.step, "message": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()})
        return EXIT_FAILED
    events.emit({"type": "result", "ok": True, **result})
    return EXIT_OK


def main(argv: list[str]) -> int:
    return serve_job(argv, "build_worker", Events(), build)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
