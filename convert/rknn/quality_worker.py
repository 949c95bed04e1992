"""Runs one bundle graph in the rknn-toolkit2 simulator over every teacher-forced step, in a child process:
``python -m rkedge.convert.rknn.quality_worker --job JOB.json``, run by :func:`run_graph` (the quality report).

Why a child per graph: the simulator rebuilds a graph with about the build's own memory (20-28 bytes per
parameter), and an ``RKNN.release()`` does not give that memory back to the OS, so graphs simulated one after
another in one process pile up (the 2b-width run reached 16 GB in its third graph). A child returns all of it
when it exits, and a native crash of the simulator (SIGSEGV) ends the child, not the conversion: the parent
reports it as an error naming the graph, and the bundle's staging folder is removed as for any failure.

The parent passes the graph's inputs through files: ``inputs`` is an .npy of the hidden vectors [steps, 1, 1,
hidden] that reach this graph; the child builds the graph, runs it step by step (a chunk keeps its own states,
from zero, exactly as :class:`rkedge.runtime.rknn.loop.DecodeLoop` does), writes ``output`` (.npy: the hidden
vectors a chunk passes on, or a head's logits [steps, vocab slice]) and exits.

Job: {"protocol", "folder", "graph": the bundle's graph entry, "kind": "chunk"|"head", "dims": the bundle's
dims, "inputs": path, "output": path}. It speaks the build worker's JSON-line protocol (events on stdout, the
toolkit's prints on stderr as log lines). Exit 0 (done), 1 (the simulator failed), 2 (bad job file).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from rkedge.convert.rknn.build_worker import serve_job
from rkedge.convert.toolkit.runner import child_environment, run_worker
from rkedge.convert.toolkit.worker import PROTOCOL
from rkedge.errors import ToolkitError

#: The command that runs a job file (appended); tests point it at a child that crashes.
WORKER_COMMAND = [sys.executable, "-m", "rkedge.convert.rknn.quality_worker", "--job"]
#: One graph's simulation: a 128k-vocabulary head slice at 2b width takes ~3 min to rebuild and ~20 s a step.
GRAPH_TIMEOUT_S = 2 * 3600


class Events:
    """The protocol stream: a copy of the real stdout, taken before fd 1 is pointed at stderr, so that what the
    simulator prints (Python and C) reaches the host as log lines. The child's stderr is left as it is (no
    capture): a native crash's last words and faulthandler's stack must reach the host."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self.stream: IO[str] = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)
        self.step: str | None = None

    def emit(self, event: dict[str, Any]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.stream.write(json.dumps(event, default=repr) + "\n")
        self.stream.flush()


def simulate(job: Mapping[str, Any], events: Events) -> dict[str, Any]:
    """Builds the job's graph in the simulator and runs it over every step of its inputs."""
    import numpy as np

    from rkedge.runtime.rknn.engine import SimulatorGraphs
    from rkedge.runtime.rknn.loop import DecodeLoop, GraphSpec, position_features

    started = time.time()
    folder = Path(job["folder"])
    graph, dims = job["graph"], job["dims"]
    xs = np.load(job["inputs"])
    events.step = "build"
    events.emit({"type": "progress", "step": "build", "state": "start", "fraction": 0.0})
    runner = SimulatorGraphs(folder, [graph])
    events.emit({"type": "progress", "step": "build", "state": "done", "fraction": 1.0})
    built = time.time()
    spec = GraphSpec.from_dict(graph)
    head = job["kind"] == "head"
    # The loop's own state handling for this one graph (the embedding is not used: the inputs are given).
    loop = DecodeLoop([] if head else [spec], [spec] if head else [], runner, np.zeros((0,), np.float32),
                      rotary_dim=dims["rotary_dim"], rope_theta=dims["rope_theta"], window=dims["window"])
    events.step = "inference"
    outputs = []
    try:
        for position, x in enumerate(xs):
            if head:
                outputs.append(loop._run_head(0, x))
            else:
                features = position_features(position, rotary_dim=loop.rotary_dim, rope_theta=loop.rope_theta,
                                             window=loop.window)
                outputs.append(loop._run_chunk(0, x, features))
            events.emit({"type": "progress", "step": "inference", "state": "running",
                         "fraction": round((position + 1) / len(xs), 4)})
    finally:
        runner.release()
    np.save(job["output"], np.stack(outputs).astype(np.float32))
    return {"graph": graph["name"], "steps": len(xs), "build_s": round(built - started, 2),
            "inference_s": round(time.time() - built, 2)}


def main(argv: list[str]) -> int:
    faulthandler.enable()  # a native crash prints the Python stack to stderr: the parent shows its last lines
    return serve_job(argv, "quality_worker", Events(), simulate)


def run_graph(folder: Path, graph: Mapping[str, Any], kind: str, dims: Mapping[str, Any], inputs: Path,
              output: Path, *, timeout: float | None = GRAPH_TIMEOUT_S) -> dict[str, Any]:
    """Simulates one graph of the bundle in ``folder`` in a child process (see the module text); returns the
    child's result. Raises ToolkitError, naming the graph and what to do, when the child fails in any way."""
    job = {"protocol": PROTOCOL, "folder": str(folder.resolve()), "graph": dict(graph), "kind": kind,
           "dims": dict(dims), "inputs": str(inputs.resolve()), "output": str(output.resolve())}
    run = run_worker(WORKER_COMMAND, job, what="the rknn-toolkit2 simulator", env=child_environment(),
                     timeout=timeout, cwd=folder, job_dir=inputs.parent)
    result = run.result_event
    if run.error is None and result is not None and result.get("ok") and output.is_file():
        return {k: v for k, v in result.items() if k not in ("type", "ok")}
    name = graph["name"]
    if run.killed_by_sigkill:
        fix = ("the simulator holds about a build's memory (~20-28 bytes per parameter of the graph): free host "
               "memory, or convert again with a smaller --graph-params")
    elif run.timed_out:
        fix = "convert again with fewer --eval-steps (each step of a 2b-width head takes ~20 s in the simulator)"
    elif run.returncode < 0:
        fix = ("the simulator crashed in native code (the conversion stopped and wrote no bundle): convert again "
               "with a smaller --graph-params (smaller graphs) or fewer --eval-steps; if it repeats, report it "
               "with the log (-v)")
    else:
        fix = "convert again with the same rknn-toolkit2 version; see the simulator's log (-v)"
    said = "".join(f"\n  the simulator said: {line.strip()}" for line in run.log_lines[-6:] if line.strip())
    raise ToolkitError(f"the quality report could not simulate graph {name}: {run.error or 'no output'}{said}",
                       fix=fix)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
