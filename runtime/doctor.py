"""``rkedge doctor``: can this board run this model, and if not, why and what to do.

Reads only files (device tree, /proc/meminfo, sysfs, debugfs, the library and the model's manifest) under
``root`` (``/`` on a board; a fixture folder in tests), so every verdict is testable. ``--trial-init``
additionally initialises the model with a tiny context in a child process and scans its stderr for the known
failure texts, because ``rkllm_init`` on 1.1.x returns 0 after some failures (SEMANTICS.md).
Facts: shared/knowledge/boards.md sections 4-7, converter-anchors-and-failure-modes.md F-1, F-3..F-7, 3.5.
The RAM/IOMMU/driver verdicts are :mod:`rkedge.fit`'s (the same as ``rkedge plan``'s), the failure texts come
from :mod:`rkedge.failures`, and nothing here imports the host side (``rkedge.convert``, ``rkedge.lora``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rkedge import fit
from rkedge.boards import SYSFS, match_board, soc_from_compatible
from rkedge.errors import ModelFileError, RkedgeError
from rkedge.failures import scan
from rkedge.fit import DRIVER_FAIL_BELOW, DRIVER_WARN_BELOW, GIB, RUNTIME_OVERHEAD_BYTES
from rkedge.manifest import Manifest
from rkedge.modelfile import check_model_file
from rkedge.versions import version_key

RKLLM_SOCS = {"rk3588": "rk3588", "rk3588s": "rk3588", "rk3588s2": "rk3588", "rk3582": "rk3588",
              "rk3576": "rk3576", "rk3562": "rk3562", "rv1126b": "rv1126b"}  # SoC -> rkllm target_platform
DENIED = object()


@dataclass
class Check:
    id: str
    status: str  # ok | warn | fail | info | skip
    title: str
    detail: str
    fix: str | None = None
    source: str | None = None


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        statuses = {c.status for c in self.checks}
        return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "ok"

    def add(self, *args: Any, **kwargs: Any) -> Check:
        check = Check(*args, **kwargs)
        self.checks.append(check)
        return check

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "facts": self.facts, "checks": [asdict(c) for c in self.checks]}

    def render(self) -> str:
        marks = {"ok": "[ok]  ", "warn": "[warn]", "fail": "[FAIL]", "info": "[info]", "skip": "[skip]"}
        lines = []
        for check in self.checks:
            lines.append(f"{marks[check.status]} {check.title}: {check.detail}")
            if check.fix and check.status in ("warn", "fail"):
                lines.append(f"        fix: {check.fix}")
        lines.append(f"verdict: {self.verdict.upper()}")
        return "\n".join(lines)


class Root:
    """Reads files below a root folder; tells missing from unreadable."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def read(self, absolute: str) -> str | None | object:
        try:
            return self.path(absolute).read_bytes().decode("utf-8", "replace")
        except PermissionError:
            return DENIED
        except OSError:  # missing, or not a file
            return None


def run_doctor(root: Path = Path("/"), *, model: Path | None = None, library: str | None = None,
               abi: str | None = None, trial_init: bool = False) -> DoctorReport:
    fs = Root(root)
    report = DoctorReport()
    soc = _check_board(fs, report)
    memory = _check_memory(fs, report)
    driver = _check_driver(fs, report)
    from rkedge.runtime.rknn.bundle import is_rknn_bundle
    from rkedge.runtime.vision import is_vlm

    vlm_folder = model if model is not None and is_vlm(model) else None
    if vlm_folder is not None:
        model = _vlm_language_model(report, vlm_folder)
    rknn_bundle = model is not None and is_rknn_bundle(model)
    # An RKNN bundle runs on librknnrt through RKNNLite, not on librkllmrt.
    runtime = _check_rknn_runtime(fs, report, library) if rknn_bundle else _check_library(fs, report, library, abi)
    _check_clocks(fs, report)
    if vlm_folder is not None:
        check_vlm(fs, report, vlm_folder, library)
    if model is not None:
        if rknn_bundle:
            _check_bundle(report, model, soc=soc, memory=memory)
        else:
            _check_model(report, model, soc=soc, memory=memory, driver=driver, runtime=runtime)
        if trial_init:
            _trial_init(report, model, runtime, library, abi, rknn_bundle=rknn_bundle)
    elif trial_init:
        report.add("trial-init", "skip", "trial init", "needs --model FILE")
    return report


