"""ABI 1.3.1: librkllmrt 1.3.1 (September 2026).

Changes from 1.3.0 (``shared/rkllm-abi/ABI.md``, section "ABI 1.3.1"): one addition, an ``audio`` nested struct
appended to ``RKLLMMultiModalInput`` after ``video`` (144 -> 192 bytes), which makes the ``RKLLMInput`` union larger
(160 -> 208 bytes). Functions, enums, callbacks and every other struct are 1.3.0's and are re-exported from
:mod:`.v1_3_0`. The exported symbols equal 1.3.0's (plus an undeclared ``rkllm_accuracy_analysis``), so only the
version marker inside the file tells 1.3.1 from 1.3.0.

It stays a module of its own, with its own ``RKLLMInput`` and function table, because a 1.3.0-shaped input passed
to a 1.3.1 library leaves the runtime reading ``audio_*`` 48 bytes past the allocation (ABI.md, "Hazard").
"""

from __future__ import annotations

from ctypes import POINTER, Structure, Union, c_bool, c_char_p, c_float, c_int, c_size_t
from dataclasses import replace

from . import ABI_RELEASES
from . import v1_3_0 as _v1_3_0
from ._common import FUNCTIONS_ADDED_121, core_functions
from .v1_3_0 import (
    LLMCallState,
    LLMGetEmbedCallback,
    LLMHandle,
    LLMResultCallback,
    LLMTokenizerCallback,
    RKLLMCallback,
    RKLLMCrossAttnParam,
    RKLLMEmbedInput,
    RKLLMExtendParam,
    RKLLMInferMode,
    RKLLMInferParam,
    RKLLMInputType,
    RKLLMLoraAdapter,
    RKLLMLoraParam,
    RKLLMParam,
    RKLLMPerfStat,
    RKLLMPromptCacheParam,
    RKLLMResult,
    RKLLMResultLastHiddenLayer,
    RKLLMResultLogits,
    RKLLMSamplingParam,
    RKLLMTokenInput,
)

ABI = "1.3.1"
RUNTIME_RELEASES = ABI_RELEASES[ABI]  # the registry's release table

# The image and video blocks are 1.3.0's (see v1_3_0 for their C declarations).
_RKLLMImageInput = _v1_3_0._RKLLMImageInput
_RKLLMVideoInput = _v1_3_0._RKLLMVideoInput


# struct { float* audio_embed; size_t n_audio_tokens; size_t n_audio; const char* audio_start;
#          const char* audio_end; const char* audio_content; } audio;
# audio_embed holds n_audio * n_audio_tokens * embedding_dim floats (fp32), like image_embed.
class _RKLLMAudioInput(Structure):
    _fields_ = [
        ("audio_embed", POINTER(c_float)),
        ("n_audio_tokens", c_size_t),
        ("n_audio", c_size_t),
        ("audio_start", c_char_p),
        ("audio_end", c_char_p),
        ("audio_content", c_char_p),
    ]


# typedef struct { char* prompt; struct {...} image; struct {...} video; struct {...} audio; } RKLLMMultiModalInput;
class RKLLMMultiModalInput(Structure):
    _fields_ = [
        ("prompt", c_char_p),
        ("image", _RKLLMImageInput),
        ("video", _RKLLMVideoInput),
        ("audio", _RKLLMAudioInput),
    ]


class _RKLLMInputUnion(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput),
    ]


# typedef struct { const char* role; bool enable_thinking; RKLLMInputType input_type; union { ... }; } RKLLMInput;
class RKLLMInput(Structure):
    _anonymous_ = ("_input",)
    _fields_ = [
        ("role", c_char_p),
        ("enable_thinking", c_bool),
        ("input_type", c_int),
        ("_input", _RKLLMInputUnion),
    ]


# The 1.3.0 signatures, with rkllm_run/rkllm_run_async typed to take this ABI's (208-byte) RKLLMInput*.
# int rkllm_init(LLMHandle* handle, RKLLMParam* param, RKLLMCallback* callback);
FUNCTIONS = core_functions(RKLLMParam, RKLLMInput, RKLLMInferParam, POINTER(RKLLMCallback)) + FUNCTIONS_ADDED_121

# Audio input exists in the struct set; rkedge's LLM sends prompts, token ids and embeddings only.
FEATURES = replace(_v1_3_0.FEATURES, has_audio_input=True)

STRUCTS = (
    RKLLMExtendParam,
    RKLLMParam,
    RKLLMLoraAdapter,
    RKLLMEmbedInput,
    RKLLMTokenInput,
    RKLLMMultiModalInput,
    RKLLMInput,
    RKLLMLoraParam,
    RKLLMPromptCacheParam,
    RKLLMCrossAttnParam,
    RKLLMSamplingParam,
    RKLLMInferParam,
    RKLLMResultLastHiddenLayer,
    RKLLMResultLogits,
    RKLLMPerfStat,
    RKLLMResult,
    RKLLMCallback,
)

__all__ = [
    "ABI", "RUNTIME_RELEASES", "LLMHandle", "LLMCallState", "RKLLMInputType", "RKLLMInferMode",
    "RKLLMExtendParam", "RKLLMParam", "RKLLMLoraAdapter", "RKLLMEmbedInput", "RKLLMTokenInput",
    "RKLLMMultiModalInput", "RKLLMInput", "RKLLMLoraParam", "RKLLMPromptCacheParam", "RKLLMCrossAttnParam",
    "RKLLMSamplingParam", "RKLLMInferParam", "RKLLMResultLastHiddenLayer", "RKLLMResultLogits", "RKLLMPerfStat",
    "RKLLMResult", "RKLLMCallback", "LLMResultCallback", "LLMTokenizerCallback", "LLMGetEmbedCallback",
    "FUNCTIONS", "FEATURES", "STRUCTS",
]
