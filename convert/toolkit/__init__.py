"""The toolkit seam: run rkllm-toolkit (real or simulated) in its own interpreter through ``worker.py``.

The real toolkit pins old torch/transformers, so it runs in its own venv (``rkedge toolkit install``, see
:mod:`.environments`); the simulated one (``--toolkit mock``) runs in rkedge's own interpreter with the
``simulated`` folder (a package named ``rkllm``) on its path. Both are driven the same way: a job file in,
JSON-lines events out (see :mod:`.worker`), and an exit code. Importing this package needs no torch::

    env = resolve_toolkit("mock", "1.2.3")
    result = run_job(env, job, on_event=print, timeout=3600)
    result.raise_for_error()
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rkedge.convert.findings import Finding
from rkedge.errors import InputError, ToolkitError

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
SIMULATED_DIR = HERE / "simulated"
PROTOCOL = 1
DEFAULT_MOCK_VERSION = "1.3.0"
EXIT_MEANINGS = {1: "the toolkit failed", 2: "the worker refused the job file (a bug in rkedge)",
                 3: "rkllm.api could not be imported in the toolkit's interpreter"}


@dataclass(frozen=True)
class ToolkitEnv:
    """An interpreter that can run the worker: the simulated toolkit (``mock``) or a real toolkit venv."""

    kind: Literal["mock", "python"]
    python: str
    version: str
    label: str
    probe: Mapping[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def simulated(self) -> bool:
        return self.kind == "mock"


@dataclass
class ToolkitResult:
    """What one job did. ``calls`` are the toolkit calls exactly as made (kwargs verbatim)."""

    ok: bool
    returncode: int | None
    outputs: list[dict[str, Any]]
    calls: list[dict[str, Any]]
    log_lines: list[str]
    error: str | None
    findings: list[Finding]
    toolkit_version: str | None = None
    error_event: dict[str, Any] | None = None
    timed_out: bool = False
    duration_s: float = 0.0
    pid: int | None = None  # the worker's process id (its process group is gone when run_job returns)

    def raise_for_error(self) -> None:
        """Raises :class:`ToolkitError` with the first error finding's fix when the job failed."""
        if self.ok:
            return
        errors = [f for f in self.findings if f.severity == "error"]
        details = "".join(f"\n{f.render()}" for f in errors)
        fix = errors[0].fix if errors and errors[0].fix else "read the toolkit log above"
        code = errors[0].id.lower().replace("-", "") if errors else None
        raise ToolkitError(f"{self.error or 'the toolkit failed'}{details}", fix=fix, code=code)


def mock_env(version: str | None = None) -> ToolkitEnv:
    """The simulated toolkit, simulating ``version`` (any of ``rules.TOOLKIT_VERSIONS``; default 1.3.0)."""
    from rkedge.convert.rules import TOOLKIT_VERSIONS

    version = version or DEFAULT_MOCK_VERSION
    if version not in TOOLKIT_VERSIONS:
        raise InputError(f"the simulated toolkit cannot simulate version {version!r}.",
                         fix=f"use --toolkit-version with one of: {', '.join(TOOLKIT_VERSIONS)}")
    return ToolkitEnv("mock", sys.executable, version, f"simulated rkllm-toolkit {version} (mock)")


