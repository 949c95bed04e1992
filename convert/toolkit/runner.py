"""One runner for every out-of-process toolkit worker (rkllm-toolkit's ``worker.py``, rknn-toolkit2's
``build_worker``): a job file in, JSON-line events out, an exit code.

The worker runs in its own process group, so a timeout, an interrupt or an exception in ``on_event`` stops it
and everything it started; a worker that dies by SIGKILL is reported as probably OOM-killed (F-11), since that is
what the kernel's OOM killer sends. Events are JSON objects with a ``type`` (``log``, ``progress``, ``error``,
``result``) on the worker's stdout; any other line, on stdout or stderr, becomes a ``log`` event.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

#: One decoded JSON-line event; its fields are the worker's (see worker.py's docstring).
Event = dict[str, Any]
EventHandler = Callable[[Event], None]
#: Job files are named ``rkedge-job-*.json`` (the next run's cleanup and tests look for this).
JOB_FILE_PREFIX = "rkedge-job-"
JOB_FILE_GLOB = f"{JOB_FILE_PREFIX}*.json"


@dataclass
class WorkerRun:
    """What one worker process did, before any toolkit-specific reading of it."""

    returncode: int
    log_lines: list[str]
    error_event: Event | None
    result_event: Event | None
    timed_out: bool
    step: str | None  # the step the worker was in last (progress and error events name it)
    duration_s: float
    pid: int
    error: str | None  # None when the worker exited 0 with a result event and no error event

    @property
    def killed_by_sigkill(self) -> bool:
        """SIGKILL from outside the runner: most likely the kernel's OOM killer."""
        return not self.timed_out and self.returncode == -signal.SIGKILL


def run_worker(argv: Sequence[str], job: Mapping[str, Any], *, what: str, env: Mapping[str, str],
               on_event: EventHandler | None = None, timeout: float | None = None,
               cwd: str | os.PathLike[str] | None = None, exit_meanings: Mapping[int, str] | None = None,
               job_dir: str | os.PathLike[str] | None = None) -> WorkerRun:
    """Writes ``job`` to a temporary file, runs ``[*argv, JOB_FILE]`` and returns when it and its group are gone.

    ``what`` names the worker in error texts ("the toolkit", "rknn-toolkit2"). ``on_event`` is called in this
    thread for every event. ``job_dir``: where the job file goes (default: the system temp folder). A caller
    with a work folder passes it, so a job file left by a SIGKILLed parent is inside that folder, where the next
    run's cleanup (``JOB_FILE_GLOB``) finds it, not in /tmp for ever.
    """
    started = time.monotonic()
    handle, job_file = tempfile.mkstemp(prefix=JOB_FILE_PREFIX, suffix=".json",
                                        dir=None if job_dir is None else os.fspath(job_dir))
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(job, out, indent=1)
    lines: list[str] = []
    error_event: Event | None = None
    result_event: Event | None = None
    try:
        proc = subprocess.Popen([*argv, job_file], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(env), cwd=cwd,
                                start_new_session=True)  # own process group: killable as a whole
        events = _EventPump(proc)
        try:
            for event in events.iterate(deadline=None if timeout is None else started + timeout):
                kind = event.get("type")
                if kind == "log":
                    lines.append(str(event.get("line", "")))
                elif kind == "error":
                    error_event = event
                elif kind == "result":
                    result_event = event
                if on_event is not None:
                    on_event(event)
            if events.timed_out:
                _kill_group(proc)
            returncode = proc.wait()
            _reap_group(proc.pid)  # anything the toolkit started and left behind
        except BaseException:  # KeyboardInterrupt, or an exception from on_event
            _kill_group(proc)
            raise
        finally:
            events.close()
    finally:
        with contextlib.suppress(FileNotFoundError):  # the worker may have deleted it once read
            os.unlink(job_file)

    step = events.step or "?"
    error: str | None = None
    if events.timed_out:
        error = f"{what} did not finish within {timeout:g} s and was stopped (step: {step})"
    elif returncode < 0:
        error = f"{what} worker was killed by {_signal_name(-returncode)} during step {step}"
        if -returncode == signal.SIGKILL:
            error += " (the kernel's OOM killer sends SIGKILL: host memory, F-11)"
    elif error_event is not None:
        error = str(error_event.get("message") or f"{what} failed")
    elif returncode != 0 or result_event is None:
        meaning = (exit_meanings or {}).get(returncode, "no result")
        error = f"{what} worker exited with code {returncode} ({meaning})"
    return WorkerRun(returncode=returncode, log_lines=lines, error_event=error_event, result_event=result_event,
                     timed_out=events.timed_out, step=events.step, duration_s=round(time.monotonic() - started, 3),
                     pid=proc.pid, error=error)


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a worker in rkedge's own interpreter: UTF-8, unbuffered."""
    child = dict(os.environ)
    child["PYTHONIOENCODING"] = "utf-8"
    child["PYTHONUNBUFFERED"] = "1"
    child.update(extra or {})
    return child


class _EventPump:
    """Reads the worker's stdout (events) and stderr (log lines) on threads; yields events in this thread."""

    _END: Event = {"type": "__end__"}  # compared by identity

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.queue: queue.Queue[Event] = queue.Queue()
        self.timed_out = False
        self.step: str | None = None
        self.threads = [threading.Thread(target=self._pump, args=(proc.stdout, "stdout"), daemon=True),
                        threading.Thread(target=self._pump, args=(proc.stderr, "stderr"), daemon=True)]
        for thread in self.threads:
            thread.start()

    def _pump(self, stream: IO[bytes], name: str) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                event: object = None
                if name == "stdout" and line.startswith("{"):
                    try:
                        event = json.loads(line)
                    except ValueError:
                        event = None
                if not isinstance(event, dict) or "type" not in event:
                    if not line.strip():
                        continue
                    event = {"type": "log", "line": line, "stream": name}
                self.queue.put(event)
        finally:
            self.queue.put(self._END)

    def iterate(self, deadline: float | None) -> Iterator[Event]:
        ended = 0
        while ended < len(self.threads):
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                self.timed_out = True
                return
            try:
                event = self.queue.get(timeout=wait)
            except queue.Empty:
                self.timed_out = True
                return
            if event is self._END:
                ended += 1
                continue
            if event.get("type") == "progress" or (event.get("type") == "error" and event.get("step")):
                self.step = event.get("step")
            yield event

    def close(self) -> None:
        for thread in self.threads:
            thread.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the worker's process group, SIGKILL if it is still there after 5 s."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _reap_group(pgid: int) -> None:
    """SIGKILL to what is left of the worker's own process group (the worker itself has been reaped)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"

