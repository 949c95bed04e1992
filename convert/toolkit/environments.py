"""rkllm-toolkit environments: one venv per downloaded wheel, recorded in ``toolkits.json``.

The toolkit pins old torch/transformers and ships only ``linux_x86_64`` wheels for one CPython each, so it
lives in its own venv under ``$RKEDGE_TOOLKITS_DIR`` (default ``~/.local/share/rkedge/toolkits``), named
``<version>-cp<XY>``. Installing reads the wheel's own ``Requires-Dist`` (repairing the malformed lists Rockchip
has shipped), falls back to the pins below, installs the requirements and then the wheel with ``--no-deps``
(so what is installed is exactly what is recorded), probes the result with the worker, and only then records it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from rkedge._fs import atomic_write_text, sha256_file
from rkedge.errors import InputError, ToolkitError

RECORDS_FILE = "toolkits.json"
REQUIREMENTS_FILE = "rkedge-requirements.txt"
WHEEL_PROJECT = "rkllm-toolkit"
Runner = Callable[..., "subprocess.CompletedProcess[str]"]

# Requirement pins per release, for wheels whose METADATA declares none. Copied from airockchip/rknn-llm
# `rkllm-toolkit/packages/requirements.txt` at the release tags 1.2.2 (malformed as shipped: the list is
# repeated with `timm==1.0.19numpy ...` glued; repaired here), 1.2.3 and 1.3.0; 1.2.0 and 1.2.1 from lock files
# and install logs (converter-anchors-and-failure-modes.md section 3.4: thanhtantran/rkllm-toolkit-cli uv.lock,
# rknn-llm#366). Releases before 1.2.0 shipped no requirements file and their pins are unknown.
_COMMON_122 = (
    "numpy >= 1.23.1,<=1.26.4", "transformers == 4.55.2", "torch == 2.6.0", "datasets == 4.1.1",
    "pyarrow == 21.0.0", "tqdm>=4.64.0", "sentencepiece == 0.2.0", "accelerate>=1.0.1,<=1.5.2",
    "protobuf<=4.25.4,>=4.21.6", "transformers_stream_generator==0.0.5", "einops==0.4.1", "scipy>=1.5.4",
    "tiktoken>=0.7.0,<=0.9.0", "tabulate==0.9.0", "Jinja2==3.1.4", "safetensors==0.5.3", "colorlog==6.8.2",
    "datamodel_code_generator==0.26.0", "jsonschema==4.23.0", "flatbuffers==24.3.25", "torchvision==0.21.0",
    "pillow==10.4.0", "auto_gptq==0.7.1", "optimum==1.23.3", "jsonlines==4.0.0", "timm==1.0.19",
)
KNOWN_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    # Partial: only the pins the lock file / install log show (section 3.4).
    "1.2.0": ("torch==2.3.0", "torchvision==0.18.0", "transformers==4.50.0", "datasets==2.14.6",
              "accelerate>=1.0.1,<=1.5.2", "auto-gptq==0.7.1", "optimum==1.23.3", "numpy>=1.23.1,<=1.26.4",
              "protobuf>=4.21.6,<=4.25.4", "safetensors==0.5.3", "timm==1.0.15"),
    "1.2.1": ("torch==2.3.0", "transformers==4.51.3"),
    "1.2.2": _COMMON_122,
    # 1.2.3 and 1.3.0: the 1.2.2 list with these lines changed (as spelled in each file) and these added.
    "1.2.3": tuple({"torch == 2.6.0": "torch==2.6.0"}.get(r, r) for r in _COMMON_122)
    + ("easydict==1.13", "addict==2.4.0"),
    "1.3.0": tuple({"torch == 2.6.0": "torch==2.6.0", "transformers == 4.55.2": "transformers == 5.8.0"}.get(r, r)
                   for r in _COMMON_122) + ("easydict==1.13", "addict==2.4.0", "matplotlib>=3.9.4"),
}
#: RWKV7 conversion (1.2.1, Python 3.12 only): `requirements_rwkv7.txt` at the 1.2.1 tag. Not installed by default.
RWKV7_REQUIREMENTS_121: tuple[str, ...] = (
    "numpy >= 1.23.1,<=1.26.4", "transformers == 4.51.3", "torch == 2.6.0", "datasets == 2.14.6", "tqdm>=4.64.0",
    "sentencepiece == 0.2.0", "accelerate>=1.0.1,<=1.5.2", "protobuf<=4.25.4,>=4.21.6",
    "transformers_stream_generator==0.0.5", "einops==0.4.1", "scipy>=1.5.4", "tiktoken>=0.7.0,<=0.9.0",
    "tabulate==0.9.0", "Jinja2==3.1.4", "safetensors==0.5.3", "colorlog==6.8.2", "datamodel_code_generator==0.26.0",
    "jsonschema==4.23.0", "flatbuffers==24.3.25", "torchvision==0.21.0", "pillow==10.4.0", "auto_gptq==0.7.1",
    "optimum==1.23.3", "jsonlines==4.0.0", "timm==1.0.15", "rwkv-fla==0.7.202503140658",
)
PINS_SOURCE = ("rkedge table (airockchip/rknn-llm rkllm-toolkit/packages/requirements.txt per release tag; "
               "converter-anchors-and-failure-modes.md section 3.4)")

#: Where a version ends and the next requirement begins when Rockchip's list lost its newlines
#: (``timm==1.0.19numpy >= 1.23.1``): an operator, a version ending in a digit, then a name. Whether the pieces
#: are a valid version and requirement is decided by ``packaging``.
_GLUE = re.compile(r"(?P<op>~=|==|!=|<=|>=|<|>)\s*(?P<version>[^,;\s]*?\d)(?P<rest>[A-Za-z][A-Za-z0-9._-]*\s*"
                   r"(\[[^\]]*\])?\s*(~=|==|!=|<=|>=|<|>|===|;|$).*)$")


def _is_version(text: str) -> bool:
    return _parses(Version, InvalidVersion, text)


def _is_requirement(text: str) -> bool:
    return _parses(Requirement, InvalidRequirement, text)


def _parses(parse: Callable[[str], object], invalid: type[Exception], text: str) -> bool:
    try:
        parse(text)
    except invalid:
        return False
    return True


@dataclass(frozen=True)
class ToolkitRecord:
    """One installed toolkit environment, as recorded in ``toolkits.json``."""

    version: str
    python: str  # the venv's interpreter
    python_tag: str  # cpXY of the wheel
    venv: str
    wheel: str  # file name
    wheel_sha256: str
    requirements: tuple[str, ...]
    requirements_source: str
    fixes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    pip_args: tuple[str, ...] = ()
    installed_at: str = ""
    probe: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("requirements", "fixes", "notes", "pip_args"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolkitRecord:
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in names}
        for key in ("requirements", "fixes", "notes", "pip_args"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)

    @property
    def usable(self) -> bool:
        return Path(self.python).exists()


def toolkits_root(root: Path | None = None) -> Path:
    """Where toolkit venvs live: ``root``, ``$RKEDGE_TOOLKITS_DIR``, or ``$XDG_DATA_HOME/rkedge/toolkits``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("RKEDGE_TOOLKITS_DIR")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "rkedge" / "toolkits"


