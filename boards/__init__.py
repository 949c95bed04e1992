"""Board profiles (data): one JSON file per RK3588 board, read by ``doctor`` and the planner's fit check.

Each ``<id>.json`` next to this module holds what is known about one board: SoC, RAM options, memory type
and bandwidth, and the device-tree ``model``/``compatible`` strings its mainline and vendor kernels report.
Facts come from ``shared/knowledge/boards.md``; what is not known there is ``null`` (and said in ``notes``).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from rkedge.errors import InputError

__all__ = [
    "SYSFS",
    "BoardProfile",
    "DeviceTree",
    "DeviceTreeIds",
    "get_board",
    "is_generic_compatible",
    "load_boards",
    "match_board",
    "soc_from_compatible",
]

#: A SoC-level compatible entry such as ``rockchip,rk3588`` or ``rockchip,rk3588s``: it names the chip, not
#: the board. Board-specific vendor strings carry a suffix (``rockchip,rk3588s-orangepi-5``) and do not match.
_SOC_COMPATIBLE = re.compile(r"rockchip,((?:rk|rv)\d{3,4}[a-z0-9]*)")

#: RK3588 sysfs/debugfs/procfs locations, as documented in shared/knowledge/boards.md (sections 4-6) and
#: converter-anchors-and-failure-modes.md (section 3.5, Appendix B). Nothing here is guessed; the vendor
#: rknpu paths do not exist on mainline (``rocket``) kernels.
SYSFS: Final[dict[str, Any]] = {
    # boards.md section 4 (rk3588-base.dtsi): cpu0-3 Cortex-A55 = policy0; cpu4-5 Cortex-A76 = policy4;
    # cpu6-7 Cortex-A76 = policy6. The four A76 cores are two cpufreq policies.
    "cpufreq_policies": {
        "policy0": "/sys/devices/system/cpu/cpufreq/policy0",
        "policy4": "/sys/devices/system/cpu/cpufreq/policy4",
        "policy6": "/sys/devices/system/cpu/cpufreq/policy6",
    },
    "cpufreq_policy_cpus": {"policy0": (0, 1, 2, 3), "policy4": (4, 5), "policy6": (6, 7)},
    "cpufreq_policy_cores": {"policy0": "cortex-a55", "policy4": "cortex-a76", "policy6": "cortex-a76"},
    # boards.md section 4: files inside each policy directory.
    "cpufreq_files": ("scaling_governor", "scaling_setspeed", "scaling_available_frequencies", "scaling_cur_freq"),
    # boards.md section 4: rknn-llm scripts/fix_freq_rk3588.sh writes 1 here for cpu0-7.
    "cpuidle_state1_disable": "/sys/devices/system/cpu/cpu{cpu}/cpuidle/state1/disable",
    # boards.md section 5: vendor rknpu devfreq node (absent on mainline: rocket has no devfreq code).
    "npu_devfreq": "/sys/class/devfreq/fdab0000.npu",
    # boards.md section 5: GPU and DDR (DMC) devfreq nodes used by the same rknn-llm script.
    "gpu_devfreq": "/sys/class/devfreq/fb000000.gpu",
    "dmc_devfreq": "/sys/class/devfreq/dmc",
    # boards.md section 5: files inside a devfreq directory.
    "devfreq_files": ("available_frequencies", "cur_freq", "governor", "userspace/set_freq"),
    # boards.md section 5: the 0.9.8 rknpu driver's own default devfreq governor.
    "npu_default_governor": "rknpu_ondemand",
    # boards.md section 4/5: values rknn-llm scripts/fix_freq_rk3588.sh pins (governor userspace). CPU in kHz,
    # devfreq in Hz.
    "rknn_llm_pinned_freqs": {
        "policy0": 1800000,
        "policy4": 2352000,
        "policy6": 2352000,
        "npu_devfreq": 1000000000,
        "gpu_devfreq": 1000000000,
        "dmc_devfreq": 2112000000,
    },
    # boards.md section 5: rknpu debugfs directory (root only; CONFIG_ROCKCHIP_RKNPU_DEBUG_FS defaults to y);
    # "mm" exists only with CONFIG_ROCKCHIP_RKNPU_SRAM.
    "rknpu_debugfs": "/sys/kernel/debug/rknpu",
    "rknpu_debugfs_files": ("version", "load", "power", "freq", "volt", "delayms", "reset", "mm"),
    # boards.md section 6, method 1 (RKLLM SDK doc section 2.4): prints "RKNPU driver: v0.9.8"; needs root.
    "rknpu_version_debugfs": "/sys/kernel/debug/rknpu/version",
    # boards.md section 6, method 2: prints "0.9.8"; readable without root (MODULE_VERSION, also when built in).
    "rknpu_version_module": "/sys/module/rknpu/version",
    # boards.md section 5: "NPU load:  Core0: xx%, Core1: xx%, Core2: xx%," sampled over 1 s.
    "rknpu_load": "/sys/kernel/debug/rknpu/load",
    # boards.md section 5: the same files under procfs only with CONFIG_ROCKCHIP_RKNPU_PROC_FS=y (off by default).
    "rknpu_procfs": "/proc/rknpu",
    "rknpu_load_procfs": "/proc/rknpu/load",
    # converter-anchors Appendix B: NUL-separated strings, e.g. "...\0rockchip,rk3588\0"; model likewise.
    "dt_compatible": "/proc/device-tree/compatible",
    "dt_model": "/proc/device-tree/model",
}


@dataclass(frozen=True)
class DeviceTreeIds:
    """The ``model`` spellings and ``compatible`` strings one kernel's device tree reports for a board."""

    model: tuple[str, ...]
    compatible: tuple[str, ...]