def resolve_toolkit(spec: str | None, version: str | None) -> ToolkitEnv:
    """The toolkit environment for ``--toolkit SPEC`` and ``--toolkit-version VERSION``.

    ``spec``: ``"mock"``; the path of a Python interpreter that has rkllm-toolkit (probed); a version installed
    with ``rkedge toolkit install``; or None for the newest installed environment.

    Raises:
        InputError: no usable environment, a version that contradicts the installed toolkit, or an interpreter
            that cannot import ``rkllm.api`` (F-14).
    """
    from rkedge.convert.rules import version_key
    from rkedge.convert.toolkit.environments import newest_toolkit, toolkits_root

    if spec == "mock":
        return mock_env(version)
    if spec is None or (os.sep not in spec and newest_toolkit(version=spec) is not None):
        wanted = version if spec is None else spec
        if spec is not None and version is not None and version_key(version) != version_key(spec):
            raise InputError(f"--toolkit {spec} and --toolkit-version {version} contradict each other.",
                             fix="pass one of them")
        record = newest_toolkit(version=wanted)
        if record is None:
            where = toolkits_root()
            what = f"rkllm-toolkit {wanted}" if wanted else "rkllm-toolkit"
            raise InputError(f"no {what} environment is installed (looked in {where}).",
                             fix="install the wheel: `rkedge toolkit install rkllm_toolkit-<version>-cp<XY>-cp<XY>-"
                                 "linux_x86_64.whl`, pass --toolkit /path/to/python of an environment that has it, "
                                 "or use the simulated toolkit with --toolkit mock")
        return ToolkitEnv("python", record.python, record.version,
                          f"rkllm-toolkit {record.version} ({record.venv})", probe=record.probe or None)
    import shutil

    python = Path(spec).expanduser()
    if not python.exists() and os.sep not in spec and shutil.which(spec):
        python = Path(shutil.which(spec) or spec)  # a command name such as python3.10
    if not python.exists():
        raise InputError(f"--toolkit {spec}: no such interpreter, installed toolkit version or 'mock'.",
                         fix="pass the path of the toolkit venv's python, an installed version (`rkedge toolkit "
                             "list`), or mock")
    probe = probe_python(str(python))
    probed = probe.get("toolkit_version")
    if not probe.get("import_ok"):
        from rkedge.convert.toolkit.known_errors import findings_from_log

        error = probe.get("import_error") or "unknown error"
        hints = findings_from_log([error]) + [Finding("F-14", "error", problem, None, "probe")
                                              for problem in probe.get("problems", []) if problem not in error]
        raise InputError(f"{python} cannot import rkllm.api ({error})."
                         + "".join(f"\n  {h.id}: {h.message}" for h in hints),
                         fix="install the toolkit into its own venv with `rkedge toolkit install WHEEL`, or use "
                             "--toolkit mock")
    if probed is None:
        if version is None:
            raise InputError(f"{python} has rkllm.api but reports no rkllm-toolkit version.",
                             fix="pass --toolkit-version with the version of the installed wheel")
        probed = version
    elif version is not None and version_key(version) != version_key(probed):
        raise InputError(f"--toolkit-version {version} does not match the rkllm-toolkit installed in {python} "
                         f"({probed}).", fix=f"drop --toolkit-version or pass {probed}: the rules used to check the "
                                             "request must be those of the toolkit that runs it")
    return ToolkitEnv("python", str(python), probed, f"rkllm-toolkit {probed} ({python})"
                      + (" [simulated]" if probe.get("simulated") else ""), probe=probe)


