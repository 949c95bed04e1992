"""The toolkit worker: runs inside the rkllm-toolkit's own interpreter and speaks rkedge's JSON-lines protocol.

STANDARD LIBRARY ONLY, Python 3.8 syntax: this file is executed by the toolkit's venv (CPython 3.8 - 3.12,
pinned torch/transformers), never imported there. Usage::

    PYTHON worker.py --probe          # one {"type": "probe", ...} line; exit 0, or 3 if rkllm.api won't import
    PYTHON worker.py --job JOB.json   # runs load -> build -> export; events on stdout

Events (one JSON object per line on the real stdout): ``log`` (every line the toolkit printed on fd 1 or 2,
split on \\n and \\r so tqdm updates arrive one by one), ``progress`` (step load|build|export, state
start|update|done, fraction), then ``result`` (exit 0) or ``error`` (exit 1). Exit 2: bad job file; exit 3:
``from rkllm.api import RKLLM`` failed. Keyword arguments reach the toolkit verbatim: the host decides them.
"""

import codecs
import json
import os
import platform
import re
import sys
import threading
import time
import traceback

# Types for the type comments (annotations would be evaluated on Python 3.8, which lacks PEP 604 and 585).
from types import ModuleType  # noqa: F401
from typing import Any, Dict, List, Optional  # noqa: F401

PROTOCOL = 1
STEPS = (("load", None), ("build", "build"), ("export", "export_rkllm"))
LOAD_METHODS = ("load_huggingface", "load_gguf")
EXIT_OK, EXIT_FAILED, EXIT_BAD_JOB, EXIT_IMPORT = 0, 1, 2, 3

_TQDM_COUNT = re.compile(r"(?<![\w./])(\d+)/(\d+)(?![\w/.])")
_PERCENT = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)%")


def toolkit_version(rkllm_module=None):
    # type: (Optional[ModuleType]) -> Optional[str]
    """The installed rkllm-toolkit version: the simulated toolkit's own, the distribution's, or rkllm.__version__."""
    from importlib import metadata

    if rkllm_module is not None and getattr(rkllm_module, "__rkedge_simulated__", False):
        return _version_attribute(rkllm_module)
    for name in ("rkllm-toolkit", "rkllm_toolkit"):
        try:
            return metadata.version(name)
        except Exception:
            pass
    return _version_attribute(rkllm_module) if rkllm_module is not None else None


def _version_attribute(module):
    # type: (ModuleType) -> Optional[str]
    value = getattr(module, "__version__", None)
    return str(value) if value is not None else None


def environment_problems(import_error=None):
    # type: (Optional[str]) -> List[str]
    """Known environment failures (F-14) as short texts."""
    problems = []
    if platform.machine() not in ("x86_64", "AMD64"):
        problems.append(f"F-14: rkllm-toolkit wheels exist for linux x86_64 only; this machine is {platform.machine()} (rknn-llm#81)")
    if import_error and "name 'exit' is not defined" in import_error:
        problems.append("F-14: NameError: name 'exit' is not defined while importing rkllm.api (rknn-llm#312)")
    return problems


def probe():
    # type: () -> int
    """Prints the probe line; returns the exit code (0, or 3 when rkllm.api does not import)."""
    saved = os.dup(1)
    os.dup2(2, 1)  # whatever the import prints goes to stderr: stdout carries only the probe line
    rkllm_module = None  # type: Optional[ModuleType]
    import_error = None  # type: Optional[str]
    try:
        import rkllm as rkllm_module  # type: ignore[import-not-found,no-redef]  # only in the toolkit's venv
        from rkllm.api import RKLLM  # type: ignore[import-not-found]  # noqa: F401  # only in the toolkit's venv
    except BaseException as exc:  # SystemExit too: a toolkit that calls exit() on import
        if isinstance(exc, KeyboardInterrupt):
            raise
        import_error = f"{type(exc).__name__}: {exc}"
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    cuda = None
    torch = sys.modules.get("torch")  # never imported here: only read when the toolkit already did
    if import_error is None and torch is not None:
        try:
            cuda = bool(torch.cuda.is_available())
        except Exception:
            cuda = None
    line = {
        "type": "probe",
        "protocol": PROTOCOL,
        "toolkit_version": toolkit_version(rkllm_module) if import_error is None else toolkit_version(None),
        "simulated": bool(getattr(rkllm_module, "__rkedge_simulated__", False)),
        "python": platform.python_version(),
        "python_tag": f"cp{sys.version_info[0]}{sys.version_info[1]}",
        "machine": platform.machine(),
        "system": platform.system(),
        "executable": sys.executable,
        "import_ok": import_error is None,
        "import_error": import_error,
        "cuda": cuda,
        "problems": environment_problems(import_error),
    }
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    return EXIT_OK if import_error is None else EXIT_IMPORT