@dataclass(frozen=True)
class DeviceTree:
    """Device-tree identities under a mainline and a vendor (BSP) kernel; None where unknown."""

    mainline: DeviceTreeIds | None
    vendor: DeviceTreeIds | None

    def all_ids(self) -> tuple[DeviceTreeIds, ...]:
        """The known identities, mainline first."""
        return tuple(ids for ids in (self.mainline, self.vendor) if ids is not None)


@dataclass(frozen=True)
class BoardProfile:
    """One board, as stored in ``boards/<id>.json`` (see the module docstring)."""

    id: str
    name: str
    vendor: str
    soc: str
    npu_platform: str
    ram_gb: tuple[int, ...] | None
    ram_verified: bool
    memory_type: str | None
    memory_type_verified: bool
    memory_bandwidth_gbs: float | None
    device_tree: DeviceTree
    mainline_npu_enabled: bool | None
    notes: str
    sources: tuple[str, ...]

    @property
    def models(self) -> tuple[str, ...]:
        """Every ``model`` spelling of the board, mainline and vendor."""
        return tuple(m for ids in self.device_tree.all_ids() for m in ids.model)

    @property
    def board_compatibles(self) -> tuple[str, ...]:
        """Every board-specific ``compatible`` string (the SoC-level ``rockchip,rk3588*`` ones left out)."""
        return tuple(c for ids in self.device_tree.all_ids() for c in ids.compatible if not is_generic_compatible(c))


# --- loading -------------------------------------------------------------------------------------------------


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, nullable: bool = False) -> Any:
    if key not in data:
        raise ValueError(f"{where}: missing key {key!r}")
    value = data[key]
    if value is None and nullable:
        return None
    # bool is an int subclass: never accept it where a number is meant.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ValueError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _strings(value: Any, where: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{where}: {key!r} must be a list of non-empty strings")
    return tuple(value)


def _dt_ids(value: Any, where: str) -> DeviceTreeIds | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: must be an object or null")
    return DeviceTreeIds(model=_strings(value.get("model"), where, "model"),
                         compatible=_strings(value.get("compatible"), where, "compatible"))


