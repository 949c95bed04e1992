"""ABI 1.1: librkllmrt 1.1.0 - 1.1.4 (one header for all five releases).

Declarations follow ``shared/rkllm-abi/ABI.md`` section "ABI 1.1"; the C is quoted above each one.
"""

from __future__ import annotations

from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char_p,
    c_float,
    c_int,
    c_int32,
    c_size_t,
    c_uint8,
    c_void_p,
)
from enum import IntEnum

from . import ABI_RELEASES
from ._common import (
    AbiFeatures,
    LLMHandle,
    RKLLMEmbedInput,
    RKLLMInputType,
    RKLLMLoraAdapter,
    RKLLMLoraParam,
    RKLLMPromptCacheParam,
    RKLLMResultLastHiddenLayer,
    RKLLMTokenInput,
    core_functions,
)

ABI = "1.1"
RUNTIME_RELEASES = ABI_RELEASES[ABI]  # the registry's release table


class LLMCallState(IntEnum):
    RKLLM_RUN_NORMAL = 0
    RKLLM_RUN_WAITING = 1
    RKLLM_RUN_FINISH = 2
    RKLLM_RUN_ERROR = 3
    RKLLM_RUN_GET_LAST_HIDDEN_LAYER = 4


class RKLLMInferMode(IntEnum):
    RKLLM_INFER_GENERATE = 0
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1


# typedef struct { int32_t base_domain_id; uint8_t reserved[112]; } RKLLMExtendParam;
class RKLLMExtendParam(Structure):
    _fields_ = [("base_domain_id", c_int32), ("reserved", c_uint8 * 112)]


# typedef struct { const char* model_path; int32_t max_context_len; int32_t max_new_tokens; int32_t top_k;
#   float top_p; float temperature; float repeat_penalty; float frequency_penalty; float presence_penalty;
#   int32_t mirostat; float mirostat_tau; float mirostat_eta; bool skip_special_token; bool is_async;
#   const char* img_start; const char* img_end; const char* img_content; RKLLMExtendParam extend_param; } RKLLMParam;
class RKLLMParam(Structure):
    _fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
        ("is_async", c_bool),
        ("img_start", c_char_p),
        ("img_end", c_char_p),
        ("img_content", c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]


# typedef struct { char* prompt; float* image_embed; size_t n_image_tokens; } RKLLMMultiModelInput;
class RKLLMMultiModelInput(Structure):
    _fields_ = [
        ("prompt", c_char_p),
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
    ]


# union { const char* prompt_input; RKLLMEmbedInput embed_input; RKLLMTokenInput token_input;
#         RKLLMMultiModelInput multimodal_input; };
class _RKLLMInputUnion(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModelInput),
    ]


# typedef struct { RKLLMInputType input_type; union { ... }; } RKLLMInput;
class RKLLMInput(Structure):
    _anonymous_ = ("_input",)
    _fields_ = [("input_type", c_int), ("_input", _RKLLMInputUnion)]


# typedef struct { RKLLMInferMode mode; RKLLMLoraParam* lora_params;
#                  RKLLMPromptCacheParam* prompt_cache_params; } RKLLMInferParam;
class RKLLMInferParam(Structure):
    _fields_ = [
        ("mode", c_int),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
    ]


# typedef struct { const char* text; int32_t token_id; RKLLMResultLastHiddenLayer last_hidden_layer; } RKLLMResult;
class RKLLMResult(Structure):
    _fields_ = [
        ("text", c_char_p),
        ("token_id", c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
    ]


# typedef void (*LLMResultCallback)(RKLLMResult* result, void* userdata, LLMCallState state);
LLMResultCallback = CFUNCTYPE(None, POINTER(RKLLMResult), c_void_p, c_int)

# int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);
FUNCTIONS = core_functions(RKLLMParam, RKLLMInput, RKLLMInferParam, LLMResultCallback)

FEATURES = AbiFeatures(
    callback_returns_int=False,
    init_takes_callback_struct=False,
    is_running_value_when_running=0,
    clear_kv_cache_arity=0,
    has_keep_history=False,
    has_logits_mode=False,
    has_perf_stats=False,
    has_role=False,
    has_sampling_params=False,
    has_chat_template=False,
    has_function_tools=False,
    has_kv_cache_size=False,
    supports_release=False,
    hidden_layer_state=LLMCallState.RKLLM_RUN_GET_LAST_HIDDEN_LAYER,
)

STRUCTS = (
    RKLLMExtendParam,
    RKLLMParam,
    RKLLMLoraAdapter,
    RKLLMEmbedInput,
    RKLLMTokenInput,
    RKLLMMultiModelInput,
    RKLLMInput,
    RKLLMLoraParam,
    RKLLMPromptCacheParam,
    RKLLMInferParam,
    RKLLMResultLastHiddenLayer,
    RKLLMResult,
)

__all__ = [
    "ABI", "RUNTIME_RELEASES", "LLMHandle", "LLMCallState", "RKLLMInputType", "RKLLMInferMode",
    "RKLLMExtendParam", "RKLLMParam", "RKLLMLoraAdapter", "RKLLMEmbedInput", "RKLLMTokenInput",
    "RKLLMMultiModelInput", "RKLLMInput", "RKLLMLoraParam", "RKLLMPromptCacheParam", "RKLLMInferParam",
    "RKLLMResultLastHiddenLayer", "RKLLMResult", "LLMResultCallback", "FUNCTIONS", "FEATURES", "STRUCTS",
]
