"""Known runtime failure texts (data) and a scanner for runtime logs.

Each entry quotes the text ``librkllmrt`` prints for a failure mode of the catalogue in
``shared/knowledge/converter-anchors-and-failure-modes.md`` section 4, with what it means and what to do.
``rkllm_init`` on 1.1.x returns 0 after some of these, so callers scan stderr instead of trusting the code.
Used by :class:`rkedge.runtime.LLM` at init and by ``rkedge doctor --trial-init``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownFailure:
    id: str
    pattern: str
    severity: str  # "error" stops the model from working; "warning" is worth fixing
    summary: str  # may use the pattern's named groups
    fix: str
    source: str


@dataclass(frozen=True)
class FailureMatch:
    failure: KnownFailure
    line: str
    summary: str


KNOWN_FAILURES: tuple[KnownFailure, ...] = (
    KnownFailure(
        id="F-1",
        pattern=r"failed to malloc npu memory, size: (?P<size>\d+)",
        severity="error",
        summary="the NPU could not map a {size}-byte weight buffer into its IOMMU address space "
        "(each NPU IOMMU domain maps at most 4 GiB; errno 14 is a failed DMA mapping, not plain RAM exhaustion)",
        fix="retry with base_domain_id=1 (rkedge: --base-domain-id 1); update the rknpu driver to 0.9.8; "
        "for large models convert with plain w8a8 (grouped dtypes need more NPU memory); "
        "check `dmesg | grep 'dma map'`",
        source="F-1: gemma-2-9b-it RK3588 model card; rknn-llm#139, #195, #232, #335; rknpu driver sources",
    ),
    KnownFailure(
        id="F-3",
        pattern=r"invalid rknn llm model magic",
        severity="error",
        summary="the model was converted by rkllm-toolkit 1.0.x, which runtimes 1.1 and newer cannot read",
        fix="reconvert the model with the toolkit version that matches the runtime on the board "
        "(rkedge convert --toolkit-version <runtime version>)",
        source="F-3 (b): rknn-llm#129, ezrknpu#11, ezrknn-llm#19; README v1.1.0",
    ),
    KnownFailure(
        id="F-3",
        pattern=r"invalid magic characters",
        severity="error",
        summary="the model comes from a newer rkllm-toolkit than this runtime can read",
        fix="install the runtime release that matches the model's toolkit version (see its manifest), "
        "or reconvert with the toolkit version of this runtime",
        source="F-3 (c): rknn-llm#235",
    ),
    KnownFailure(
        id="F-6",
        pattern=r"target_platform does not match",
        severity="error",
        summary="the model was built for another SoC than this board",
        fix="reconvert with --platform set to this board's SoC (rkedge doctor shows it)",
        source="F-3 (a) / F-6: ezrknn-llm#5, av1d/rk3588_npu_llm_server#2",
    ),
    KnownFailure(
        id="F-7",
        pattern=r"max_context\[(?P<asked>\d+)\] must be less than the model's max_context_limit\[(?P<limit>\d+)\]",
        severity="error",
        summary="max_context_len {asked} is above the context the model was converted with ({limit})",
        fix="use --max-context {limit} or less, or reconvert with a larger --max-context (at most 16384)",
        source="F-7: rkllama#60, #64",
    ),
    KnownFailure(
        id="F-13",
        pattern=r"invalid rkllm model!",
        severity="error",
        summary="the file is not a model rkllm-toolkit produced (some third-party converters write files "
        "the runtime cannot read)",
        fix="convert the model with rkllm-toolkit (rkedge convert) and copy the .rkllm it writes",
        source="F-13: rkllama#55, #99",
    ),
    KnownFailure(
        id="F-5",
        pattern=r"matmul\(w8a8\) run failed",
        severity="error",
        summary="an NPU operation failed during generation, as seen with rknpu drivers older than 0.9.7",
        fix="update the rknpu driver to 0.9.8 (a newer vendor kernel image); rkedge doctor shows the version",
        source="F-5: rknn-llm#187, #290, #413, #449",
    ),
    KnownFailure(
        id="F-5",
        pattern=r"driver version is too low, please upgrade to (?P<wanted>[\d.]+)",
        severity="warning",
        summary="the rknpu kernel driver is older than the runtime wants ({wanted})",
        fix="update the board's kernel to one with rknpu 0.9.8 (vendor 5.10.209 or 6.1.84 images)",
        source="F-5: rknn-llm#232, #335; SDK manual section 2.4",
    ),
)

_COMPILED = tuple((failure, re.compile(failure.pattern)) for failure in KNOWN_FAILURES)


def scan(log: str) -> list[FailureMatch]:
    """Every known failure text in ``log``, in the order they appear."""
    matches: list[FailureMatch] = []
    for line in log.splitlines():
        for failure, regex in _COMPILED:
            found = regex.search(line)
            if found:
                matches.append(FailureMatch(failure, line.strip(), failure.summary.format(**found.groupdict())))
    return matches


def first_error(log: str) -> FailureMatch | None:
    return next((m for m in scan(log) if m.failure.severity == "error"), None)


def fix_for(match: FailureMatch) -> str:
    found = re.search(match.failure.pattern, match.line)
    return match.failure.fix.format(**(found.groupdict() if found else {}))