def _vlm_language_model(report: DoctorReport, folder: Path) -> Path | None:
    """The .rkllm a VLM folder (or its vlm.json) names: the model the usual checks then look at."""
    from rkedge.runtime.vision import read_vlm

    try:
        root, manifest = read_vlm(folder)
    except RkedgeError as exc:
        report.add("vision", "fail", "vision-language model", exc.message, exc.fix)
        return None
    return root / manifest.llm_file


def check_vlm(fs: Root, report: DoctorReport, folder: Path, library: str | None) -> None:
    """A VLM folder's vision side: its encoders intact, RKNNLite + librknnrt.so (the encoder runs on them, not on
    librkllmrt), and the encoder's memory (weights and one image's embedding buffer) on top of the language model's."""
    from rkedge.runtime.vision import check_vlm as vision_checks
    from rkedge.runtime.vision import encoder_footprint, read_vlm

    try:
        _, manifest = read_vlm(folder)
    except RkedgeError:
        return  # already reported by _vlm_language_model
    report.add("vision", "ok", "vision-language model",
               f"{manifest.family}: {manifest.llm_file} + {len(manifest.encoders)} encoder(s) "
               f"({', '.join(manifest.encoders)}), {manifest.preprocessing.width}x{manifest.preprocessing.height} "
               f"images, {manifest.image_tokens} image tokens")
    for found in vision_checks(folder, on_board=False)[1:]:  # [0] is the .rkllm, which _check_model looks at
        report.add("vision.encoder", "ok" if found.ok else "fail", "vision encoder", found.what, found.fix)
    # The encoder's runtime is checked like an RKNN bundle's, under ids and a fact of its own (the language
    # model's librkllmrt check keeps "library").
    runtime = DoctorReport()
    info = _check_rknn_runtime(fs, runtime, library)
    for check in runtime.checks:
        report.add(f"vision.{check.id}", check.status, f"vision {check.title}", check.detail, check.fix, check.source)
    report.facts["vision_library"] = info
    footprint = encoder_footprint(manifest)
    report.facts["vision"] = {"family": manifest.family, "image_size": manifest.preprocessing.width,
                              "image_tokens": manifest.image_tokens, "default_dtype": manifest.default_dtype,
                              "encoder_bytes": footprint.weights_bytes,
                              "embedding_bytes_per_image": footprint.embedding_bytes_per_image}
    # UNKNOWN: librknnrt's working buffers for the encoder are not in the file (rknn_query MEM_SIZE on a board).
    report.add("vision.memory", "info", "vision memory",
               f"{manifest.default_dtype} encoder {footprint.weights_bytes / 2**20:.1f} MiB + "
               f"{footprint.embedding_bytes_per_image / 2**20:.2f} MiB per image ({manifest.image_tokens} tokens x "
               f"{manifest.hidden_size} float32), beside the language model")


# --- the board -------------------------------------------------------------------------------------------

def _check_board(fs: Root, report: DoctorReport) -> str | None:
    raw_model = fs.read(SYSFS["dt_model"])
    raw_compatible = fs.read(SYSFS["dt_compatible"])
    model = raw_model.replace("\0", "").strip() if isinstance(raw_model, str) else None
    compatible = [c for c in raw_compatible.split("\0") if c] if isinstance(raw_compatible, str) else []
    soc = soc_from_compatible(compatible)
    board = match_board(model, compatible)
    report.facts.update({"dt_model": model, "dt_compatible": compatible, "soc": soc,
                         "board": board.id if board else None})
    if not compatible:
        report.add("soc", "fail", "SoC", "no device tree at /proc/device-tree: this is not a Rockchip board",
                   "run rkedge doctor on the board (rkedge convert runs on the PC)", "F-6")
        return None
    platform = RKLLM_SOCS.get(soc or "")
    name = f"{board.name} ({model})" if board else (model or "unknown board")
    if platform is None:
        report.add("soc", "fail", "SoC", f"{(soc or 'unknown').upper()} on {name}: librkllmrt runs on RK3588, "
                   "RK3576, RK3562 and RV1126B only (on other SoCs it stops with 'Platform error ... Your platform "
                   "is lite')", "use an RK3588 board", "F-6: rknn-llm#416")
    elif platform != "rk3588":
        report.add("soc", "warn", "SoC", f"{(soc or '').upper()} on {name}: an RKLLM platform, but rkedge's board "
                   "profiles and speed figures are for RK3588", f"convert models with --platform {platform}", "F-6")
    else:
        detail = f"{soc.upper()} on {name}" if soc else name
        if board is None:
            detail += " (board not in rkedge's profiles; the SoC is supported)"
        report.add("soc", "ok", "SoC", detail, source="boards/*.json")
    report.facts["platform"] = platform
    return platform


