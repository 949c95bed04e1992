"""ABI 1.2.3: librkllmrt 1.2.3.

The 1.2.3 header equals 1.2.2's except that ``RKLLMMultiModelInput`` is spelled ``RKLLMMultiModalInput``
(runtime-anchors section 3): every layout below is the 1.2.1 one, re-exported under this ABI's names. It
stays a module of its own because a library is always paired with the struct set of its exact ABI.
"""

from __future__ import annotations

from dataclasses import replace

from . import ABI_RELEASES
from . import v1_2_1 as _v1_2_1
from .v1_2_1 import (
    FUNCTIONS,
    LLMCallState,
    LLMHandle,
    LLMResultCallback,
    RKLLMCrossAttnParam,
    RKLLMEmbedInput,
    RKLLMExtendParam,
    RKLLMInferMode,
    RKLLMInferParam,
    RKLLMInput,
    RKLLMInputType,
    RKLLMLoraAdapter,
    RKLLMLoraParam,
    RKLLMParam,
    RKLLMPerfStat,
    RKLLMPromptCacheParam,
    RKLLMResult,
    RKLLMResultLastHiddenLayer,
    RKLLMResultLogits,
    RKLLMTokenInput,
)

ABI = "1.2.3"
RUNTIME_RELEASES = ABI_RELEASES[ABI]  # the registry's release table

# typedef struct { char* prompt; float* image_embed; size_t n_image_tokens; size_t n_image; size_t image_width;
#                  size_t image_height; } RKLLMMultiModalInput;
RKLLMMultiModalInput = _v1_2_1.RKLLMMultiModelInput

FEATURES = replace(_v1_2_1.FEATURES)
STRUCTS = _v1_2_1.STRUCTS

__all__ = [
    "ABI", "RUNTIME_RELEASES", "LLMHandle", "LLMCallState", "RKLLMInputType", "RKLLMInferMode",
    "RKLLMExtendParam", "RKLLMParam", "RKLLMLoraAdapter", "RKLLMEmbedInput", "RKLLMTokenInput",
    "RKLLMMultiModalInput", "RKLLMInput", "RKLLMLoraParam", "RKLLMPromptCacheParam", "RKLLMCrossAttnParam",
    "RKLLMInferParam", "RKLLMResultLastHiddenLayer", "RKLLMResultLogits", "RKLLMPerfStat", "RKLLMResult",
    "LLMResultCallback", "FUNCTIONS", "FEATURES", "STRUCTS",
]
