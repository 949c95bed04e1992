"""What the conversion host has: a CUDA GPU, free memory, its Python. Read once per question, never cached:
the planner asks before a conversion, the RKNN build sizes its graphs by it, the manifest records it."""

from __future__ import annotations

import os
import platform
from typing import Any


def cuda_present() -> bool:
    """An NVIDIA driver is loaded (grq/gdq quantization needs CUDA); torch is not imported to find out."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")


def host_memory() -> tuple[int, int]:
    """(MemAvailable, SwapFree) in bytes from /proc/meminfo; (0, 0) where there is none."""
    try:
        values = {}
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
        return values.get("MemAvailable", 0), values.get("SwapFree", 0)
    except OSError:
        return 0, 0


def host_description() -> dict[str, Any]:
    """The host as the manifest records it."""
    available, swap = host_memory()
    return {"machine": platform.machine(), "python": platform.python_version(),
            "memory_available": available, "swap_free": swap, "cpus": os.cpu_count()}