def _check_memory(fs: Root, report: DoctorReport) -> dict[str, int]:
    text = fs.read("/proc/meminfo")
    values: dict[str, int] = {}
    if isinstance(text, str):
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if rest.split():
                values[key] = int(rest.split()[0]) * 1024
    total, available, swap = values.get("MemTotal", 0), values.get("MemAvailable", 0), values.get("SwapTotal", 0)
    report.facts.update({"mem_total": total, "mem_available": available, "swap_total": swap})
    if not total:
        report.add("memory", "warn", "RAM", "/proc/meminfo not readable")
    else:
        report.add("memory", "ok", "RAM", f"{total / GIB:.1f} GiB total, {available / GIB:.1f} GiB available, "
                   f"swap {swap / GIB:.1f} GiB")
    return {"total": total, "available": available, "swap": swap}


def _check_driver(fs: Root, report: DoctorReport) -> str | None:
    """boards.md section 6: debugfs (root), /sys/module/rknpu/version (no root), the boot log."""
    version = None
    where = None
    debugfs = fs.read(SYSFS["rknpu_version_debugfs"])
    if isinstance(debugfs, str):
        match = re.search(r"v?(\d+\.\d+\.\d+)", debugfs)
        version, where = (match.group(1), SYSFS["rknpu_version_debugfs"]) if match else (None, None)
    if version is None:
        module = fs.read(SYSFS["rknpu_version_module"])
        found = re.search(r"\d+\.\d+\.\d+", module) if isinstance(module, str) else None
        if found:
            version, where = found.group(0), SYSFS["rknpu_version_module"]
    if version is None:
        for log in ("/var/log/kern.log", "/var/log/dmesg"):
            text = fs.read(log)
            if isinstance(text, str):
                match = re.search(r"Initialized rknpu (\d+\.\d+\.\d+)|Initialized RKNPU driver: v(\d+\.\d+\.\d+)", text)
                if match:
                    version, where = match.group(1) or match.group(2), log
                    break
    report.facts["rknpu_driver"] = version
    if version is None:
        rocket = fs.path("/sys/module/rocket").exists()
        if rocket:
            report.add("driver", "fail", "NPU driver", "the mainline 'rocket' driver is loaded and no vendor rknpu "
                       "driver: librkllmrt does not work with rocket", f"boot a vendor kernel (5.10/6.1) with rknpu {DRIVER_WARN_BELOW}",
                       "boards.md section 7; rknn-toolkit2#570, rkllama#97")
            return None
        debug_dir = fs.path(SYSFS["rknpu_debugfs"]).parent
        hidden = debugfs is DENIED or (debug_dir.is_dir() and not any(debug_dir.iterdir()))
        detail = ("/sys/kernel/debug is not readable (debugfs needs root, or is not mounted) and "
                  "/sys/module/rknpu/version is missing" if hidden else "no rknpu driver found")
        fix = ("sudo rkedge doctor (or: sudo cat /sys/kernel/debug/rknpu/version; mount -t debugfs none "
               "/sys/kernel/debug)" if hidden else f"use a vendor kernel image with the rknpu driver ({DRIVER_WARN_BELOW})")
        report.add("driver", "warn" if hidden else "fail", "NPU driver", detail, fix, "boards.md section 6")
        return None
    verdict = fit.driver_verdict(version)
    if verdict == "fail":
        report.add("driver", "fail", "NPU driver", f"rknpu {version} (read from {where}) is older than "
                   f"{DRIVER_FAIL_BELOW}; RKLLM runs fail ('matmul(w8a8) run failed', NPU malloc errors)",
                   f"update the board's kernel to one with rknpu {DRIVER_WARN_BELOW}", fit.SOURCES["DRIVER_FAIL_BELOW"])
    elif verdict == "warn":
        report.add("driver", "warn", "NPU driver", f"rknpu {version} (read from {where}); the runtime wants "
                   f"{DRIVER_WARN_BELOW} and warns 'driver version is too low'; weight buffers over "
                   f"{fit.DRIVER_GATE_BYTES // GIB} GiB fail to map on 0.9.6",
                   f"update to rknpu {DRIVER_WARN_BELOW} (Radxa: rsetup -> System Update; Armbian vendor rkr4.1+; "
                   "Orange Pi 2025-04+)", fit.SOURCES["DRIVER_WARN_BELOW"])
    else:
        report.add("driver", "ok", "NPU driver", f"rknpu {version} (read from {where})", source="SDK manual 2.4")
    return version


