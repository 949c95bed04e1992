/*
 * The librkllmrt.so C interface of one ABI version, selected with -DRKEDGE_ABI=<code>:
 *   110 = ABI 1.1 (runtime 1.1.0-1.1.4)   120 = ABI 1.2.0   121 = ABI 1.2.1 (runtime 1.2.1, 1.2.2)
 *   123 = ABI 1.2.3                       130 = ABI 1.3.0   131 = ABI 1.3.1
 * Layouts follow shared/rkllm-abi/ABI.md (LP64). This header is written for the simulated NPU only; it is
 * not Rockchip's rkllm.h, but every struct, enum and prototype here has the same layout and signature.
 */
#ifndef RKEDGE_RKLLM_ABI_H
#define RKEDGE_RKLLM_ABI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef RKEDGE_ABI
#error "define RKEDGE_ABI (110, 120, 121, 123, 130 or 131)"
#endif

#define ABI_AT_LEAST(code) (RKEDGE_ABI >= (code))

typedef void *LLMHandle;

typedef enum {
    RKLLM_RUN_NORMAL = 0,
    RKLLM_RUN_WAITING = 1,
    RKLLM_RUN_FINISH = 2,
    RKLLM_RUN_ERROR = 3,
#if RKEDGE_ABI == 110
    RKLLM_RUN_GET_LAST_HIDDEN_LAYER = 4,
#endif
} LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT = 0,
    RKLLM_INPUT_TOKEN = 1,
    RKLLM_INPUT_EMBED = 2,
    RKLLM_INPUT_MULTIMODAL = 3,
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
#if ABI_AT_LEAST(120)
    RKLLM_INFER_GET_LOGITS = 2,
#endif
} RKLLMInferMode;

typedef struct {
    int32_t base_domain_id;
#if ABI_AT_LEAST(120)
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
#endif
#if ABI_AT_LEAST(121)
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
#elif ABI_AT_LEAST(120)
    uint8_t reserved[106];
#else
    uint8_t reserved[112];
#endif
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
#if ABI_AT_LEAST(120)
    int32_t n_keep;
#endif
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#if ABI_AT_LEAST(130)
    bool ignore_eos_token;
#endif
    bool is_async;
#if !ABI_AT_LEAST(130)
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

#if ABI_AT_LEAST(130)
typedef struct {
    char *prompt;
    struct {
        float *image_embed;
        size_t n_image_tokens;
        size_t n_image;
        const char *image_start;
        const char *image_end;
        const char *image_content;
        size_t image_width;
        size_t image_height;
    } image;
    struct {
        float *video_embed;
        size_t n_frame_tokens;
        size_t n_frame_per_video;
        size_t n_video;
        const char *video_start;
        const char *video_end;
        const char *video_content;
        size_t frame_width;
        size_t frame_height;
    } video;
#if ABI_AT_LEAST(131)
    /* 1.3.1 appends audio (ABI.md "ABI 1.3.1"): audio_embed holds n_audio * n_audio_tokens * dim floats. */
    struct {
        float *audio_embed;
        size_t n_audio_tokens;
        size_t n_audio;
        const char *audio_start;
        const char *audio_end;
        const char *audio_content;
    } audio;
#endif
} RKLLMMultiModalInput;
#elif ABI_AT_LEAST(121)
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
#else
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
} RKLLMMultiModalInput;
#endif
/* 1.1-1.2.2 spell it "Model"; the layout is the one above. */
typedef RKLLMMultiModalInput RKLLMMultiModelInput;

typedef struct {
#if ABI_AT_LEAST(121)
    const char *role;
    bool enable_thinking;
#endif
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

#if ABI_AT_LEAST(121)
typedef struct {
    float *encoder_k_cache;
    float *encoder_v_cache;
    float *encoder_mask;
    int32_t *encoder_pos;
    int num_tokens;
} RKLLMCrossAttnParam;
#endif

#if ABI_AT_LEAST(130)
typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if ABI_AT_LEAST(130)
    RKLLMSamplingParam *sampling_params;
#endif
#if ABI_AT_LEAST(120)
    int keep_history;
#endif
#if ABI_AT_LEAST(130)
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

#if ABI_AT_LEAST(120)
typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;
#endif

#if ABI_AT_LEAST(121)
typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;
#endif

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
#if ABI_AT_LEAST(120)
    RKLLMResultLogits logits;
#endif
#if ABI_AT_LEAST(121)
    RKLLMPerfStat perf;
#endif
} RKLLMResult;

#if ABI_AT_LEAST(121)
typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);
#else
typedef void (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);
#endif

#if ABI_AT_LEAST(130)
typedef int (*LLMGetEmbedCallback)(void *userdata, int32_t *tokens, uint64_t num_tokens, void *embed, uint64_t len);
typedef int (*LLMTokenizerCallback)(void *userdata, const char *text, int32_t text_len, int32_t *tokens,
                                    int32_t n_tokens_max);
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    LLMTokenizerCallback tokenizer_callback;
    void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback;
    void *embed_userdata;
} RKLLMCallback;
#define RKLLM_INIT_CALLBACK_T RKLLMCallback *
#else
#define RKLLM_INIT_CALLBACK_T LLMResultCallback
#endif

#define RKLLM_API __attribute__((visibility("default")))

RKLLM_API RKLLMParam rkllm_createDefaultParam(void);
RKLLM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLM_INIT_CALLBACK_T callback);
RKLLM_API int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter);
RKLLM_API int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path);
RKLLM_API int rkllm_release_prompt_cache(LLMHandle handle);
RKLLM_API int rkllm_destroy(LLMHandle handle);
RKLLM_API int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                        void *userdata);
RKLLM_API int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                              void *userdata);
RKLLM_API int rkllm_abort(LLMHandle handle);
RKLLM_API int rkllm_is_running(LLMHandle handle);
#if ABI_AT_LEAST(121)
RKLLM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos);
RKLLM_API int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes);
RKLLM_API int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                       const char *tool_response_str);
RKLLM_API int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params);
#elif ABI_AT_LEAST(120)
RKLLM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt);
#endif
#if ABI_AT_LEAST(120)
RKLLM_API int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                                      const char *prompt_postfix);
#endif

#endif /* RKEDGE_RKLLM_ABI_H */
