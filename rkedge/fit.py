"""Will a model fit a board: the RAM, NPU IOMMU and rknpu-driver verdicts host and board both give.

``rkedge plan`` and ``convert``'s board-fit check (host, from an estimate) and ``rkedge doctor`` (board, from
/proc/meminfo and the model's manifest) call these functions, so the two sides cannot disagree. The thresholds
are data, each with its source in :data:`SOURCES`.
"""

from __future__ import annotations

from typing import Literal

from rkedge.versions import older_than

GIB = 1 << 30
MemoryVerdict = Literal["fits", "tight", "does not fit"]
DriverVerdict = Literal["ok", "warn", "fail"]

#: Below this share of the usable RAM a model "fits"; up to all of it, it is "tight".
COMFORT_SHARE = 0.85
#: RAM a headless board image keeps for itself (kernel, CMA, services), subtracted from a nominal RAM size.
SYSTEM_RESERVE_BYTES = int(0.75 * GIB)
#: What one NPU IOMMU domain maps; weights above it span several domains (F-1).
IOMMU_DOMAIN_BYTES = 4 * GIB
#: rknpu drivers before DRIVER_GATE_FIXED_IN fail to map weight buffers above this (F-1 hypothesis).
DRIVER_GATE_BYTES = 2 * GIB
DRIVER_GATE_FIXED_IN = "0.9.8"
#: rknpu versions: below FAIL runs fail; below WARN the runtime warns (and the driver gate applies).
DRIVER_FAIL_BELOW = "0.9.6"
DRIVER_WARN_BELOW = "0.9.8"
#: Added to a model's weights + embedding + KV cache when its manifest records no total (the runtime itself).
RUNTIME_OVERHEAD_BYTES = 400 << 20

SOURCES: dict[str, str] = {
    "COMFORT_SHARE": "rkedge's margin, an assumption: little is left for anything else, and swap makes it slow",
    "SYSTEM_RESERVE_BYTES": "an assumption, stated: no measured figure for a headless board image is known",
    "IOMMU_DOMAIN_BYTES": "F-1: rknpu_iommu.c dma_limit 1<<32; rknn-llm#139, #195, #232",
    "DRIVER_GATE_BYTES": "F-1 hypothesis (size-aligned IOVA allocator before 0.9.8); every reported >2 GiB failure "
                         "was on 0.8.2/0.9.6",
    "DRIVER_GATE_FIXED_IN": "F-1 hypothesis; boards.md section 6",
    "DRIVER_FAIL_BELOW": "F-5; SDK manual section 2.4",
    "DRIVER_WARN_BELOW": "F-5, F-1 hypothesis; boards.md section 6",
    "RUNTIME_OVERHEAD_BYTES": "an assumption: rkedge doctor's allowance when a manifest has no plan estimate "
                              "(the plan's own runtime term is fitted, convert/perf_model.py)",
}


def usable_bytes(ram_gb: float) -> float:
    """What a board sold with ``ram_gb`` GB leaves for a model."""
    return ram_gb * GIB - SYSTEM_RESERVE_BYTES


def memory_verdict(need_bytes: float, usable: float) -> MemoryVerdict:
    if need_bytes > usable:
        return "does not fit"
    if need_bytes > COMFORT_SHARE * usable:
        return "tight"
    return "fits"


def iommu_domains(weight_bytes: int) -> int:
    """How many 4 GiB NPU IOMMU domains the weights span (1 for any model that fits one)."""
    return max(1, -(-weight_bytes // IOMMU_DOMAIN_BYTES))


def spans_iommu_domains(weight_bytes: int) -> bool:
    return weight_bytes > IOMMU_DOMAIN_BYTES


def needs_driver_gate(weight_bytes: int) -> bool:
    """Weights this large need rknpu DRIVER_GATE_FIXED_IN or newer."""
    return weight_bytes > DRIVER_GATE_BYTES


def driver_cannot_map(driver: str | None, weight_bytes: int) -> bool:
    """A known driver older than DRIVER_GATE_FIXED_IN, with weights above the gate."""
    return driver is not None and older_than(driver, DRIVER_GATE_FIXED_IN) and needs_driver_gate(weight_bytes)


def driver_verdict(version: str) -> DriverVerdict:
    if older_than(version, DRIVER_FAIL_BELOW):
        return "fail"
    if older_than(version, DRIVER_WARN_BELOW):
        return "warn"
    return "ok"
