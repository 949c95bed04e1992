"""ABI 1.2.0: librkllmrt 1.2.0.

Changes from 1.1 (``shared/rkllm-abi/ABI.md``; runtime-anchors section 3.1): ``n_keep`` after ``top_k``
shifts every later ``RKLLMParam`` field by 4; ``RKLLMExtendParam`` gains CPU fields; ``keep_history`` in
``RKLLMInferParam``; logits mode and ``RKLLMResultLogits``; ``rkllm_clear_kv_cache(h, keep_system_prompt)``
and ``rkllm_set_chat_template``. The callback still returns ``void``.
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
    c_int8,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_void_p,
)

from . import ABI_RELEASES
from ._common import (
    SET_CHAT_TEMPLATE,
    AbiFeatures,
    Func,
    LLMCallState,
    LLMHandle,
    RKLLMEmbedInput,
    RKLLMInferMode,
    RKLLMInputType,
    RKLLMLoraAdapter,
    RKLLMLoraParam,
    RKLLMPromptCacheParam,
    RKLLMResultLastHiddenLayer,
    RKLLMResultLogits,
    RKLLMTokenInput,
    core_functions,
)

ABI = "1.2.0"
RUNTIME_RELEASES = ABI_RELEASES[ABI]  # the registry's release table


# typedef struct { int32_t base_domain_id; int8_t embed_flash; int8_t enabled_cpus_num;
#                  uint32_t enabled_cpus_mask; uint8_t reserved[106]; } RKLLMExtendParam;
class RKLLMExtendParam(Structure):
    _fields_ = [
        ("base_domain_id", c_int32),
        ("embed_flash", c_int8),
        ("enabled_cpus_num", c_int8),
        ("enabled_cpus_mask", c_uint32),
        ("reserved", c_uint8 * 106),
    ]


# typedef struct { const char* model_path; int32_t max_context_len; int32_t max_new_tokens; int32_t top_k;
#   int32_t n_keep; float top_p; float temperature; float repeat_penalty; float frequency_penalty;
#   float presence_penalty; int32_t mirostat; float mirostat_tau; float mirostat_eta; bool skip_special_token;
#   bool is_async; const char* img_start; const char* img_end; const char* img_content;
#   RKLLMExtendParam extend_param; } RKLLMParam;
class RKLLMParam(Structure):
    _fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
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


# typedef struct { RKLLMInferMode mode; RKLLMLoraParam* lora_params; RKLLMPromptCacheParam* prompt_cache_params;
#                  int keep_history; } RKLLMInferParam;
class RKLLMInferParam(Structure):
    _fields_ = [
        ("mode", c_int),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("keep_history", c_int),
    ]


# typedef struct { const char* text; int32_t token_id; RKLLMResultLastHiddenLayer last_hidden_layer;
#                  RKLLMResultLogits logits; } RKLLMResult;
class RKLLMResult(Structure):
    _fields_ = [
        ("text", c_char_p),
        ("token_id", c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
    ]


# typedef void (*LLMResultCallback)(RKLLMResult* result, void* userdata, LLMCallState state);
LLMResultCallback = CFUNCTYPE(None, POINTER(RKLLMResult), c_void_p, c_int)

# int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);
FUNCTIONS = core_functions(RKLLMParam, RKLLMInput, RKLLMInferParam, LLMResultCallback) + (
    # int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt);
    Func("rkllm_clear_kv_cache", (LLMHandle, c_int), c_int),
    SET_CHAT_TEMPLATE,
)

FEATURES = AbiFeatures(
    callback_returns_int=False,
    init_takes_callback_struct=False,
    is_running_value_when_running=0,
    clear_kv_cache_arity=2,
    has_keep_history=True,
    has_logits_mode=True,
    has_perf_stats=False,
    has_role=False,
    has_sampling_params=False,
    has_chat_template=True,
    has_function_tools=False,
    has_kv_cache_size=False,
    supports_release=False,
    hidden_layer_state=None,
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
    RKLLMResultLogits,
    RKLLMResult,
)

__all__ = [
    "ABI", "RUNTIME_RELEASES", "LLMHandle", "LLMCallState", "RKLLMInputType", "RKLLMInferMode",
    "RKLLMExtendParam", "RKLLMParam", "RKLLMLoraAdapter", "RKLLMEmbedInput", "RKLLMTokenInput",
    "RKLLMMultiModelInput", "RKLLMInput", "RKLLMLoraParam", "RKLLMPromptCacheParam", "RKLLMInferParam",
    "RKLLMResultLastHiddenLayer", "RKLLMResultLogits", "RKLLMResult", "LLMResultCallback", "FUNCTIONS",
    "FEATURES", "STRUCTS",
]