def _check_library(fs: Root, report: DoctorReport, library: str | None, abi: str | None) -> dict[str, Any]:
    """librkllmrt found and its ABI selected the way ``rkedge chat`` will (library.find_library/select_abi)."""
    from rkedge.errors import AbiSelectionError, LibraryNotFoundError
    from rkedge.runtime.library import ENV_ABI, detect_abi, find_library, resolve_library, select_abi

    info: dict[str, Any] = {"path": None, "abi": None, "version": None, "simulated": False}
    report.facts["library"] = info
    if library == "mock":
        chosen = resolve_library("mock", abi)
        info.update(path=str(chosen.path), abi=chosen.abi, version=chosen.runtime_version, simulated=True)
        report.add("library", "ok", "librkllmrt", f"simulated NPU, ABI {chosen.abi} (runtime {chosen.runtime_version})")
        return info
    try:
        path = find_library(library, root=fs.root)
        detection = detect_abi(path)  # one read of the file: ABI, machine and simulated-NPU marker together
    except LibraryNotFoundError as exc:
        report.add("library", "fail", "librkllmrt", exc.message, exc.fix, "rknn-llm rkllm-runtime")
        return info
    except RkedgeError as exc:
        report.add("library", "fail", "librkllmrt", exc.message, exc.fix)
        return info
    machine, simulated = detection.machine, detection.simulated
    info.update(path=str(path), version=detection.runtime_version, simulated=simulated, machine=machine)
    if machine not in ("aarch64",) and not simulated:
        report.add("library", "warn", "librkllmrt", f"{path} is built for {machine}, not aarch64")
    explicit = abi or os.environ.get(ENV_ABI) or None
    try:
        chosen = select_abi(path, detection, explicit, "--abi" if abi else f"${ENV_ABI}")
    except AbiSelectionError as exc:
        if explicit:  # rkedge chat would refuse this pairing
            report.add("library", "fail", "librkllmrt", exc.message, exc.fix)
        else:
            report.add("library", "warn", "librkllmrt", f"{path}: {detection.evidence}; the version cannot be told "
                       f"between {', '.join(detection.candidates)}", "pass --abi with the release you installed")
        return info
    info.update(abi=chosen.abi, version=detection.runtime_version or explicit)
    report.add("library", "ok", "librkllmrt",
               f"{path}: runtime {info['version'] or '?'}, ABI {chosen.abi} ({detection.evidence})"
               + (" [simulated NPU]" if simulated else ""))
    return info


def _check_clocks(fs: Root, report: DoctorReport) -> None:
    governors = {}
    for policy, folder in SYSFS["cpufreq_policies"].items():
        text = fs.read(f"{folder}/scaling_governor")
        if isinstance(text, str):
            governors[policy] = text.strip()
    npu_governor = fs.read(f"{SYSFS['npu_devfreq']}/governor")
    npu_freq = fs.read(f"{SYSFS['npu_devfreq']}/cur_freq")
    report.facts.update({"cpu_governors": governors,
                         "npu_governor": npu_governor.strip() if isinstance(npu_governor, str) else None,
                         "npu_freq_hz": int(npu_freq) if isinstance(npu_freq, str) and npu_freq.strip().isdigit() else None})
    if not governors:
        report.add("clocks", "info", "CPU/NPU clocks", "cpufreq not readable")
        return
    pinned = all(g in ("performance", "userspace") for g in governors.values())
    freq = report.facts["npu_freq_hz"]
    detail = ", ".join(f"{p} {g}" for p, g in governors.items())
    if freq:
        detail += f"; NPU {freq / 1e6:.0f} MHz ({report.facts['npu_governor']})"
    report.add("clocks", "ok" if pinned else "info", "CPU/NPU clocks", detail,
               None if pinned else "for benchmark speeds pin the clocks: sudo scripts/rk3588-pin-freq.sh pin",
               "boards.md sections 4-5")


