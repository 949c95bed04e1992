"""ABI 1.3.0: librkllmrt 1.3.0.

Changes from 1.2.3 (``shared/rkllm-abi/ABI.md``; runtime-anchors section 3.1): ``RKLLMParam`` loses the
``img_*`` pointers and gains ``ignore_eos_token`` (``extend_param`` moves 88 -> 60, size 208 -> 184);
``RKLLMMultiModalInput`` nests ``image`` and ``video``; ``RKLLMInferParam`` gains ``sampling_params`` and
``max_new_tokens`` (``keep_history`` moves 24 -> 32); callback return 2 releases the output buffer;
**``rkllm_init`` takes an ``RKLLMCallback*``** (result, tokenizer and embed callbacks); ``rkllm_is_running``
returns 1 while running. The exported symbols equal 1.2.1's, so 1.3.0 cannot be told apart by symbols.
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
    c_uint64,
    c_void_p,
)

from . import ABI_RELEASES
from . import v1_2_1 as _v1_2_1
from ._common import (
    FUNCTIONS_ADDED_121,
    AbiFeatures,
    LLMCallState,
    LLMHandle,
    RKLLMCrossAttnParam,
    RKLLMEmbedInput,
    RKLLMInferMode,
    RKLLMInputType,
    RKLLMLoraAdapter,
    RKLLMLoraParam,
    RKLLMPerfStat,
    RKLLMPromptCacheParam,
    RKLLMResultLastHiddenLayer,
    RKLLMResultLogits,
    RKLLMTokenInput,
    core_functions,
)

ABI = "1.3.0"
RUNTIME_RELEASES = ABI_RELEASES[ABI]  # the registry's release table


# RKLLMExtendParam: unchanged from 1.2.1 (base_domain_id, embed_flash, enabled_cpus_num, enabled_cpus_mask,
# n_batch, use_cross_attn, reserved[104]).
RKLLMExtendParam = _v1_2_1.RKLLMExtendParam


# typedef struct { const char* model_path; int32_t max_context_len; int32_t max_new_tokens; int32_t top_k;
#   int32_t n_keep; float top_p; float temperature; float repeat_penalty; float frequency_penalty;
#   float presence_penalty; int32_t mirostat; float mirostat_tau; float mirostat_eta; bool skip_special_token;
#   bool ignore_eos_token; bool is_async; RKLLMExtendParam extend_param; } RKLLMParam;
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
        ("ignore_eos_token", c_bool),
        ("is_async", c_bool),
        ("extend_param", RKLLMExtendParam),
    ]


# struct { float* image_embed; size_t n_image_tokens; size_t n_image; const char* image_start;
#          const char* image_end; const char* image_content; size_t image_width; size_t image_height; } image;
class _RKLLMImageInput(Structure):
    _fields_ = [
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_start", c_char_p),
        ("image_end", c_char_p),
        ("image_content", c_char_p),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    ]


# struct { float* video_embed; size_t n_frame_tokens; size_t n_frame_per_video; size_t n_video;
#          const char* video_start; const char* video_end; const char* video_content; size_t frame_width;
#          size_t frame_height; } video;
class _RKLLMVideoInput(Structure):
    _fields_ = [
        ("video_embed", POINTER(c_float)),
        ("n_frame_tokens", c_size_t),
        ("n_frame_per_video", c_size_t),
        ("n_video", c_size_t),
        ("video_start", c_char_p),
        ("video_end", c_char_p),
        ("video_content", c_char_p),
        ("frame_width", c_size_t),
        ("frame_height", c_size_t),
    ]


# typedef struct { char* prompt; struct {...} image; struct {...} video; } RKLLMMultiModalInput;
class RKLLMMultiModalInput(Structure):
    _fields_ = [("prompt", c_char_p), ("image", _RKLLMImageInput), ("video", _RKLLMVideoInput)]


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


# typedef struct { int32_t top_k; float top_p; float temperature; float repeat_penalty; float frequency_penalty;
#   float presence_penalty; int32_t mirostat; float mirostat_tau; float mirostat_eta; } RKLLMSamplingParam;
class RKLLMSamplingParam(Structure):
    _fields_ = [
        ("top_k", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
    ]


# typedef struct { RKLLMInferMode mode; RKLLMLoraParam* lora_params; RKLLMPromptCacheParam* prompt_cache_params;
#   RKLLMSamplingParam* sampling_params; int keep_history; int32_t max_new_tokens; } RKLLMInferParam;
class RKLLMInferParam(Structure):
    _fields_ = [
        ("mode", c_int),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("sampling_params", POINTER(RKLLMSamplingParam)),
        ("keep_history", c_int),
        ("max_new_tokens", c_int32),
    ]


# typedef struct { const char* text; int32_t token_id; RKLLMResultLastHiddenLayer last_hidden_layer;
#                  RKLLMResultLogits logits; RKLLMPerfStat perf; } RKLLMResult;
class RKLLMResult(Structure):
    _fields_ = [
        ("text", c_char_p),
        ("token_id", c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
        ("perf", RKLLMPerfStat),
    ]


# typedef int (*LLMResultCallback)(RKLLMResult* result, void* userdata, LLMCallState state);
LLMResultCallback = CFUNCTYPE(c_int, POINTER(RKLLMResult), c_void_p, c_int)
# typedef int (*LLMTokenizerCallback)(void* userdata, const char* text, int32_t text_len, int32_t* tokens,
#                                     int32_t n_tokens_max);
LLMTokenizerCallback = CFUNCTYPE(c_int, c_void_p, c_char_p, c_int32, POINTER(c_int32), c_int32)
# typedef int (*LLMGetEmbedCallback)(void* userdata, int32_t* tokens, uint64_t num_tokens, void* embed,
#                                    uint64_t len);
LLMGetEmbedCallback = CFUNCTYPE(c_int, c_void_p, POINTER(c_int32), c_uint64, c_void_p, c_uint64)


# typedef struct { LLMResultCallback result_callback; void* result_userdata; LLMTokenizerCallback tokenizer_callback;
#   void* tokenizer_userdata; LLMGetEmbedCallback embed_callback; void* embed_userdata; } RKLLMCallback;
class RKLLMCallback(Structure):
    _fields_ = [
        ("result_callback", LLMResultCallback),
        ("result_userdata", c_void_p),
        ("tokenizer_callback", LLMTokenizerCallback),
        ("tokenizer_userdata", c_void_p),
        ("embed_callback", LLMGetEmbedCallback),
        ("embed_userdata", c_void_p),
    ]


# int rkllm_init(LLMHandle* handle, RKLLMParam* param, RKLLMCallback* callback);
FUNCTIONS = core_functions(RKLLMParam, RKLLMInput, RKLLMInferParam, POINTER(RKLLMCallback)) + FUNCTIONS_ADDED_121

FEATURES = AbiFeatures(
    callback_returns_int=True,
    init_takes_callback_struct=True,
    is_running_value_when_running=1,
    clear_kv_cache_arity=4,
    has_keep_history=True,
    has_logits_mode=True,
    has_perf_stats=True,
    has_role=True,
    has_sampling_params=True,
    has_chat_template=True,
    has_function_tools=True,
    has_kv_cache_size=True,
    supports_release=True,
    hidden_layer_state=None,
)

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