def parse_wheel_name(name: str) -> dict[str, str]:
    """``rkllm_toolkit-1.2.3-cp310-cp310-linux_x86_64.whl`` -> version, python (cp310), abi, platform.

    Raises:
        InputError: for another file name or a platform other than linux_x86_64 (F-14).
    """
    try:
        project, version, _build, tags = parse_wheel_filename(name)
    except InvalidWheelFilename:
        project, tags = None, frozenset()
    python_tags = sorted({tag.interpreter for tag in tags})
    if project != WHEEL_PROJECT or len(tags) != 1 or not re.fullmatch(r"cp\d+", python_tags[0]):
        raise InputError(f"{name} is not an rkllm-toolkit wheel name (rkllm_toolkit-<version>-cp<XY>-cp<XY>-"
                         "linux_x86_64.whl).",
                         fix="pass the wheel file from airockchip/rknn-llm rkllm-toolkit/packages/ unrenamed")
    (tag,) = tags
    parts = {"version": str(version), "python": tag.interpreter, "abi": tag.abi, "platform": tag.platform}
    if parts["platform"] != "linux_x86_64":
        raise InputError(f"{name} is built for {parts['platform']}; rkllm-toolkit runs on linux x86_64 only "
                         f"(pip: 'ERROR: {name} is not a supported wheel on this platform.', rknn-llm#81).",
                         fix="use the linux_x86_64 wheel on an x86_64 Linux host")
    return parts