class Channel:
    """The protocol stream (the real stdout) plus the capture of everything else written to fd 1 and 2."""

    def __init__(self):
        # type: () -> None
        sys.stdout.flush()
        sys.stderr.flush()
        self.lock = threading.Lock()
        self.proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        self.saved_err = os.dup(2)
        self.step = None  # type: Optional[str]
        self.last_fraction = None  # type: Optional[float]
        self.sync_seen = threading.Event()
        self.sync_id = 0
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self.read_end = read_end
        reconfigure = getattr(sys.stdout, "reconfigure", None)  # absent on exotic stdout objects
        try:
            if reconfigure is not None:
                reconfigure(line_buffering=True)  # prints reach the pipe as they happen
        except ValueError:  # pragma: no cover - exotic stdout objects
            pass
        self.reader = threading.Thread(target=self._read, name="rkedge-log-reader")
        self.reader.daemon = True
        self.reader.start()

    def emit(self, event):
        # type: (Dict[str, Any]) -> None
        text = json.dumps(event, default=repr, ensure_ascii=False)
        with self.lock:
            self.proto.write(text + "\n")
            self.proto.flush()

    def _read(self):
        # type: () -> None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                chunk = os.read(self.read_end, 65536)
            except OSError:
                chunk = b""
            pending += decoder.decode(chunk, final=not chunk)
            parts = re.split(r"[\r\n]", pending)
            pending = parts.pop() if chunk else ""
            if not chunk and parts[-1:] == [""]:
                parts.pop()
            for line in parts:
                self._line(line)
            if not chunk:
                return

    def _line(self, line):
        # type: (str) -> None
        if line.startswith("\x00rkedge-sync-"):
            if line == f"\x00rkedge-sync-{self.sync_id}":
                self.sync_seen.set()
            return
        if not line.strip():
            return
        self.emit({"type": "log", "line": line})
        fraction = parse_fraction(line)
        if fraction is not None and self.step is not None and fraction != self.last_fraction:
            self.last_fraction = fraction
            self.emit({"type": "progress", "step": self.step, "state": "update", "fraction": fraction})

    def sync(self, timeout=10.0):
        # type: (float) -> None
        """Waits until everything written to fd 1/2 so far has been turned into events (keeps events in order)."""
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        self.sync_id += 1
        self.sync_seen.clear()
        # The leading newline ends a pending partial line (a tqdm bar without its final newline).
        os.write(1, f"\n\x00rkedge-sync-{self.sync_id}\n".encode())
        self.sync_seen.wait(timeout)

    def start_step(self, step):
        # type: (str) -> None
        self.sync()
        self.step, self.last_fraction = step, 0.0
        self.emit({"type": "progress", "step": step, "state": "start", "fraction": 0.0})

    def end_step(self, step, ret):
        # type: (str, object) -> None
        self.sync()
        self.emit({"type": "progress", "step": step, "state": "done", "fraction": 1.0, "ret": ret})
        self.step = None

    def close(self):
        # type: () -> None
        """Points fd 1 and 2 back at the real stderr (late output is not lost) and stops the reader."""
        self.sync()
        os.dup2(self.saved_err, 1)
        os.dup2(self.saved_err, 2)
        self.reader.join(2.0)


def parse_fraction(line):
    # type: (str) -> Optional[float]
    """The completed fraction of a tqdm-like line (``a/b`` of a bar, else ``NN%``), or None."""
    tqdm_like = "%|" in line or "it/s" in line or "s/it" in line
    if tqdm_like:
        for match in _TQDM_COUNT.finditer(line):
            done, total = int(match.group(1)), int(match.group(2))
            if 0 < total and done <= total:
                return round(float(done) / total, 4)
    percent = _PERCENT.search(line)
    if percent:
        value = float(percent.group(1))
        if value <= 100:
            return round(value / 100.0, 4)
    return None


class JobError(Exception):
    pass


def read_job(path):
    # type: (str) -> Dict[str, Any]
    """The job file, checked against protocol 1; raises JobError with a clear message."""
    try:
        with open(path, encoding="utf-8") as handle:
            job = json.load(handle)
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot read job file {path}: {exc}") from exc
    if not isinstance(job, dict):
        raise JobError("the job is not a JSON object")
    if job.get("protocol") != PROTOCOL:
        raise JobError(f"job protocol {job.get('protocol')!r} is not supported (this worker speaks {PROTOCOL})")
    for key in ("load", "build", "export"):
        section = job.get(key)
        if not isinstance(section, dict) or not isinstance(section.get("kwargs"), dict):
            raise JobError(f"job[{key!r}] must be an object with a 'kwargs' object")
    if job["load"].get("method") not in LOAD_METHODS:
        raise JobError("job['load']['method'] must be one of {}, not {!r}".format(", ".join(LOAD_METHODS),
                                                                           job["load"].get("method")))
    if not isinstance(job["export"]["kwargs"].get("export_path"), str):
        raise JobError("job['export']['kwargs']['export_path'] must be a path")
    return job


