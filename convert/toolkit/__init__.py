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
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rkedge.convert.findings import Finding
from rkedge.convert.toolkit.runner import EventHandler, child_environment, run_worker
from rkedge.convert.toolkit.worker import EXIT_BAD_JOB, EXIT_FAILED, EXIT_IMPORT, EXIT_OK, PROTOCOL
from rkedge.errors import InputError, ToolkitError

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
SIMULATED_DIR = HERE / "simulated"
DEFAULT_MOCK_VERSION = "1.3.0"
EXIT_MEANINGS = {EXIT_FAILED: "the toolkit failed", EXIT_BAD_JOB: "the worker refused the job file (a bug in rkedge)",
                 EXIT_IMPORT: "rkllm.api could not be imported in the toolkit's interpreter"}


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

    def raise_for_error(self, *, what: str = "the toolkit", said: int = 3) -> None:
        """Raises :class:`ToolkitError` when the job failed: the error, the error findings, the last ``said`` log
        lines (the toolkit's own words, which the findings paraphrase), and the first error finding's fix."""
        if self.ok:
            return
        errors = [f for f in self.findings if f.severity == "error"]
        details = "".join(f"\n{f.render()}" for f in errors)
        tail = [line.strip() for line in self.log_lines if line.strip()][-said:] if said else []
        details += "".join(f"\n  the toolkit said: {line}" for line in tail)
        fix = errors[0].fix if errors and errors[0].fix else "rerun with -v to see the toolkit's whole log"
        code = errors[0].id.lower().replace("-", "") if errors else None
        raise ToolkitError(f"{what} failed: {self.error or 'no result'}{details}", fix=fix, code=code)


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
        error, hints = import_failure(probe)
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


def import_failure(probe: Mapping[str, Any] | None, stderr: str = "") -> tuple[str, list[Finding]]:
    """Why a probed interpreter cannot import ``rkllm.api``: the error text and its findings (known toolkit texts,
    then the worker's environment problems, F-14)."""
    from rkedge.convert.toolkit.known_errors import findings_from_log

    probe = probe or {}
    error = str(probe.get("import_error") or stderr.strip()[-500:] or "no probe output")
    findings = findings_from_log([error, *stderr.splitlines()])
    findings += [Finding("F-14", "error", str(problem), None, "probe") for problem in probe.get("problems") or []
                 if str(problem) not in error and all(str(problem) != f.message for f in findings)]
    return error, findings


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
    child = child_environment()
    if env.simulated:
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


def run_job(env: ToolkitEnv, job: Mapping[str, Any], *, on_event: EventHandler | None = None,
            timeout: float | None = None, extra_env: Mapping[str, str] | None = None,
            cwd: str | os.PathLike[str] | None = None,
            job_dir: str | os.PathLike[str] | None = None) -> ToolkitResult:
    """Runs one load -> build -> export job in the toolkit's interpreter; never leaves the worker running.

    ``on_event`` is called (in this thread) for every event: ``log``, ``progress``, ``error``, ``result``.
    ``cwd`` defaults to the export folder, where the toolkit's stray files (``*.qparams``) then land.
    ``job_dir``: where the job file is written (see :func:`run_worker`).
    """
    from rkedge.convert.toolkit.known_errors import findings_from_log

    job = {"protocol": PROTOCOL, **job}
    export_path = Path(str(job.get("export", {}).get("kwargs", {}).get("export_path", "")))
    if cwd is None and export_path.parent.is_dir():
        cwd = export_path.parent
    run = run_worker([env.python, str(WORKER), "--job"], job, what="the toolkit", env=_child_env(env, extra_env),
                     on_event=on_event, timeout=timeout, cwd=cwd, exit_meanings=EXIT_MEANINGS,
                     job_dir=job_dir)
    result_event = run.result_event or {}
    ok = run.error is None and run.returncode == EXIT_OK and bool(result_event.get("ok"))
    scan = list(run.log_lines)
    if run.error_event is not None:
        scan += [str(run.error_event.get("message") or "")] + str(run.error_event.get("traceback") or "").splitlines()
        scan += [str(p) for p in run.error_event.get("problems") or []]
    findings = findings_from_log(scan)
    if not ok and run.killed_by_sigkill:
        findings.append(Finding("F-11", "error", "the toolkit was killed by SIGKILL, most likely by the kernel's "
                                "OOM killer (host memory).", "free memory or add swap, or load with dtype float16 "
                                "(1.2.0+)", "F-11"))
    return ToolkitResult(
        ok=ok, returncode=run.returncode, outputs=list(result_event.get("outputs") or []),
        calls=list(result_event.get("calls") or []), log_lines=run.log_lines, error=run.error, findings=findings,
        toolkit_version=result_event.get("toolkit_version") or env.version, error_event=run.error_event,
        timed_out=run.timed_out, duration_s=run.duration_s, pid=run.pid)


def build_job(*, load_method: str, load_kwargs: Mapping[str, Any], build_kwargs: Mapping[str, Any],
              export_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A job of the worker's protocol from the three kwargs dicts (passed verbatim: the host decides them)."""
    return {"protocol": PROTOCOL, "load": {"method": load_method, "kwargs": dict(load_kwargs)},
            "build": {"kwargs": dict(build_kwargs)}, "export": {"kwargs": dict(export_kwargs)}}


__all__ = ["ToolkitEnv", "ToolkitResult", "resolve_toolkit", "run_job", "probe_toolkit", "probe_python", "mock_env",
           "build_job", "parse_probe", "import_failure", "WORKER", "SIMULATED_DIR"]