def python_tag_of(python: str, runner: Runner = subprocess.run) -> str:
    """``cpXY`` of an interpreter (runs it)."""
    try:
        done = runner([python, "-c", "import sys; print('cp%d%d' % sys.version_info[:2])"], capture_output=True,
                      text=True, timeout=60)
    except OSError as exc:
        raise InputError(f"cannot run Python interpreter {python}: {exc}",
                         fix="pass --python with the path of a working interpreter") from exc
    tag = (done.stdout or "").strip().splitlines()[-1:] if done.returncode == 0 else []
    if not tag or not re.fullmatch(r"cp\d+", tag[0]):
        raise InputError(f"{python} did not report its version ({(done.stderr or '').strip()[-300:]})",
                         fix="pass --python with the path of a working CPython interpreter")
    return tag[0]


def find_python(tag: str) -> str | None:
    """An interpreter for ``cpXY`` on this host: the current one if it matches, else ``pythonX.Y`` on PATH."""
    major, minor = tag[2], tag[3:]
    if f"cp{sys.version_info[0]}{sys.version_info[1]}" == tag:
        return sys.executable
    return shutil.which(f"python{major}.{minor}")


def split_glued_requirements(lines: Sequence[str]) -> tuple[list[str], list[str]]:
    """Requirements with glued lines split and duplicates dropped, plus what was fixed (in words).

    Rockchip's 1.2.2 list repeats itself with no newline in between, giving
    ``timm==1.0.19numpy >= 1.23.1,<=1.26.4``: a valid version followed directly by another requirement.
    """
    fixes: list[str] = []
    out: list[str] = []
    seen: set[str] = set()
    duplicates = 0
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pieces = _split_line(line)
        if len(pieces) > 1:
            fixes.append(f"split the malformed requirement {line!r} into " + " and ".join(map(repr, pieces)))
        for piece in pieces:
            key = re.sub(r"\s+", "", piece).lower().replace("_", "-")
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            out.append(piece)
    if duplicates:
        fixes.append(f"dropped {duplicates} duplicate requirement{'s' if duplicates > 1 else ''}")
    for piece in out:
        if not _is_requirement(piece.split(";", 1)[0]):
            fixes.append(f"kept {piece!r} although it does not look like a requirement (pip will judge it)")
    return out, fixes


def _split_line(line: str) -> list[str]:
    spec, _, marker = line.partition(";")
    pieces: list[str] = []
    rest = spec
    while True:
        glued = None
        for match in _GLUE.finditer(rest):
            version, tail = match.group("version"), match.group("rest")
            head = re.split(r"[\s,;<>=!~\[(]", tail, maxsplit=1)[0]
            # A split only where the version is complete and version+next word is not a version (1.0rc1, 1.0dev).
            if _is_version(version) and not _is_version(version + head) and _is_requirement(tail.split(";", 1)[0]):
                glued = match
                break
        if glued is None:
            pieces.append(rest.strip())
            break
        pieces.append(rest[:glued.start("rest")].strip())
        rest = rest[glued.start("rest"):]
    if marker.strip():
        pieces[-1] = f"{pieces[-1]}; {marker.strip()}"
    return pieces


def wheel_metadata(wheel: Path) -> dict[str, Any]:
    """Name, version and Requires-Dist (without extras-only entries) from the wheel's ``*.dist-info/METADATA``."""
    import email.parser
    import zipfile

    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if not names:
                raise InputError(f"{wheel.name} has no .dist-info/METADATA; it is not a complete wheel.",
                                 fix="download the wheel again")
            text = archive.read(names[0]).decode("utf-8", "replace")
    except zipfile.BadZipFile as exc:
        raise InputError(f"{wheel} is not a wheel (zip) file: {exc}", fix="download the wheel again") from exc
    message = email.parser.Parser().parsestr(text)
    # Entries for optional extras are not the toolkit's runtime requirements.
    requires = [r for r in (message.get_all("Requires-Dist") or []) if not re.search(r"\bextra\s*==", r)]
    return {"name": message.get("Name"), "version": message.get("Version"), "requires_dist": requires}


