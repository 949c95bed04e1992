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

PROTOCOL = 1
STEPS = (("load", None), ("build", "build"), ("export", "export_rkllm"))
LOAD_METHODS = ("load_huggingface", "load_gguf")
EXIT_OK, EXIT_FAILED, EXIT_BAD_JOB, EXIT_IMPORT = 0, 1, 2, 3

_TQDM_COUNT = re.compile(r"(?<![\w./])(\d+)/(\d+)(?![\w/.])")
_PERCENT = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)%")


def toolkit_version(rkllm_module=None):
    """The installed rkllm-toolkit version: the simulated toolkit's own, the distribution's, or rkllm.__version__."""
    if rkllm_module is not None and getattr(rkllm_module, "__rkedge_simulated__", False):
        return getattr(rkllm_module, "__version__", None)
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        metadata = None
    if metadata is not None:
        for name in ("rkllm-toolkit", "rkllm_toolkit"):
            try:
                return metadata.version(name)
            except Exception:
                pass
    if rkllm_module is not None:
        return getattr(rkllm_module, "__version__", None)
    return None


def environment_problems(import_error=None):
    """Known environment failures (F-14) as short texts."""
    problems = []
    if platform.machine() not in ("x86_64", "AMD64"):
        problems.append("F-14: rkllm-toolkit wheels exist for linux x86_64 only; this machine is %s (rknn-llm#81)"
                        % platform.machine())
    if import_error and "name 'exit' is not defined" in import_error:
        problems.append("F-14: NameError: name 'exit' is not defined while importing rkllm.api (rknn-llm#312)")
    return problems


def probe():
    """Prints the probe line; returns the exit code (0, or 3 when rkllm.api does not import)."""
    saved = os.dup(1)
    os.dup2(2, 1)  # whatever the import prints goes to stderr: stdout carries only the probe line
    rkllm_module, import_error = None, None
    try:
        from rkllm.api import RKLLM  # noqa: F401
        import rkllm as rkllm_module
    except BaseException as exc:  # SystemExit too: a toolkit that calls exit() on import
        if isinstance(exc, KeyboardInterrupt):
            raise
        import_error = "%s: %s" % (type(exc).__name__, exc)
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
        "python_tag": "cp%d%d" % sys.version_info[:2],
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


class Channel(object):
    """The protocol stream (the real stdout) plus the capture of everything else written to fd 1 and 2."""

    def __init__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.lock = threading.Lock()
        self.proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        self.saved_err = os.dup(2)
        self.step = None
        self.last_fraction = None
        self.sync_seen = threading.Event()
        self.sync_id = 0
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self.read_end = read_end
        try:
            sys.stdout.reconfigure(line_buffering=True)  # prints reach the pipe as they happen
        except (AttributeError, ValueError):  # pragma: no cover - exotic stdout objects
            pass
        self.reader = threading.Thread(target=self._read, name="rkedge-log-reader")
        self.reader.daemon = True
        self.reader.start()

    def emit(self, event):
        text = json.dumps(event, default=repr, ensure_ascii=False)
        with self.lock:
            self.proto.write(text + "\n")
            self.proto.flush()

    def _read(self):
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
        if line.startswith("\x00rkedge-sync-"):
            if line == "\x00rkedge-sync-%d" % self.sync_id:
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
        """Waits until everything written to fd 1/2 so far has been turned into events (keeps events in order)."""
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        self.sync_id += 1
        self.sync_seen.clear()
        # The leading newline ends a pending partial line (a tqdm bar without its final newline).
        os.write(1, ("\n\x00rkedge-sync-%d\n" % self.sync_id).encode())
        self.sync_seen.wait(timeout)

    def start_step(self, step):
        self.sync()
        self.step, self.last_fraction = step, 0.0
        self.emit({"type": "progress", "step": step, "state": "start", "fraction": 0.0})

    def end_step(self, step, ret):
        self.sync()
        self.emit({"type": "progress", "step": step, "state": "done", "fraction": 1.0, "ret": ret})
        self.step = None

    def close(self):
        """Points fd 1 and 2 back at the real stderr (late output is not lost) and stops the reader."""
        self.sync()
        os.dup2(self.saved_err, 1)
        os.dup2(self.saved_err, 2)
        self.reader.join(2.0)


