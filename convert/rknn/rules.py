"""What the RKNN backend (rknn-toolkit2) converts and how it builds, as data: the ``check`` and the graph
planning read these, so the facts sit in one reviewable place (recurrentgemma-rknn-feasibility.md)."""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "recurrentgemma-rknn-feasibility.md"


@dataclass(frozen=True)
class RknnRules:
    #: Architectures rkedge's decode-step graphs exist for (RKLLM has no RG-LRU support).
    architectures: tuple[str, ...] = ("RecurrentGemmaForCausalLM",)
    platforms: tuple[str, ...] = ("rk3588",)
    #: What rknn-toolkit2 builds for rk3588, and the subset this backend offers (no w4a16 on RKNN).
    toolkit_dtypes: tuple[str, ...] = ("w8a8", "w16a16i_dfp", "fp16")
    dtypes: tuple[str, ...] = ("w8a8", "fp16")
    #: Host RAM per parameter while building: measured 20-28 bytes (feasibility section 6).
    build_bytes_per_param: int = 28
    #: About 1 GB of weights per graph: far from the 4 GiB uint32 / IOMMU limits.
    graph_weight_budget: int = 1 << 30
    #: A graph build that runs this long is stuck: builds at 2b widths measured 91-174 s (section 6).
    build_timeout_s: float = 2 * 3600
    #: rknn-toolkit2's config(quantized_algorithm=..., quantized_method=...) choices (toolkit 2.x docs); measured
    #: on the tiny fixture in feasibility section 5: mmse ~3x the build time for a small NLL gain, kl_divergence
    #: worse, so normal + channel is the default.
    quantized_algorithms: tuple[str, ...] = ("normal", "mmse", "kl_divergence")
    quantized_methods: tuple[str, ...] = ("channel", "layer")
    source: str = SOURCE


RKNN_RULES = RknnRules()