# --- the model -------------------------------------------------------------------------------------------

def _model_metadata(model: Path) -> tuple[Mapping[str, Any], str]:
    from rkedge.manifest import read_manifest
    from rkedge.modelfile import toolkit_version_trailer
    from rkedge.runtime.simmodel import is_simulated_model, read_simulated_model

    if is_simulated_model(model):
        return read_simulated_model(model), "simulated model"
    manifest = read_manifest(model)
    if manifest is not None:
        return manifest, "manifest"
    trailer = toolkit_version_trailer(model)
    return ({"toolkit_version": trailer} if trailer else {}), "file trailer" if trailer else "nothing"


def _check_model(report: DoctorReport, model: Path, *, soc: str | None, memory: dict[str, int], driver: str | None,
                 runtime: dict[str, Any]) -> None:
    if not model.is_file():
        report.add("model", "fail", "model", f"{model} not found")
        return
    meta, source = _model_metadata(model)
    toolkit = meta.get("toolkit_version") or (meta.get("toolkit") or {}).get("version")
    platform = (meta.get("platform") or "").lower() or None
    report.facts["model"] = {"path": str(model), "metadata_from": source, "toolkit_version": toolkit,
                             "platform": platform, "dtype": meta.get("dtype"),
                             "max_context_limit": meta.get("max_context_limit")}
    if isinstance(meta, Manifest):
        # The same rule the runtime applies at load (name and size), plus the digest: doctor has time to hash.
        try:
            check_model_file(meta, model, verify_sha256=True)
        except ModelFileError as exc:
            report.add("model.manifest", "fail", "model vs manifest", exc.message, exc.fix)
        else:
            report.add("model.manifest", "ok", "model vs manifest", "name, size and sha256 match")
    simulated = bool(meta.get("simulated")) or source == "simulated model"
    if simulated and not runtime.get("simulated"):
        report.add("model.kind", "fail", "model", f"{model.name} is an rkedge simulated model (no weights); a real "
                   "librkllmrt cannot load it", "convert with the real rkllm-toolkit for the board, or use --mock")
    if platform and soc and platform != soc:
        report.add("model.platform", "fail", "model platform", f"converted for {platform}, this board is {soc}",
                   f"reconvert with --platform {soc}", "F-6")
    elif platform:
        report.add("model.platform", "ok", "model platform", platform)
    version = runtime.get("version")
    if toolkit and version:
        model_gen, runtime_gen = version_key(toolkit)[:2], version_key(version)[:2]
        if model_gen < (1, 1) <= runtime_gen:
            report.add("model.skew", "fail", "model/runtime", f"model from toolkit {toolkit}, runtime {version}: "
                       "1.0.x models do not load on 1.1+ runtimes ('invalid rknn llm model magic')",
                       "reconvert with the toolkit version of the runtime", "F-3")
        elif model_gen > runtime_gen:
            report.add("model.skew", "fail", "model/runtime", f"model from toolkit {toolkit} is newer than runtime "
                       f"{version} ('invalid magic characters')", f"install librkllmrt {toolkit} or reconvert with "
                       f"toolkit {version}", "F-3: rknn-llm#235")
        elif toolkit != version:
            report.add("model.skew", "warn", "model/runtime", f"model from toolkit {toolkit}, runtime {version}: "
                       "loads, but behaviour can drift across versions (e.g. a different EOS token, rknn-llm#534; "
                       "1.1.x models are capped at 4096 context)",
                       "convert with the same version as the runtime", "F-4")
        else:
            report.add("model.skew", "ok", "model/runtime", f"toolkit {toolkit} = runtime {version}")
    elif not toolkit:
        report.add("model.skew", "warn", "model/runtime", f"the model's toolkit version is unknown ({source})",
                   "keep the manifest (<model>.rkllm.json) beside the model", "F-3")
    _check_model_memory(report, meta, memory, driver)