def install_toolkit(wheel: Path, *, python: str | None = None, root: Path | None = None,
                    runner: Runner = subprocess.run, pip_args: Sequence[str] = (), force: bool = False,
                    log: Callable[[str], None] | None = None) -> ToolkitRecord:
    """Makes and records a venv for an rkllm-toolkit wheel; returns its record.

    ``pip_args`` are passed to both pip installs (e.g. ``--extra-index-url https://download.pytorch.org/whl/cpu``
    for the CPU build of torch). ``runner`` runs every command (tests pass a fake that records pip calls).

    Raises:
        InputError: bad wheel name or file, wrong host or Python (F-14), an existing install without ``force``.
        ToolkitError: pip failed, or the installed toolkit does not import (the venv is removed again).
    """
    from rkedge.convert.rules import rules_for

    say = log or (lambda text: None)
    wheel = Path(wheel).expanduser().resolve()
    if not wheel.is_file():
        raise InputError(f"wheel not found: {wheel}",
                         fix="download it from airockchip/rknn-llm rkllm-toolkit/packages/")
    parts = parse_wheel_name(wheel.name)
    version, tag = parts["version"], parts["python"]
    rules_for(version)  # an unknown version has no rules: refuse now, not after a multi-GB install
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        raise InputError(f"this host is {sys.platform} {platform.machine()}; rkllm-toolkit wheels exist for linux "
                         f"x86_64 only (pip: 'ERROR: {wheel.name} is not a supported wheel on this platform.', "
                         "rknn-llm#81).", fix="convert on an x86_64 Linux machine (or container); the board only runs "
                                              "the runtime")
    python = python or find_python(tag)
    if python is None:
        raise InputError(f"{wheel.name} is for CPython {tag[2]}.{tag[3:]} and no python{tag[2]}.{tag[3:]} was found.",
                         fix=f"install Python {tag[2]}.{tag[3:]} (or pass --python /path/to/python{tag[2]}.{tag[3:]})")
    actual = python_tag_of(python, runner)
    if actual != tag:
        raise InputError(f"{wheel.name} is for CPython {tag[2]}.{tag[3:]} but {python} is {actual[2]}.{actual[3:]} "
                         f"(pip would say: 'ERROR: {wheel.name} is not a supported wheel on this platform.', "
                         "rknn-llm#81).", fix=f"pass --python with a Python {tag[2]}.{tag[3:]} interpreter, or "
                                              "download the wheel for your Python")

    metadata = wheel_metadata(wheel)
    notes: list[str] = []
    if metadata["version"] and metadata["version"] != version:
        notes.append(f"the wheel's METADATA says version {metadata['version']}, its file name {version}")
    if metadata["requires_dist"]:
        requirements, fixes = split_glued_requirements(metadata["requires_dist"])
        source = f"{wheel.name} METADATA Requires-Dist"
        table = KNOWN_REQUIREMENTS.get(version)
        if table:
            notes += _pin_differences(requirements, table)
    else:
        table = KNOWN_REQUIREMENTS.get(version)
        requirements, fixes = split_glued_requirements(table or ())
        source = PINS_SOURCE if table else "none (the wheel declares none and rkedge knows no pins for this version)"
        if not table:
            notes.append(f"no requirements known for rkllm-toolkit {version}; the probe shows whether it imports")
    for fix in fixes:
        say(f"requirements: {fix}")

    base = toolkits_root(root)
    venv_dir = base / f"{version}-{tag}"
    if venv_dir.exists():
        if not force:
            raise InputError(f"rkllm-toolkit {version} ({tag}) is already installed at {venv_dir}.",
                             fix="use it as it is, or reinstall with --force")
        shutil.rmtree(venv_dir)
    base.mkdir(parents=True, exist_ok=True)
    venv_python = str(venv_dir / "bin" / "python")
    pip_env = {**os.environ, "BUILD_CUDA_EXT": "0",  # auto-gptq builds its CUDA extension otherwise (README 1.2.1+)
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        say(f"creating {venv_dir} with {python}")
        _run(runner, [python, "-m", "venv", str(venv_dir)], "creating the venv", env=None)
        requirements_file = venv_dir / REQUIREMENTS_FILE
        if requirements:
            atomic_write_text(requirements_file, "".join(r + "\n" for r in requirements))
            say(f"installing {len(requirements)} requirements (BUILD_CUDA_EXT=0)")
            _run(runner, [venv_python, "-m", "pip", "install", *pip_args, "-r", str(requirements_file)],
                 "installing the toolkit's requirements", env=pip_env)
        say(f"installing {wheel.name} --no-deps")
        _run(runner, [venv_python, "-m", "pip", "install", *pip_args, "--no-deps", str(wheel)],
             f"installing {wheel.name}", env=pip_env)
        probe = _probe(runner, venv_python)
    except BaseException:
        shutil.rmtree(venv_dir, ignore_errors=True)  # a half-made venv must not look installed
        raise
    if probe.get("toolkit_version") and probe["toolkit_version"] != version:
        notes.append(f"the installed toolkit reports version {probe['toolkit_version']}")
    record = ToolkitRecord(
        version=version, python=venv_python, python_tag=tag, venv=str(venv_dir), wheel=wheel.name,
        wheel_sha256=sha256_file(wheel), requirements=tuple(requirements), requirements_source=source,
        fixes=tuple(fixes), notes=tuple(notes), pip_args=tuple(pip_args),
        installed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), probe=probe)
    with _locked(base):
        records = [r for r in _read_records(base) if r.venv != record.venv]
        _write_records(base, records + [record])
    return record