def list_outputs(export_path):
    # type: (str) -> List[Dict[str, Any]]
    """Every file beside the export path whose name starts with its stem (the model, ``_lora`` files, ...)."""
    folder = os.path.dirname(os.path.abspath(export_path))
    stem = os.path.splitext(os.path.basename(export_path))[0]
    outputs = []  # type: List[Dict[str, Any]]
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return outputs
    for name in names:
        path = os.path.join(folder, name)
        if name.startswith(stem) and os.path.isfile(path):
            outputs.append({"path": path, "name": name, "size": os.path.getsize(path)})
    return outputs


def _failure(channel, step, ret, message, tb=None):
    # type: (Channel, str, Optional[int], str, Optional[str]) -> int
    channel.sync()
    channel.emit({"type": "error", "step": step, "ret": ret, "message": message, "traceback": tb})
    channel.close()
    return EXIT_FAILED


def run_job(path):
    # type: (str) -> int
    try:
        job = read_job(path)
    except JobError as exc:
        sys.stdout.write(json.dumps({"type": "error", "step": "job", "ret": None, "message": str(exc),
                                     "traceback": None}) + "\n")
        sys.stdout.flush()
        return EXIT_BAD_JOB
    try:  # read once: deleting it now means no job file outlives this worker, whatever happens to the parent
        os.unlink(path)
    except OSError:
        pass

    channel = Channel()
    try:
        import rkllm as rkllm_module
        from rkllm.api import RKLLM
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        channel.sync()
        message = f"cannot import rkllm.api: {type(exc).__name__}: {exc}"
        problems = environment_problems(message)
        channel.emit({"type": "error", "step": "import", "ret": None, "message": message,
                      "traceback": traceback.format_exc(), "problems": problems})
        channel.close()
        return EXIT_IMPORT
    version = toolkit_version(rkllm_module)
    channel.emit({"type": "log", "line": f"rkedge worker: rkllm-toolkit {version}, Python {platform.python_version()}, {platform.machine()}"})

    calls = []  # type: List[Dict[str, Any]]
    llm = None  # type: Any
    for step, method in STEPS:
        section = job[step]
        method = method or section["method"]
        kwargs = section["kwargs"]
        channel.start_step(step)
        calls.append({"method": method, "kwargs": kwargs})
        try:
            if llm is None:
                llm = RKLLM()
            ret = getattr(llm, method)(**kwargs)
        except SystemExit as exc:  # the toolkit called exit()
            return _failure(channel, step, None, f"RKLLM.{method}() called exit({exc.code!r})",
                            traceback.format_exc())
        except KeyboardInterrupt:
            _failure(channel, step, None, f"interrupted during RKLLM.{method}()")
            return 130
        except Exception as exc:
            return _failure(channel, step, None, f"RKLLM.{method}() raised {type(exc).__name__}: {exc}",
                            traceback.format_exc())
        if ret is None:
            # No documented version returns None; the export check below still catches a missing file.
            channel.emit({"type": "log", "line": f"rkedge worker: RKLLM.{method}() returned None (expected 0)"})
        elif isinstance(ret, bool) or not isinstance(ret, int) or ret != 0:
            return _failure(channel, step, ret if isinstance(ret, int) else None,
                            f"RKLLM.{method}() returned {ret!r} (0 means success)")
        channel.end_step(step, ret)

    export_path = job["export"]["kwargs"]["export_path"]
    outputs = list_outputs(export_path)
    if not any(os.path.abspath(o["path"]) == os.path.abspath(export_path) for o in outputs):
        return _failure(channel, "export", 0, f"RKLLM.export_rkllm() returned 0 but {export_path} does not exist")
    channel.sync()
    channel.emit({"type": "result", "ok": True, "toolkit_version": version, "outputs": outputs, "calls": calls})
    channel.close()
    return EXIT_OK


def exit_with_parent():
    # type: () -> None
    """Ends the worker when rkedge dies (even by SIGKILL, when it cannot clean up): an orphaned toolkit would
    go on converting for hours, holding tens of GB of RAM, for a result nobody will collect."""
    parent = os.getppid()

    def watch():
        # type: () -> None
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="rkedge-parent-watch", daemon=True).start()


def main(argv=None):
    # type: (Optional[List[str]]) -> int
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--probe"]:
        return probe()
    if len(argv) == 2 and argv[0] == "--job":
        exit_with_parent()
        return run_job(argv[1])
    sys.stderr.write("usage: worker.py --probe | --job JOB.json\n")
    return EXIT_BAD_JOB


if __name__ == "__main__":
    sys.exit(main())
