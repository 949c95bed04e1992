"""rkllm-toolkit rules per version (data), from the SDK manuals 1.0.0 - 1.3.0.

Source for every table: converter-anchors-and-failure-modes.md section 3 (3.1 dtypes per platform, 3.2
build/load/export arguments, 3.4 Python versions) and Appendix A. The planner reads these tables; no other
module encodes a version rule in an ``if``. Version ordering itself lives in :mod:`rkedge.versions` (the board
needs it too).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from rkedge.errors import InputError
from rkedge.versions import version_key as version_key  # shim: callers move to rkedge.versions

TOOLKIT_VERSIONS: tuple[str, ...] = (
    "1.0.0", "1.0.1", "1.0.2", "1.1.0", "1.1.1", "1.1.2", "1.1.3", "1.1.4",
    "1.2.0", "1.2.1", "1.2.2", "1.2.3", "1.3.0",
)

W4A16_FAMILY = ("w4a16", "w4a16_g32", "w4a16_g64", "w4a16_g128")
RK3588_11 = ("w8a8", "w8a8_g128", "w8a8_g256", "w8a8_g512")
RK3576_11 = ("w4a16", "w4a16_g32", "w4a16_g64", "w4a16_g128", "w8a8")
RK3562_12 = ("w8a8", "w4a16_g32", "w4a16_g64", "w4a16_g128", "w4a8_g32")


@dataclass(frozen=True)
class Algorithm:
    dtypes: tuple[str, ...] | None  # None: any dtype
    needs_cuda: bool = False
    exports_lora: bool = False  # the *_rN accuracy-LoRA algorithms also write a LoRA model


@dataclass(frozen=True)
class ToolkitRules:
    first: str
    last: str
    dtypes: Mapping[str, tuple[str, ...]]  # platform -> quantized_dtype values
    npu_cores: Mapping[str, tuple[int, ...]]  # platform -> num_npu_core values (build argument from 1.1.0)
    algorithms: Mapping[str, Algorithm]
    accuracy_lora: tuple[str, ...]  # algorithm stems that take an _rN suffix (N in 1..64)
    load_args: tuple[str, ...]
    build_args: tuple[str, ...]
    export_args: tuple[str, ...]
    python: tuple[str, ...]
    max_context_settable: bool
    source: str
    notes: Mapping[str, str] = field(default_factory=dict)

    def covers(self, version: str) -> bool:
        return version_key(self.first) <= version_key(version) <= version_key(self.last)


BUILD_10 = ("do_quantization", "optimization_level", "quantized_dtype", "target_platform")
BUILD_11 = BUILD_10 + ("quantized_algorithm", "num_npu_core", "extra_qparams", "dataset", "hybrid_rate")
BUILD_12 = BUILD_11 + ("max_context",)
LOAD_11 = ("model", "model_lora", "device")
LOAD_12 = LOAD_11 + ("dtype", "custom_config", "load_weight")
ALGOS_11 = {"normal": Algorithm(None), "gdq": Algorithm(W4A16_FAMILY, needs_cuda=True)}
ALGOS_12 = {"normal": Algorithm(None), "grq": Algorithm(W4A16_FAMILY, True), "gdq": Algorithm(W4A16_FAMILY, True)}
ALGOS_13 = {"normal": Algorithm(None), "grq": Algorithm(W4A16_FAMILY, True)}
DTYPES_12 = {"rk3588": RK3588_11, "rk3576": RK3576_11, "rk3562": RK3562_12}
CORES_12 = {"rk3588": (1, 2, 3), "rk3576": (1, 2), "rk3562": (1,)}
S3 = "converter-anchors-and-failure-modes.md section 3 (SDK manuals)"

RULES: tuple[ToolkitRules, ...] = (
    ToolkitRules(
        "1.0.0", "1.0.2", {"rk3588": ("w8a8",), "rk3576": ("w4a16", "w8a8")}, {}, {}, (), ("model",), BUILD_10,
        ("export_path",), ("3.8",), False, S3 + "; manual 1.0.x: rk3588 supports only w8a8",
        {"num_npu_core": "a runtime parameter in 1.0.x, not a build argument"}),
    ToolkitRules(
        "1.1.0", "1.1.0", {"rk3588": RK3588_11, "rk3576": RK3576_11}, {"rk3588": (1, 2, 3), "rk3576": (1, 2)},
        ALGOS_11, (), LOAD_11, BUILD_11, ("export_path",), ("3.8",), False, S3),
    ToolkitRules(
        "1.1.1", "1.1.4", {"rk3588": RK3588_11, "rk3576": RK3576_11}, {"rk3588": (1, 2, 3), "rk3576": (1, 2)},
        ALGOS_11, (), LOAD_11, BUILD_11, ("export_path",), ("3.8", "3.10"), False, S3),
    ToolkitRules(
        "1.2.0", "1.2.0", DTYPES_12, CORES_12, ALGOS_12, (), LOAD_12, BUILD_12, ("export_path",),
        ("3.8", "3.9", "3.10", "3.11", "3.12"), True, S3),
    ToolkitRules(
        "1.2.1", "1.2.1", {**DTYPES_12, "rv1126b": RK3576_11}, {**CORES_12, "rv1126b": (1,)}, ALGOS_12,
        ("normal", "grq", "gdq"), LOAD_12, BUILD_12, ("export_path",), ("3.8", "3.9", "3.10", "3.11", "3.12"), True,
        S3, {"rv1126b": "the 1.2.1 manual accepts rv1126b but states no dtype list; the 1.2.2 list is assumed"}),
    ToolkitRules(
        "1.2.2", "1.2.2", {**DTYPES_12, "rv1126b": RK3576_11}, {**CORES_12, "rv1126b": (1,)}, ALGOS_12,
        ("normal", "grq", "gdq"), LOAD_12, BUILD_12, ("export_path",), ("3.8", "3.9", "3.10", "3.11", "3.12"), True, S3),
    ToolkitRules(
        "1.2.3", "1.2.3", {**DTYPES_12, "rv1126b": RK3576_11}, {**CORES_12, "rv1126b": (1,)}, ALGOS_12,
        ("normal", "grq", "gdq"), LOAD_12, BUILD_12, ("export_path",), ("3.9", "3.10", "3.11", "3.12"), True, S3),
    ToolkitRules(
        "1.3.0", "1.3.0", {**DTYPES_12, "rv1126b": RK3576_11}, {**CORES_12, "rv1126b": (1,)}, ALGOS_13,
        ("normal", "grq"), LOAD_12, BUILD_12, ("export_path", "export_tokenizer", "export_embedding"),
        ("3.9", "3.10", "3.11", "3.12"), True, S3, {"gdq": "no longer documented in 1.3.0"}),
)

MAX_CONTEXT_LIMIT = 16384
MAX_CONTEXT_MULTIPLE = 32
DEFAULT_MAX_CONTEXT = 4096
OPTIMIZATION_LEVELS = (0, 1)
#: GGUF file types rkllm-toolkit reads (since 1.1.0), by the name GGUF gives them -> the dtype they imply
#: (q4_0 is w4a16_g32, which can never target rk3588; fp16 keeps the requested dtype). Manual section 3.2.
GGUF_TYPES: dict[str, str | None] = {"MOSTLY_F16": None, "MOSTLY_Q4_0": "w4a16_g32"}
GPTQ = {  # manual section 3.1.5
    4: {"since": "1.1.4", "group_sizes": (32, 64, 128)},
    8: {"since": "1.2.0", "group_sizes": (128, 256, 512)},
}


def rules_for(version: str) -> ToolkitRules:
    """The rules of an rkllm-toolkit version.

    Raises:
        InputError: for versions outside 1.0.0 - 1.3.0.
    """
    for rules in RULES:
        if rules.covers(version):
            return rules
    raise InputError(f"unknown rkllm-toolkit version {version!r}.",
                     fix=f"use one of: {', '.join(TOOLKIT_VERSIONS)}")


def group_size(dtype: str) -> int | None:
    """``w8a8_g128`` -> 128; ungrouped dtypes -> None."""
    match = re.search(r"_g(\d+)$", dtype)
    return int(match.group(1)) if match else None


def algorithm_stem(algorithm: str) -> tuple[str, int | None]:
    """``normal_r16`` -> ("normal", 16)."""
    match = re.fullmatch(r"([a-z]+)_r(\d+)", algorithm)
    return (match.group(1), int(match.group(2))) if match else (algorithm, None)


# --- rules the planner and the pipeline apply (added by the toolkit-seam work; kept out of their ifs) ---------

#: optimization_level 1 costs runtime speed; Rockchip's benchmarks convert with 0 from this version on
#: (benchmark.md, v1.2.1+), so the planner warns from here.
OPTIMIZATION_SPEED_WARNING_SINCE = "1.2.1"
#: Versions whose runtime-LoRA conversion errors the maintainers answered with "use 1.2.1" (rknn-llm#357).
RUNTIME_LORA_WEAK_VERSIONS: tuple[str, ...] = ("1.2.0",)
#: Host memory the toolkit holds per parameter while converting, by load dtype (model + calibration state;
#: F-11: rknn-llm#30, ez-er#2, BEG measurements), and the margin added on top.
HOST_BYTES_PER_PARAM: Mapping[str, float] = {"float32": 4.4, "float16": 2.2, "bfloat16": 2.2}
HOST_MEMORY_MARGIN = 1.1
#: Versions whose conversion held far more than that: 1.0.0 needed > 32 GB for a 1.5B model (rknn-llm#30,
#: ~21 bytes/param), fixed in 1.0.1 ("Optimize model conversion memory occupation"). UNKNOWN: 1.0.0's figure at
#: a 16-bit load dtype (it has none: the dtype argument arrived in 1.2.0).
HOST_BYTES_PER_PARAM_BEFORE: Mapping[str, float] = {"1.0.1": 21.5}
#: base_domain_id a manifest recommends for weights above rkedge.fit's driver gate (F-1: the maintainers'
#: standard advice for large weight blobs; rknn-llm#139, #195, #232).
LARGE_WEIGHTS_BASE_DOMAIN_ID = 1