def _pin_differences(requirements: Sequence[str], table: Sequence[str]) -> list[str]:
    """Where the wheel's own exact pins differ from the published requirements file (e.g. torch in 1.2.3)."""
    def pins(items: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in items:
            try:
                requirement = Requirement(item)
            except InvalidRequirement:
                continue
            exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
            if exact:
                out[canonicalize_name(requirement.name)] = exact[0]
        return out

    ours, theirs = pins(requirements), pins(table)
    return [f"the wheel pins {name}=={ours[name]}, the published requirements file {name}=={theirs[name]}"
            for name in sorted(ours.keys() & theirs.keys()) if ours[name] != theirs[name]]


def _run(runner: Runner, cmd: list[str], what: str, *, env: dict[str, str] | None) -> None:
    from rkedge.convert.toolkit.known_errors import findings_from_log

    kwargs: dict[str, Any] = {"capture_output": True, "text": True}
    if env is not None:
        kwargs["env"] = env
    try:
        done = runner(cmd, **kwargs)
    except OSError as exc:
        raise ToolkitError(f"{what} failed: cannot run {cmd[0]}: {exc}") from exc
    if done.returncode != 0:
        output = ((done.stdout or "") + "\n" + (done.stderr or "")).strip()
        findings = findings_from_log(output.splitlines())
        hint = findings[0] if findings else None
        tail = "\n".join(output.splitlines()[-15:])
        raise ToolkitError(f"{what} failed (exit {done.returncode}):\n{tail}"
                           + (f"\n{hint.id}: {hint.message}" if hint else ""),
                           fix=hint.fix if hint and hint.fix else "read pip's output above; the venv was removed")


def _probe(runner: Runner, python: str) -> dict[str, Any]:
    from rkedge.convert.toolkit import WORKER, import_failure, parse_probe

    done = runner([python, str(WORKER), "--probe"], capture_output=True, text=True, timeout=600)
    probe = parse_probe(done.stdout or "")
    if probe is None or not probe.get("import_ok"):
        error, findings = import_failure(probe, done.stderr or "")
        raise ToolkitError(f"the installed toolkit does not import: {error}"
                           + "".join(f"\n{f.id}: {f.message}" for f in findings),
                           fix=(findings[0].fix if findings and findings[0].fix else
                                "check the pip output; the venv was removed"))
    return probe


@contextlib.contextmanager
def _locked(base: Path) -> Iterator[None]:
    """Serialises read-modify-write of toolkits.json between concurrent installs."""
    import fcntl

    with open(base / f".{RECORDS_FILE}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_records(base: Path) -> list[ToolkitRecord]:
    path = base / RECORDS_FILE
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [ToolkitRecord.from_dict(item) for item in data.get("toolkits", [])]
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"{path} is not a valid toolkit record file ({exc}).",
                         fix="repair or delete it, then run `rkedge toolkit install WHEEL` again") from exc


def _write_records(base: Path, records: list[ToolkitRecord]) -> None:
    body = {"format": "rkedge-toolkits", "format_version": 1, "toolkits": [r.to_dict() for r in records]}
    atomic_write_text(base / RECORDS_FILE, json.dumps(body, indent=1, ensure_ascii=False) + "\n")


def list_toolkits(root: Path | None = None) -> list[ToolkitRecord]:
    """Every recorded toolkit environment (including ones whose venv has since disappeared: see ``usable``)."""
    return _read_records(toolkits_root(root))


def newest_toolkit(root: Path | None = None, version: str | None = None) -> ToolkitRecord | None:
    """The usable environment with the highest toolkit version (or exactly ``version``), latest install first."""
    from rkedge.convert.rules import version_key

    records = [r for r in list_toolkits(root) if r.usable]
    if version is not None:
        records = [r for r in records if version_key(r.version) == version_key(version)]
    if not records:
        return None
    return max(records, key=lambda r: (version_key(r.version), r.version, r.installed_at))