def parse_probe(stdout: str) -> dict[str, Any] | None:
    """The worker's probe line in ``stdout`` (other lines are ignored), or None."""
    for line in reversed(stdout.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and value.get("type") == "probe":
            return value
    return None


def _child_env(env: ToolkitEnv, extra_env: Mapping[str, str] | None) -> dict[str, str]:
    child = dict(os.environ)
    child["PYTHONIOENCODING"] = "utf-8"
    child["PYTHONUNBUFFERED"] = "1"
    if env.kind == "mock":
        # Same interpreter, so site-packages (and an installed or editable rkedge) come along; add the sys.path
        # entries this process found rkedge in, for a checkout used without installing.
        paths = [str(SIMULATED_DIR)] + [p for p in sys.path if p and (Path(p) / "rkedge" / "__init__.py").is_file()]
        if child.get("PYTHONPATH"):
            paths.append(child["PYTHONPATH"])
        child["PYTHONPATH"] = os.pathsep.join(paths)
        child["RKEDGE_SIM_TOOLKIT_VERSION"] = env.version
    else:
        # The toolkit's venv must see only its own packages.
        child.pop("PYTHONPATH", None)
        child.pop("PYTHONHOME", None)
    child.update(extra_env or {})
    return child


def probe_python(python: str, *, extra_env: Mapping[str, str] | None = None, timeout: float = 600) -> dict[str, Any]:
    """Runs ``worker.py --probe`` with ``python`` (importing a real toolkit imports torch: allow time)."""
    return probe_toolkit(ToolkitEnv("python", python, "?", python), extra_env=extra_env, timeout=timeout)


def probe_toolkit(env: ToolkitEnv, *, extra_env: Mapping[str, str] | None = None,
                  timeout: float = 600) -> dict[str, Any]:
    """The probe line of an environment (``import_ok`` false when ``rkllm.api`` does not import).

    Raises:
        InputError: the interpreter cannot be run or printed no probe line.
    """
    try:
        done = subprocess.run([env.python, str(WORKER), "--probe"], capture_output=True, text=True, timeout=timeout,
                              env=_child_env(env, extra_env), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InputError(f"cannot probe the toolkit interpreter {env.python}: {exc}",
                         fix="pass the path of a working Python interpreter") from exc
    probe = parse_probe(done.stdout)
    if probe is None:
        raise InputError(f"{env.python} printed no probe line (exit {done.returncode}): "
                         f"{(done.stderr or done.stdout).strip()[-800:]}",
                         fix="the interpreter must be CPython 3.8 or newer")
    probe["returncode"] = done.returncode
    return probe


def run_job(env: ToolkitEnv, job: dict[str, Any], *, on_event: Callable[[dict[str, Any]], None] | None = None,
            timeout: float | None = None, extra_env: Mapping[str, str] | None = None,
            cwd: str | os.PathLike[str] | None = None) -> ToolkitResult:
    """Runs one load -> build -> export job in the toolkit's interpreter; never leaves the worker running.

    ``on_event`` is called (in this thread) for every event: ``log``, ``progress``, ``error``, ``result``.
    ``cwd`` defaults to the export folder, where the toolkit's stray files (``*.qparams``) then land.
    """
    from rkedge.convert.toolkit.known_errors import findings_from_log

    job = {"protocol": PROTOCOL, **job}
    export_path = Path(str(job.get("export", {}).get("kwargs", {}).get("export_path", "")))
    if cwd is None and export_path.parent.is_dir():
        cwd = export_path.parent
    started = time.monotonic()
    handle, job_file = tempfile.mkstemp(prefix="rkedge-job-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(job, out, indent=1)
    lines: list[str] = []
    calls: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    error_event: dict[str, Any] | None = None
    result_event: dict[str, Any] | None = None
    timed_out = False
    try:
        proc = subprocess.Popen([env.python, str(WORKER), "--job", job_file], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env(env, extra_env),
                                cwd=cwd, start_new_session=True)  # own process group: killable as a whole
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
            timed_out = events.timed_out
            if timed_out:
                _kill_group(proc)
            returncode = proc.wait()
            _reap_group(proc.pid)  # anything the toolkit started and left behind
        except BaseException:  # KeyboardInterrupt, or an exception from on_event
            _kill_group(proc)
            raise
        finally:
            events.close()
    finally:
        os.unlink(job_file)

    error: str | None = None
    if result_event is not None:
        outputs = list(result_event.get("outputs") or [])
        calls = list(result_event.get("calls") or [])
    if timed_out:
        error = f"the toolkit did not finish within {timeout:g} s and was stopped (step: {events.step or '?'})"
    elif returncode < 0:
        name = _signal_name(-returncode)
        error = f"the toolkit worker was killed by {name} during step {events.step or '?'}"
        if -returncode == signal.SIGKILL:
            error += " (the kernel's OOM killer sends SIGKILL: host memory, F-11)"
    elif error_event is not None:
        error = str(error_event.get("message") or "the toolkit failed")
    elif returncode != 0 or result_event is None:
        error = f"the toolkit worker exited with code {returncode} ({EXIT_MEANINGS.get(returncode, 'no result')})"
    ok = error is None and returncode == 0 and bool(result_event and result_event.get("ok"))
    scan = list(lines)
    if error_event is not None:
        scan += [str(error_event.get("message") or "")] + str(error_event.get("traceback") or "").splitlines()
        scan += [str(p) for p in error_event.get("problems") or []]
    findings = findings_from_log(scan)
    if not ok and not timed_out and returncode == -signal.SIGKILL:
        findings.append(Finding("F-11", "error", "the toolkit was killed by SIGKILL, most likely by the kernel's "
                                "OOM killer (host memory).", "free memory or add swap, or load with dtype float16 "
                                "(1.2.0+)", "F-11"))
    return ToolkitResult(
        ok=ok, returncode=returncode, outputs=outputs, calls=calls, log_lines=lines,
        error=error, findings=findings,
        toolkit_version=(result_event or {}).get("toolkit_version") or env.version, error_event=error_event,
        timed_out=timed_out, duration_s=round(time.monotonic() - started, 3), pid=proc.pid)


class _EventPump:
    """Reads the worker's stdout (events) and stderr (log lines) on threads; yields events in this thread."""

    _END = object()

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        import queue

        self.proc = proc
        self.queue: queue.Queue[Any] = queue.Queue()
        self.timed_out = False
        self.step: str | None = None
        self.threads = [threading.Thread(target=self._pump, args=(proc.stdout, "stdout"), daemon=True),
                        threading.Thread(target=self._pump, args=(proc.stderr, "stderr"), daemon=True)]
        for thread in self.threads:
            thread.start()

    def _pump(self, stream: Any, name: str) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                event: Any = None
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

    def iterate(self, deadline: float | None) -> Any:
        import queue

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
            if event.get("type") == "progress":
                self.step = event.get("step")
            elif event.get("type") == "error" and event.get("step"):
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


def build_job(*, load_method: str, load_kwargs: Mapping[str, Any], build_kwargs: Mapping[str, Any],
              export_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A protocol-1 job from the three kwargs dicts (passed verbatim: the host decides them)."""
    return {"protocol": PROTOCOL, "load": {"method": load_method, "kwargs": dict(load_kwargs)},
            "build": {"kwargs": dict(build_kwargs)}, "export": {"kwargs": dict(export_kwargs)}}


__all__ = ["ToolkitEnv", "ToolkitResult", "resolve_toolkit", "run_job", "probe_toolkit", "probe_python", "mock_env",
           "build_job", "parse_probe", "WORKER", "SIMULATED_DIR"]