def _check_model_memory(report: DoctorReport, meta: Mapping[str, Any], memory: dict[str, int], driver: str | None, *,
                        iommu_domain_selector: bool = True) -> None:
    estimate = meta.get("estimate") or {}  # rkedge plan's estimate, recorded by convert
    weight = int(estimate.get("weight_bytes") or 0)
    need = int(estimate.get("total_bytes") or 0)
    if not need:
        parts = weight + int(estimate.get("embedding_bytes") or 0) + int(estimate.get("kv_cache_bytes") or 0)
        if not parts:
            size = int(meta.get("size") or 0)
            weight, parts = size, size
        if not parts:
            return
        need = parts + RUNTIME_OVERHEAD_BYTES
    ram = memory.get("total") or 0
    if ram:
        # MemTotal is what the kernel left after its own reservations: it is the usable RAM already.
        verdict = fit.memory_verdict(need, ram)
        if verdict == "does not fit":
            report.add("model.memory", "fail", "model memory", f"~{need / GIB:.1f} GiB needed, {ram / GIB:.1f} GiB RAM",
                       "use a smaller model or a smaller max_context", "rkedge plan")
        elif verdict == "tight":
            report.add("model.memory", "warn", "model memory", f"~{need / GIB:.1f} GiB of {ram / GIB:.1f} GiB RAM",
                       "close other programs; consider a smaller max_context", "rkedge plan")
        else:
            report.add("model.memory", "ok", "model memory", f"~{need / GIB:.1f} GiB of {ram / GIB:.1f} GiB RAM")
    if fit.spans_iommu_domains(weight) and iommu_domain_selector:
        report.add("model.iommu", "warn", "NPU IOMMU", f"~{weight / GIB:.1f} GiB of weights span more than one "
                   f"{fit.IOMMU_DOMAIN_BYTES // GIB} GiB NPU IOMMU domain",
                   "use --base-domain-id 1 if init fails with 'failed to malloc npu memory'",
                   fit.SOURCES["IOMMU_DOMAIN_BYTES"])
    if fit.driver_cannot_map(driver, weight):
        report.add("model.iommu-driver", "fail", "NPU IOMMU", f"rknpu {driver} cannot map weight buffers over "
                   f"{fit.DRIVER_GATE_BYTES // GIB} GiB (this model has ~{weight / GIB:.1f} GiB; every reported "
                   ">2 GiB failure was on 0.8.2/0.9.6)", f"update rknpu to {fit.DRIVER_GATE_FIXED_IN}",
                   fit.SOURCES["DRIVER_GATE_BYTES"])


# --- RKNN bundles (RecurrentGemma) -----------------------------------------------------------------------------

#: Where rknn-toolkit-lite2 looks for librknnrt.so on the board (Rockchip's install instructions).
RKNNRT_SEARCH = ("/usr/lib/librknnrt.so", "/usr/lib64/librknnrt.so", "/usr/local/lib/librknnrt.so")


def _check_rknn_runtime(fs: Root, report: DoctorReport, library: str | None) -> dict[str, Any]:
    """RKNNLite and librknnrt on the board; the rknn-toolkit2 simulator with --mock."""
    import importlib.util

    if library in ("mock", "simulator"):
        found = importlib.util.find_spec("rknn") is not None
        report.add("library", "ok" if found else "fail", "RKNN runtime",
                   "rknn-toolkit2 simulator" if found else "rknn-toolkit2 (the simulator) is not installed",
                   None if found else "scripts/install-rknn-toolkit2.sh (x86_64 hosts)")
        info = {"path": "simulator" if found else None, "simulated": True}
    else:
        lite = importlib.util.find_spec("rknnlite") is not None
        report.add("rknnlite", "ok" if lite else "fail", "RKNNLite",
                   "rknn-toolkit-lite2 is installed" if lite else "rknn-toolkit-lite2 is not installed",
                   None if lite else "pip install 'rkedge[rknn-board]'")
        lib = next((fs.path(p) for p in RKNNRT_SEARCH if fs.path(p).is_file()), None)
        report.add("library", "ok" if lib else "fail", "librknnrt", str(lib) if lib else
                   f"not found (looked in {', '.join(RKNNRT_SEARCH)})",
                   None if lib else "copy rknpu2/runtime/Linux/librknn_api/aarch64/librknnrt.so from rknn-toolkit2 "
                   "to /usr/lib")
        info = {"path": str(lib) if lib and lite else None, "simulated": False}
    report.facts["library"] = info
    return info