def _parse(data: Any, where: str) -> BoardProfile:
    """One JSON document to a profile; ValueError names the file and key when the data is malformed."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: top level must be an object")
    ram = _field(data, "ram_gb", list, where, nullable=True)
    if ram is not None and not all(isinstance(x, int) and not isinstance(x, bool) for x in ram):
        raise ValueError(f"{where}: 'ram_gb' must be a list of integers or null")
    dt = _field(data, "device_tree", dict, where)
    bandwidth = _field(data, "memory_bandwidth_gbs", (int, float), where, nullable=True)
    return BoardProfile(
        id=_field(data, "id", str, where),
        name=_field(data, "name", str, where),
        vendor=_field(data, "vendor", str, where),
        soc=_field(data, "soc", str, where),
        npu_platform=_field(data, "npu_platform", str, where),
        ram_gb=tuple(ram) if ram is not None else None,
        ram_verified=_field(data, "ram_verified", bool, where),
        memory_type=_field(data, "memory_type", str, where, nullable=True),
        memory_type_verified=_field(data, "memory_type_verified", bool, where),
        memory_bandwidth_gbs=float(bandwidth) if bandwidth is not None else None,
        device_tree=DeviceTree(mainline=_dt_ids(_field(dt, "mainline", dict, where + " device_tree", True),
                                                where + " device_tree.mainline"),
                               vendor=_dt_ids(_field(dt, "vendor", dict, where + " device_tree", True),
                                              where + " device_tree.vendor")),
        mainline_npu_enabled=_field(data, "mainline_npu_enabled", bool, where, nullable=True),
        notes=_field(data, "notes", str, where),
        sources=_strings(_field(data, "sources", list, where), where, "sources"),
    )


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[BoardProfile, ...]:
    files = sorted((f for f in resources.files(__name__).iterdir() if f.name.endswith(".json")),
                   key=lambda f: f.name)
    profiles = []
    for entry in files:
        profile = _parse(json.loads(entry.read_text(encoding="utf-8")), f"boards/{entry.name}")
        if f"{profile.id}.json" != entry.name:
            raise ValueError(f"boards/{entry.name}: id {profile.id!r} does not match the file name")
        profiles.append(profile)
    return tuple(profiles)


def load_boards() -> list[BoardProfile]:
    """Every packaged board profile, sorted by id (files are read once and cached)."""
    return list(_load_all())


def get_board(board_id: str) -> BoardProfile:
    """The profile with this id.

    Raises:
        InputError: when no board has that id (the message lists the known ids).
    """
    boards = _load_all()
    for board in boards:
        if board.id == board_id:
            return board
    known = ", ".join(board.id for board in boards)
    raise InputError(f"unknown board {board_id!r}.", fix=f"use one of: {known}")


# --- device-tree matching ------------------------------------------------------------------------------------


def is_generic_compatible(entry: str) -> bool:
    """True for a SoC-level entry (``rockchip,rk3588``, ``rockchip,rk3588s``), which identifies no board."""
    return _SOC_COMPATIBLE.fullmatch(entry.strip()) is not None


def soc_from_compatible(compatible: list[str]) -> str | None:
    """The SoC named by the first ``rockchip,<soc>`` entry ("rk3588", "rk3588s", "rk3576"...), else None.

    Vendor kernels may name ``rockchip,rk3588`` on an RK3588S board (boards.md section 1), so this is the SoC
    the device tree claims, which is what the NPU runtime checks.
    """
    for entry in compatible:
        match = _SOC_COMPATIBLE.fullmatch(entry.strip().strip("\x00"))
        if match:
            return match.group(1)
    return None


def match_board(model: str | None, compatible: list[str]) -> BoardProfile | None:
    """The profile for a device tree's ``model`` and ``compatible`` (as read from /proc/device-tree).

    An exact ``model`` match wins. Otherwise the device's board-specific compatible entries are tried in
    their order (most specific first, by device-tree convention) and the first one any profile lists wins;
    a SoM-level entry such as ``friendlyarm,cm3588`` can therefore match a carrier board's profile. SoC-level
    entries (``rockchip,rk3588``) never match, so an unknown board, or a foreign one, gives None.
    """
    boards = _load_all()
    wanted = (model or "").strip().strip("\x00").strip()
    if wanted:
        for board in boards:
            if wanted in board.models:
                return board
    for entry in compatible:
        entry = entry.strip().strip("\x00")
        if not entry or is_generic_compatible(entry):
            continue
        for board in boards:
            if entry in board.board_compatibles:
                return board
    return None