def parse_fraction(line):
    """The completed fraction of a tqdm-like line (``a/b`` of a bar, else ``NN%``), or None."""
    tqdm_like = "%|" in line or "it/s" in line or "s/it" in line
    if tqdm_like:
        for match in _TQDM_COUNT.finditer(line):
            done, total = int(match.group(1)), int(match.group(2))
            if 0 < total and done <= total:
                return round(float(done) / total, 4)
    match = _PERCENT.search(line)
    if match:
        value = float(match.group(1))
        if value <= 100:
            return round(value / 100.0, 4)
    return None


class JobError(Exception):
    pass


def read_job(path):
    """The job file, checked against protocol 1; raises JobError with a clear message."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            job = json.load(handle)
    except (OSError, ValueError) as exc:
        raise JobError("cannot read job file %s: %s" % (path, exc))
    if not isinstance(job, dict):
        raise JobError("the job is not a JSON object")
    if job.get("protocol") != PROTOCOL:
        raise JobError("job protocol %r is not supported (this worker speaks %d)" % (job.get("protocol"), PROTOCOL))
    for key in ("load", "build", "export"):
        section = job.get(key)
        if not isinstance(section, dict) or not isinstance(section.get("kwargs"), dict):
            raise JobError("job[%r] must be an object with a 'kwargs' object" % key)
    if job["load"].get("method") not in LOAD_METHODS:
        raise JobError("job['load']['method'] must be one of %s, not %r" % (", ".join(LOAD_METHODS),
                                                                           job["load"].get("method")))
    if not isinstance(job["export"]["kwargs"].get("export_path"), str):
        raise JobError("job['export']['kwargs']['export_path'] must be a path")
    return job


def list_outputs(export_path):
    """Every file beside the export path whose name starts with its stem (the model, ``_lora`` files, ...)."""
    folder = os.path.dirname(os.path.abspath(export_path))
    stem = os.path.splitext(os.path.basename(export_path))[0]
    outputs = []
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
    channel.sync()
    channel.emit({"type": "error", "step": step, "ret": ret, "message": message, "traceback": tb})
    channel.close()
    return EXIT_FAILED


def run_job(path):
    try:
        job = read_job(path)
    except JobError as exc:
        sys.stdout.write(json.dumps({"type": "error", "step": "job", "ret": None, "message": str(exc),
                                     "traceback": None}) + "\n")
        sys.stdout.flush()
        return EXIT_BAD_JOB

    channel = Channel()
    try:
        from rkllm.api import RKLLM
        import rkllm as rkllm_module
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        channel.sync()
        message = "cannot import rkllm.api: %s: %s" % (type(exc).__name__, exc)
        problems = environment_problems(message)
        channel.emit({"type": "error", "step": "import", "ret": None, "message": message,
                      "traceback": traceback.format_exc(), "problems": problems})
        channel.close()
        return EXIT_IMPORT
    version = toolkit_version(rkllm_module)
    channel.emit({"type": "log", "line": "rkedge worker: rkllm-toolkit %s, Python %s, %s"
                  % (version, platform.python_version(), platform.machine())})

    calls = []
    llm = None
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
            return _failure(channel, step, None, "RKLLM.%s() called exit(%r)" % (method, exc.code),
                            traceback.format_exc())
        except KeyboardInterrupt:
            _failure(channel, step, None, "interrupted during RKLLM.%s()" % method)
            return 130
        except Exception as exc:
            return _failure(channel, step, None, "RKLLM.%s() raised %s: %s" % (method, type(exc).__name__, exc),
                            traceback.format_exc())
        if ret is None:
            # No documented version returns None; the export check below still catches a missing file.
            channel.emit({"type": "log", "line": "rkedge worker: RKLLM.%s() returned None (expected 0)" % method})
        elif isinstance(ret, bool) or not isinstance(ret, int) or ret != 0:
            return _failure(channel, step, ret if isinstance(ret, int) else None,
                            "RKLLM.%s() returned %r (0 means success)" % (method, ret))
        channel.end_step(step, ret)

    export_path = job["export"]["kwargs"]["export_path"]
    outputs = list_outputs(export_path)
    if not any(os.path.abspath(o["path"]) == os.path.abspath(export_path) for o in outputs):
        return _failure(channel, "export", 0, "RKLLM.export_rkllm() returned 0 but %s does not exist" % export_path)
    channel.sync()
    channel.emit({"type": "result", "ok": True, "toolkit_version": version, "outputs": outputs, "calls": calls})
    channel.close()
    return EXIT_OK


def exit_with_parent():
    """Ends the worker when rkedge dies (even by SIGKILL, when it cannot clean up): an orphaned toolkit would
    go on converting for hours, holding tens of GB of RAM, for a result nobody will collect."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="rkedge-parent-watch", daemon=True).start()


def main(argv=None):
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