def _check_bundle(report: DoctorReport, model: Path, *, soc: str | None, memory: dict[str, int]) -> None:
    from rkedge.runtime.rknn.bundle import read_bundle

    try:
        folder, bundle = read_bundle(model)
    except RkedgeError as exc:
        report.add("model", "fail", "model", exc.message, exc.fix)
        return
    graphs = [*bundle["graphs"], *bundle["heads"]]
    graph_bytes = sum(int(g.get("rknn_bytes") or (folder / g["rknn"]).stat().st_size) for g in graphs)
    embedding = folder / bundle["embedding"]["file"]
    platform = bundle.get("platform")
    report.facts["model"] = {"path": str(model), "metadata_from": "bundle.json", "backend": "rknn",
                             "platform": platform, "dtype": bundle.get("dtype"), "graphs": len(graphs),
                             "graph_bytes": graph_bytes, "quality": bundle.get("quality")}
    report.add("model", "ok", "model", f"RKNN bundle: {len(graphs)} graphs, {graph_bytes / GIB:.2f} GiB, "
               f"{bundle.get('dtype')}, rknn-toolkit2 {bundle.get('versions', {}).get('rknn_toolkit2')}")
    board_platform = soc or report.facts.get("soc")  # any SoC, not only RKLLM's: rknn-toolkit2 has more
    if platform and board_platform and platform != board_platform:
        report.add("model.platform", "fail", "model platform", f"built for {platform}, this board is "
                   f"{board_platform}", "RecurrentGemma's RKNN backend targets rk3588: run it on an RK3588 board",
                   "F-6")
    elif platform:
        report.add("model.platform", "ok", "model platform", platform)
    biggest = max(int(g.get("rknn_bytes") or 0) for g in graphs)
    if biggest >= 2 * GIB:
        report.add("model.iommu", "warn", "NPU IOMMU", f"one graph holds {biggest / GIB:.1f} GiB; librknnrt cannot "
                   "choose an IOMMU domain and old rknpu drivers fail to map buffers over 2 GiB",
                   "rebuild with a smaller --graph-params", "recurrentgemma-rknn-feasibility.md section 6")
    estimate = {"weight_bytes": graph_bytes,
                "total_bytes": graph_bytes + (embedding.stat().st_size if embedding.is_file() else 0)
                + RUNTIME_OVERHEAD_BYTES}
    _check_model_memory(report, {"estimate": estimate}, memory, None, iommu_domain_selector=False)


def _trial_init(report: DoctorReport, model: Path, runtime: dict[str, Any], library: str | None,
                abi: str | None, *, rknn_bundle: bool) -> None:
    """Initialises the model with a tiny context in a child process and reads its stderr."""
    if runtime.get("path") is None:
        report.add("trial-init", "skip", "trial init", "no runtime library")
        return
    lib = "mock" if library == "mock" else None if rknn_bundle else str(runtime["path"])
    argv = [sys.executable, "-m", "rkedge.runtime.trial_init", str(model)] + (["--lib", lib] if lib else [])
    if runtime.get("abi"):
        argv += ["--abi", str(runtime["abi"])]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RKLLM_LOG_LEVEL": "1"})
    except subprocess.TimeoutExpired:
        report.add("trial-init", "fail", "trial init", "rkllm_init did not return within 300 s")
        return
    found = scan(proc.stderr, "runtime")
    errors = [m for m in found if m.severity == "error"]
    result = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    report.facts["trial_init"] = {"returncode": proc.returncode, "result": result,
                                  "stderr_tail": proc.stderr.splitlines()[-12:]}
    if proc.returncode < 0:
        report.add("trial-init", "fail", "trial init", f"the runtime crashed (signal {-proc.returncode})",
                   "1.3.0 segfaults when NPU memory runs out (rknn-llm#522): free memory, try --base-domain-id 1")
    elif errors:
        first = errors[0]
        report.add("trial-init", "fail", "trial init", f"{first.id}: {first.message} (runtime said: {first.line})",
                   first.fix, first.failure.source)
    elif result.get("ok"):
        report.add("trial-init", "ok", "trial init", f"the model initialised ({result.get('detail', '')})")
    else:
        report.add("trial-init", "fail", "trial init", result.get("error") or proc.stderr.strip()[-300:] or "failed")
    for warning in (m for m in found if m.severity == "warning"):
        report.add("trial-init.warning", "warn", "runtime warning", f"{warning.id}: {warning.message}", warning.fix)
