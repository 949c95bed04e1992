"""Pieces of the rkllm C ABI that every version shares, and the function-table binder.

Only the ``rkedge.runtime.abi`` package imports ctypes. Each version module declares its structs, enums,
callback types and function table; the C declaration is quoted above each Python declaration so that a
review is a diff against the vendor header. Layouts: ``shared/rkllm-abi/ABI.md`` (LP64, aarch64 == x86_64).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from ctypes import POINTER, Structure, c_char_p, c_float, c_int, c_int32, c_size_t, c_void_p
from dataclasses import dataclass
from enum import IntEnum
from types import SimpleNamespace
from typing import Any

# typedef void* LLMHandle;
LLMHandle = c_void_p


class LLMCallState(IntEnum):
    """``LLMCallState`` (1.2.0 and later; ABI 1.1 adds ``RKLLM_RUN_GET_LAST_HIDDEN_LAYER = 4``)."""

    RKLLM_RUN_NORMAL = 0
    RKLLM_RUN_WAITING = 1
    RKLLM_RUN_FINISH = 2
    RKLLM_RUN_ERROR = 3


class RKLLMInputType(IntEnum):
    RKLLM_INPUT_PROMPT = 0
    RKLLM_INPUT_TOKEN = 1
    RKLLM_INPUT_EMBED = 2
    RKLLM_INPUT_MULTIMODAL = 3


class RKLLMInferMode(IntEnum):
    """``RKLLMInferMode`` from 1.2.0 (ABI 1.1 has no GET_LOGITS and declares its own)."""

    RKLLM_INFER_GENERATE = 0
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1
    RKLLM_INFER_GET_LOGITS = 2


# typedef struct { const char* lora_adapter_path; const char* lora_adapter_name; float scale; } RKLLMLoraAdapter;
class RKLLMLoraAdapter(Structure):
    _fields_ = [
        ("lora_adapter_path", c_char_p),
        ("lora_adapter_name", c_char_p),
        ("scale", c_float),
    ]


# typedef struct { float* embed; size_t n_tokens; } RKLLMEmbedInput;
class RKLLMEmbedInput(Structure):
    _fields_ = [("embed", POINTER(c_float)), ("n_tokens", c_size_t)]


# typedef struct { int32_t* input_ids; size_t n_tokens; } RKLLMTokenInput;
class RKLLMTokenInput(Structure):
    _fields_ = [("input_ids", POINTER(c_int32)), ("n_tokens", c_size_t)]


# typedef struct { const char* lora_adapter_name; } RKLLMLoraParam;
class RKLLMLoraParam(Structure):
    _fields_ = [("lora_adapter_name", c_char_p)]


# typedef struct { int save_prompt_cache; const char* prompt_cache_path; } RKLLMPromptCacheParam;
class RKLLMPromptCacheParam(Structure):
    _fields_ = [("save_prompt_cache", c_int), ("prompt_cache_path", c_char_p)]


# typedef struct { const float* hidden_states; int embd_size; int num_tokens; } RKLLMResultLastHiddenLayer;
class RKLLMResultLastHiddenLayer(Structure):
    _fields_ = [
        ("hidden_states", POINTER(c_float)),
        ("embd_size", c_int),
        ("num_tokens", c_int),
    ]


# typedef struct { const float* logits; int vocab_size; int num_tokens; } RKLLMResultLogits;   (>= 1.2.0)
class RKLLMResultLogits(Structure):
    _fields_ = [
        ("logits", POINTER(c_float)),
        ("vocab_size", c_int),
        ("num_tokens", c_int),
    ]


# typedef struct { float prefill_time_ms; int prefill_tokens; float generate_time_ms; int generate_tokens;
#                  float memory_usage_mb; } RKLLMPerfStat;                                          (>= 1.2.1)
class RKLLMPerfStat(Structure):
    _fields_ = [
        ("prefill_time_ms", c_float),
        ("prefill_tokens", c_int),
        ("generate_time_ms", c_float),
        ("generate_tokens", c_int),
        ("memory_usage_mb", c_float),
    ]


# typedef struct { float* encoder_k_cache; float* encoder_v_cache; float* encoder_mask; int32_t* encoder_pos;
#                  int num_tokens; } RKLLMCrossAttnParam;                                            (>= 1.2.1)
class RKLLMCrossAttnParam(Structure):
    _fields_ = [
        ("encoder_k_cache", POINTER(c_float)),
        ("encoder_v_cache", POINTER(c_float)),
        ("encoder_mask", POINTER(c_float)),
        ("encoder_pos", POINTER(c_int32)),
        ("num_tokens", c_int),
    ]


@dataclass(frozen=True)
class Func:
    """One exported function: ``restype name(argtypes...)``."""

    name: str
    argtypes: tuple[Any, ...]
    restype: Any


@dataclass(frozen=True)
class AbiFeatures:
    """Behavioural differences between ABI versions that a caller must honour (SEMANTICS.md)."""

    callback_returns_int: bool  # >= 1.2.1: 0 continue, 1 pause (and 2 release in 1.3.0)
    init_takes_callback_struct: bool  # 1.3.0: rkllm_init(..., RKLLMCallback*)
    is_running_value_when_running: int | None  # 1.1-1.2.3: 0 means running; 1.3.0: 1 means running
    clear_kv_cache_arity: int  # 0 (absent), 2 (1.2.0) or 4 (>= 1.2.1: start/end ranges)
    has_keep_history: bool
    has_logits_mode: bool
    has_perf_stats: bool
    has_role: bool
    has_sampling_params: bool  # 1.3.0 per-run RKLLMSamplingParam* and max_new_tokens
    has_chat_template: bool
    has_function_tools: bool
    has_kv_cache_size: bool
    supports_release: bool  # 1.3.0 callback return value 2
    hidden_layer_state: int | None  # ABI 1.1 reports hidden states with state 4
    # 1.3.1: RKLLMMultiModalInput carries an audio block. A default, so backends that predate it (the RKNN
    # engine) need not name it.
    has_audio_input: bool = False


def core_functions(param: Any, rkllm_input: Any, infer: Any, init_callback: Any) -> tuple[Func, ...]:
    """The functions every ABI exports, typed with that ABI's structs.

    RKLLMParam rkllm_createDefaultParam();
    int rkllm_init(LLMHandle* handle, RKLLMParam* param, <callback>);
    int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter* lora_adapter);
    int rkllm_load_prompt_cache(LLMHandle handle, const char* prompt_cache_path);
    int rkllm_release_prompt_cache(LLMHandle handle);
    int rkllm_destroy(LLMHandle handle);
    int rkllm_run(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params, void* userdata);
    int rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params, void* userdata);
    int rkllm_abort(LLMHandle handle);
    int rkllm_is_running(LLMHandle handle);
    """
    run_args = (LLMHandle, POINTER(rkllm_input), POINTER(infer), c_void_p)
    return (
        Func("rkllm_createDefaultParam", (), param),
        Func("rkllm_init", (POINTER(LLMHandle), POINTER(param), init_callback), c_int),
        Func("rkllm_load_lora", (LLMHandle, POINTER(RKLLMLoraAdapter)), c_int),
        Func("rkllm_load_prompt_cache", (LLMHandle, c_char_p), c_int),
        Func("rkllm_release_prompt_cache", (LLMHandle,), c_int),
        Func("rkllm_destroy", (LLMHandle,), c_int),
        Func("rkllm_run", run_args, c_int),
        Func("rkllm_run_async", run_args, c_int),
        Func("rkllm_abort", (LLMHandle,), c_int),
        Func("rkllm_is_running", (LLMHandle,), c_int),
    )


#: int rkllm_set_chat_template(LLMHandle handle, const char* system_prompt, const char* prompt_prefix,
#:                             const char* prompt_postfix);   (>= 1.2.0)
SET_CHAT_TEMPLATE = Func("rkllm_set_chat_template", (LLMHandle, c_char_p, c_char_p, c_char_p), c_int)

#: The functions ABI 1.2.1 added (also in 1.2.3 and 1.3.0):
#: int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int* start_pos, int* end_pos);
#: int rkllm_get_kv_cache_size(LLMHandle handle, int* cache_sizes);
#: int rkllm_set_function_tools(LLMHandle handle, const char* system_prompt, const char* tools,
#:                              const char* tool_response_str);
#: int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam* cross_attn_params);
FUNCTIONS_ADDED_121 = (
    Func("rkllm_clear_kv_cache", (LLMHandle, c_int, POINTER(c_int), POINTER(c_int)), c_int),
    Func("rkllm_get_kv_cache_size", (LLMHandle, POINTER(c_int)), c_int),
    SET_CHAT_TEMPLATE,
    Func("rkllm_set_function_tools", (LLMHandle, c_char_p, c_char_p, c_char_p), c_int),
    Func("rkllm_set_cross_attn_params", (LLMHandle, POINTER(RKLLMCrossAttnParam)), c_int),
)


def bind(library: ctypes.CDLL, functions: Sequence[Func]) -> SimpleNamespace:
    """Binds every function of an ABI's table to ``library`` with exact argtypes and restype.

    Raises:
        AttributeError: naming the first symbol the library does not export.
    """
    bound: dict[str, Any] = {}
    for func in functions:
        native = getattr(library, func.name)
        native.argtypes = list(func.argtypes)
        native.restype = func.restype
        bound[func.name] = native
    return SimpleNamespace(**bound)


SHARED_STRUCTS = (
    RKLLMLoraAdapter,
    RKLLMEmbedInput,
    RKLLMTokenInput,
    RKLLMLoraParam,
    RKLLMPromptCacheParam,
    RKLLMResultLastHiddenLayer,
)
