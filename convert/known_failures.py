"""Conversions known to produce a model that fails on the board (data).

Each entry is a combination the toolkit accepts but the board rejects. The planner refuses a match by
default with the reason and the fix; ``--allow-known-failure`` turns the refusal into a warning (and the
simulated toolkit then writes the failure into the simulated model, so the simulated board reproduces it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rkedge.convert.rules import version_key


@dataclass(frozen=True)
class KnownConversionFailure:
    id: str
    architectures: tuple[str, ...]
    platforms: tuple[str, ...]
    toolkit_first: str
    toolkit_last: str
    only_plain: tuple[str, ...]  # the one configuration that works: these dtypes with hybrid_rate 0
    message: str
    fix: str
    source: str
    board_fault: dict[str, Any]  # how the simulated NPU reproduces the failure

    def matches(self, *, architecture: str | None, platform: str, toolkit_version: str, dtype: str,
                hybrid_rate: float) -> bool:
        return (
            architecture in self.architectures
            and platform in self.platforms
            and version_key(self.toolkit_first) <= version_key(toolkit_version) <= version_key(self.toolkit_last)
            and not (dtype in self.only_plain and hybrid_rate == 0)
        )


KNOWN_FAILURES: tuple[KnownConversionFailure, ...] = (
    KnownConversionFailure(
        id="F-1.gemma2-rk3588-1.1",
        architectures=("Gemma2ForCausalLM",),
        platforms=("rk3588",),
        toolkit_first="1.1.0",
        toolkit_last="1.1.4",
        only_plain=("w8a8",),
        message="Gemma 2 converted for RK3588 with rkllm-toolkit 1.1.x in any mode but plain w8a8 loads on the board "
        "with 'E RKNN: failed to malloc npu memory, size: 232128512, flags: 0x2' / 'rknn_init fail! ret=-1' "
        "(the NPU cannot map a weight buffer into its IOMMU address space; grouped dtypes add per-group scales "
        "and need more NPU memory)",
        fix="use --dtype w8a8 with --hybrid-rate 0 (plain w8a8), or a toolkit/runtime of 1.2.x or newer",
        source="F-1: gemma-2-9b-it RK3588 model card (RKLLM 1.1.1, all non-w8a8 types); rknpu driver sources",
        board_fault={"init": "npu_malloc", "npu_malloc_size": 232128512},
    ),
)


def matching(**request: Any) -> list[KnownConversionFailure]:
    return [failure for failure in KNOWN_FAILURES if failure.matches(**request)]
