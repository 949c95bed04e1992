/*
 * rkedge simulated NPU: a stand-in for Rockchip's librkllmrt.so with the exact C ABI of one version
 * (compile with -DRKEDGE_ABI=110|120|121|123|130|131 and -DRKEDGE_RUNTIME_VERSION, see rkllm_abi.h).
 *
 * What it simulates, and where each behaviour comes from (shared/rkllm-abi/SEMANTICS.md unless noted):
 *  - rkllm_init reads model_path. It loads only rkedge *simulated* models (our own first line, then a JSON
 *    manifest); any other file gets the real runtime's text for a file it cannot read. Version skew
 *    (failure mode F-3), the context limit (F-7), NPU memory failures (F-1) and the old-driver warning
 *    (F-5) print the texts recorded in knowledge/converter-anchors-and-failure-modes.md section 4.
 *  - Generation runs on a runtime pthread and calls the result callback once per token: NORMAL, WAITING for
 *    a token that ends inside a multi-byte UTF-8 character, FINISH (with perf stats from ABI 1.2.1), ERROR
 *    (which carries no token: only NORMAL/WAITING do).
 *  - Callback return values (ABI >= 1.2.1): 1 pauses (in every mode), 2 (1.3.0) releases the output buffer.
 *  - keep_history, KV cache size and clearing, abort, is_running (its meaning flips in 1.3.0), run_async,
 *    logits / last-hidden-layer modes, 1.3.0 per-run sampling and max_new_tokens, a context shift keeping
 *    n_keep entries, the 1.3.0 tokenizer and embedding callbacks, multimodal input checks.
 *
 * Behaviour options. Where the public sources leave a behaviour open, each candidate is selectable through
 * the same JSON object as the faults (the manifest's "faults", or $RKEDGE_MOCK_FAULT, read at every run):
 *   "utf8_split":   "overlap" (default) | "pieces" | "whole"   how a multi-byte character split over two
 *                   tokens reaches the callback (see split_tokens)
 *   "context_full": "stop" (default) | "shift"                 what happens when generation fills the context
 *   "buffer_rows":  "all" (default) | "last" | N               the positions each logits / hidden-layer
 *                   callback carries (N: at most N rows per callback, in order)
 * The defaults are the behaviours of earlier builds of this stand-in.
 *
 * Where public sources do not settle a behaviour, the choice made here is marked "UNKNOWN (stand-in choice)".
 * Those choices are ours, never claims about the vendor library.
 *
 * Diagnostics go to stderr in the runtime's format; nothing is written to stdout. Tests can read what the
 * library received from a JSON-lines call log ($RKEDGE_MOCK_CALL_LOG): the exported symbol set stays
 * exactly that of the ABI.
 */
#define _GNU_SOURCE
#include "rkllm_abi.h"
#include "json_mini.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* ---- per-ABI identity ---------------------------------------------------------------------------- */

#if RKEDGE_ABI == 110
#define ABI_NAME "1.1"
#define EXPECT_SIZES(e, p, i, f, r) e == 116 && p == 200 && i == 32 && f == 24 && r == 32
#define EXPECT_MULTIMODAL_SIZE 24
#elif RKEDGE_ABI == 120
#define ABI_NAME "1.2.0"
#define EXPECT_SIZES(e, p, i, f, r) e == 120 && p == 208 && i == 32 && f == 32 && r == 48
#define EXPECT_MULTIMODAL_SIZE 24
#elif RKEDGE_ABI == 121
#define ABI_NAME "1.2.1"
#define EXPECT_SIZES(e, p, i, f, r) e == 120 && p == 208 && i == 64 && f == 32 && r == 72
#define EXPECT_MULTIMODAL_SIZE 48
#elif RKEDGE_ABI == 123
#define ABI_NAME "1.2.3"
#define EXPECT_SIZES(e, p, i, f, r) e == 120 && p == 208 && i == 64 && f == 32 && r == 72
#define EXPECT_MULTIMODAL_SIZE 48
#elif RKEDGE_ABI == 130
#define ABI_NAME "1.3.0"
#define EXPECT_SIZES(e, p, i, f, r) e == 120 && p == 184 && i == 160 && f == 40 && r == 72
#define EXPECT_MULTIMODAL_SIZE 144
#elif RKEDGE_ABI == 131
#define ABI_NAME "1.3.1"
#define EXPECT_SIZES(e, p, i, f, r) e == 120 && p == 184 && i == 208 && f == 40 && r == 72
#define EXPECT_MULTIMODAL_SIZE 192
#else
#error "unsupported RKEDGE_ABI"
#endif

/* The release this build reports. Python passes it (rkedge.runtime.abi.ABI_RELEASES is the one release table). */
#ifndef RKEDGE_RUNTIME_VERSION
#error "define RKEDGE_RUNTIME_VERSION (the runtime release this build reports, e.g. \"1.3.1\")"
#endif

/* The struct sizes of shared/rkllm-abi/ABI.md for this ABI: a layout slip fails the build. */
_Static_assert(EXPECT_SIZES(sizeof(RKLLMExtendParam), sizeof(RKLLMParam), sizeof(RKLLMInput),
                            sizeof(RKLLMInferParam), sizeof(RKLLMResult)),
               "struct sizes differ from ABI.md");
_Static_assert(sizeof(RKLLMMultiModalInput) == EXPECT_MULTIMODAL_SIZE, "RKLLMMultiModalInput layout");
#if ABI_AT_LEAST(131)
_Static_assert(offsetof(RKLLMMultiModalInput, audio) == 144 && sizeof(((RKLLMMultiModalInput *)0)->audio) == 48,
               "RKLLMMultiModalInput.audio layout");
#endif
#if ABI_AT_LEAST(130)
_Static_assert(sizeof(RKLLMCallback) == 48, "RKLLMCallback layout");
#endif
_Static_assert(sizeof(RKLLMResultLastHiddenLayer) == 16, "RKLLMResultLastHiddenLayer layout");
_Static_assert(sizeof(RKLLMLoraAdapter) == 24, "RKLLMLoraAdapter layout");

#ifndef RKEDGE_NO_VERSION_STRING
/* The version marker real libraries carry (ABI.md, "Version marker"): tools read the release from it, without
 * loading the file, to tell 1.2.1 from 1.2.3, 1.3.0 and 1.3.1. The build field names this stand-in instead of a
 * vendor hash and date. Builds with -DRKEDGE_NO_VERSION_STRING leave it out, like a library that carries none. */
__attribute__((used)) static const char runtime_version_marker[] =
    "RKLLM SDK (version: " RKEDGE_RUNTIME_VERSION " | target: Linux | build: rkedge-simulated-npu)";
#endif

#define SIM_MODEL_MAGIC "RKEDGE-SIMULATED-RKLLM-MODEL/1\n"
#define SIM_LORA_MAGIC "RKEDGE-SIMULATED-RKLLM-LORA/1\n"
#define SIM_CACHE_MAGIC "RKEDGE-SIMULATED-PROMPT-CACHE/1\n"
#define HANDLE_MAGIC 0x524b4544u

/* ---- small helpers -------------------------------------------------------------------------------- */

typedef struct {
    char *data;
    size_t len, cap;
} strbuf;

static void sb_reserve(strbuf *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (b->len + extra + 1 > cap) cap *= 2;
    b->data = realloc(b->data, cap);
    b->cap = cap;
}

static void sb_append(strbuf *b, const char *s, size_t n) {
    sb_reserve(b, n);
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

static void sb_puts(strbuf *b, const char *s) { sb_append(b, s, strlen(s)); }

static void sb_printf(strbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char tmp[512];
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof tmp) {
        sb_append(b, tmp, (size_t)n);
        return;
    }
    sb_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Appends s (n bytes) as a JSON string; bytes that are not valid UTF-8 become U+FFFD. */
static void sb_json_string(strbuf *b, const char *s, size_t n) {
    if (!s) {
        sb_puts(b, "null");
        return;
    }
    sb_puts(b, "\"");
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        if (c == '"' || c == '\\') {
            char esc[3] = {'\\', (char)c, 0};
            sb_puts(b, esc);
            i++;
        } else if (c < 0x20) {
            sb_printf(b, "\\u%04x", c);
            i++;
        } else if (c < 0x80) {
            sb_append(b, (const char *)&p[i], 1);
            i++;
        } else {
            int len = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
            int ok = len > 0 && i + (size_t)len <= n;
            for (int k = 1; ok && k < len; k++) ok = (p[i + k] & 0xC0) == 0x80;
            if (ok) {
                sb_append(b, (const char *)&p[i], (size_t)len);
                i += (size_t)len;
            } else {
                sb_puts(b, "\\ufffd");
                i++;
            }
        }
    }
    sb_puts(b, "\"");
}

/* Appends ,"key":"value" (no comma before the first field); NULL values become null. */
static void sb_field(strbuf *b, const char *key, const char *value) {
    if (b->len) sb_puts(b, ",");
    sb_printf(b, "\"%s\":", key);
    sb_json_string(b, value, value ? strlen(value) : 0);
}

static void sb_hex(strbuf *b, const char *s, size_t n) {
    static const char digits[] = "0123456789abcdef";
    sb_puts(b, "\"");
    for (size_t i = 0; i < n; i++) {
        char pair[2] = {digits[((unsigned char)s[i]) >> 4], digits[((unsigned char)s[i]) & 15]};
        sb_append(b, pair, 2);
    }
    sb_puts(b, "\"");
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static uint64_t fnv1a(const void *data, size_t n, uint64_t h) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s ? *s : 88172645463325252ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static char *xstrdup(const char *s) { return s ? strdup(s) : NULL; }

static char *read_file(const char *path, size_t *size_out) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    strbuf b = {0};
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) sb_append(&b, chunk, n);
    fclose(f);
    if (!b.data) sb_append(&b, "", 0);
    if (size_out) *size_out = b.len;
    return b.data;
}

/* "1.2.10" -> comparable integer; missing parts count as 0. */
static long version_key(const char *v) {
    long parts[3] = {0, 0, 0};
    for (int i = 0; i < 3 && v && *v; i++) {
        parts[i] = strtol(v, (char **)&v, 10);
        while (*v && *v != '.') v++;
        if (*v == '.') v++;
    }
    return parts[0] * 1000000 + parts[1] * 1000 + parts[2];
}

static long generation_key(const char *v) { return version_key(v) / 1000; }

/* ---- diagnostics ---------------------------------------------------------------------------------- */

static void diag(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    strbuf b = {0};
    char tmp[1024];
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    sb_puts(&b, tmp);
    sb_puts(&b, "\n");
    fputs(b.data, stderr);
    fflush(stderr);
    free(b.data);
}

/* RKNN lines carry a wall-clock stamp: "E RKNN: [08:23:51.447] ...". */
static void rknn_error(const char *fmt, ...) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    localtime_r(&tv.tv_sec, &tm);
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    diag("E RKNN: [%02d:%02d:%02d.%03d] %s", tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(tv.tv_usec / 1000), msg);
}

static pthread_mutex_t call_log_lock = PTHREAD_MUTEX_INITIALIZER;

/* Appends one JSON object (body without braces) to $RKEDGE_MOCK_CALL_LOG. */
static void call_log(const char *fn, strbuf *body) {
    const char *path = getenv("RKEDGE_MOCK_CALL_LOG");
    if (!path || !*path) return;
    strbuf line = {0};
    sb_printf(&line, "{\"fn\":\"%s\",\"abi\":\"%s\"", fn, ABI_NAME);
    if (body && body->len) {
        sb_puts(&line, ",");
        sb_append(&line, body->data, body->len);
    }
    sb_puts(&line, "}\n");
    pthread_mutex_lock(&call_log_lock);
    FILE *f = fopen(path, "ab");
    if (f) {
        fwrite(line.data, 1, line.len, f);
        fclose(f);
    }
    pthread_mutex_unlock(&call_log_lock);
    free(line.data);
}

static void call_log_simple(const char *fn, const char *key, const char *value) {
    strbuf b = {0};
    sb_field(&b, key, value);
    call_log(fn, &b);
    free(b.data);
}

/* ---- the handle ----------------------------------------------------------------------------------- */

typedef struct {
    char *bytes;
    int len;
    int incomplete; /* ends inside a multi-byte character: delivered as WAITING */
} token_piece;

typedef struct {
    char *name;
    char *path;
    float scale;
} lora_slot;

typedef struct {
    strbuf prompt; /* the text the model sees, after the runtime's own chat template */
    int has_text;
    int prompt_tokens;
    int mode;
    char *lora_name;
    int save_prompt_cache;
    char *prompt_cache_path;
    int keep_history;
    int max_new_tokens;
    void *userdata;
    int input_type;
    int extra_tokens;           /* positions that are not text: token ids, embeddings, image/video/audio rows */
    int32_t *input_ids;         /* RKLLM_INPUT_TOKEN ids, kept for the 1.3.0 embedding callback */
    int n_input_ids;
    int kv_before_generation;   /* cache + this input: what n_keep = -1 keeps in a context shift */
    int context_shifts;
    int embed_callback_calls;
} run_job;

enum { UTF8_SPLIT_OVERLAP, UTF8_SPLIT_PIECES, UTF8_SPLIT_WHOLE };
enum { BUFFER_ROWS_ALL = 0, BUFFER_ROWS_LAST = -1 };

typedef struct {
    uint32_t magic;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    json_value *manifest;
    char *model_path;
    const char *model_id, *toolkit_version, *platform, *dtype;
    int max_context_limit, vocab_size, hidden_size, npu_cores;
    double prefill_tps, decode_tps, memory_mb;
    int error_after_tokens, stall_after_tokens, stall_ms;
    int utf8_split;    /* UTF8_SPLIT_*, from the "utf8_split" option */
    int context_shift; /* "context_full": "shift" */
    int buffer_rows;   /* BUFFER_ROWS_ALL, BUFFER_ROWS_LAST or rows per callback ("buffer_rows") */
    int broken;  /* init "failed" but returned 0, as 1.1.x runtimes do: every run ends in ERROR */
    int garbage; /* a model the runtime misreads (F-3 on 1.1): it generates gibberish */
    RKLLMParam param;
    LLMResultCallback callback;
    void *callback_userdata;
#if ABI_AT_LEAST(130)
    LLMTokenizerCallback tokenizer_callback;
    void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback;
    void *embed_userdata;
#else
    char *img_start, *img_end, *img_content; /* the image tags, per init up to 1.2.3 (copied) */
#endif
    char *tpl_system, *tpl_prefix, *tpl_postfix;
    int kv_tokens;
    int paused;
    lora_slot loras[16];
    int n_loras;
    pthread_t thread;
    int thread_joinable;
    int running;
    volatile int abort_requested;
    run_job job;
    char text[64];
    float *output_buffer;
} mock_handle;

static mock_handle *as_handle(LLMHandle h) {
    mock_handle *m = (mock_handle *)h;
    return (m && m->magic == HANDLE_MAGIC) ? m : NULL;
}

/* Sleeps up to ms, waking early on abort. Returns 1 when an abort was requested. */
static int sleep_unless_aborted(mock_handle *h, double ms) {
    if (h->abort_requested) return 1;
    if (ms <= 0) return 0;
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    long long ns = (long long)deadline.tv_nsec + (long long)(ms * 1e6);
    deadline.tv_sec += (time_t)(ns / 1000000000LL);
    deadline.tv_nsec = (long)(ns % 1000000000LL);
    pthread_mutex_lock(&h->lock);
    while (!h->abort_requested) {
        if (pthread_cond_timedwait(&h->wake, &h->lock, &deadline) == ETIMEDOUT) break;
    }
    int aborted = h->abort_requested;
    pthread_mutex_unlock(&h->lock);
    return aborted;
}

/* The simulator's tokenizer: one token per 4 bytes of text (rounded up). Documented in the README. */
static int count_tokens(size_t bytes) { return (int)((bytes + 3) / 4); }

#if ABI_AT_LEAST(120)
static int system_prompt_tokens(mock_handle *h) {
    return h->tpl_system ? count_tokens(strlen(h->tpl_system)) : 0;
}
#endif

/* ---- text ----------------------------------------------------------------------------------------- */

static const char *const WORDS[] = {
    "the", "NPU", "runs", "a", "small", "model", "on", "Rockchip", "RK3588", "board", "with", "int8",
    "weights", "and", "fast", "decode", "tokens", "per", "second", "über", "naïve", "Größe", "日本語",
    "模型", "推理", "café", "→", "🚀", "✓", "memory", "bandwidth", "bound", "prefill", "cache", "context",
};
#define N_WORDS (sizeof WORDS / sizeof WORDS[0])

static void generated_text(strbuf *out, uint64_t seed, int garbage) {
    uint64_t s = seed | 1;
    if (garbage) {
        static const char junk[] = "#@%&*~^|qxzvj";
        int n = 12 + (int)(xorshift(&s) % 24);
        for (int i = 0; i < n; i++) {
            char c = junk[xorshift(&s) % (sizeof junk - 1)];
            sb_append(out, &c, 1);
        }
        return;
    }
    int n = 6 + (int)(xorshift(&s) % 26);
    for (int i = 0; i < n; i++) {
        if (i) sb_puts(out, " ");
        sb_puts(out, WORDS[xorshift(&s) % N_WORDS]);
    }
    sb_puts(out, ".");
}

static int utf8_length(unsigned char c) {
    if (c < 0x80) return 1;
    if ((c >> 5) == 6) return 2;
    if ((c >> 4) == 14) return 3;
    if ((c >> 3) == 30) return 4;
    return 1;
}

/*
 * Splits a response into tokens: an ASCII word with its leading space, a punctuation mark, or a multi-byte
 * character. A character of 3 or 4 bytes arrives as two tokens, the first of which does not complete it:
 * the runtime reports it with RKLLM_RUN_WAITING ("the decoded bytes are not yet a complete UTF-8
 * character, wait for the next call and join", SEMANTICS.md "The result callback").
 * UNKNOWN (stand-in choice): what the WAITING text and the following NORMAL text carry. No public source
 * settles it, and the clients in the field assume three different answers (issue 13, "Why"), so each one
 * is an option ("utf8_split"):
 *   overlap (default, this stand-in's original choice): WAITING carries the partial bytes, NORMAL the
 *           whole character again; a client that drops WAITING text still sees every character once.
 *   pieces: WAITING carries the partial bytes, NORMAL only the rest: the pieces do not overlap and
 *           joining them gives the character once (SEMANTICS.md's "join"; what the 1.1.4 demo server's
 *           byte joining relies on, as does rkllama's split_byte_data, runtime-anchors.md section 2.2).
 *   whole:  WAITING carries an empty text, NORMAL the whole character (what the 1.2+ servers that read
 *           only NORMAL text rely on; runtime-anchors.md section 2.2 shows one decoding each NORMAL text
 *           on its own, with errors='replace').
 */
static int split_tokens(const char *text, size_t n, int mode, token_piece **out) {
    int cap = 16, count = 0;
    token_piece *pieces = malloc(sizeof(token_piece) * (size_t)cap);
    size_t i = 0;
#define PUSH(ptr, length, inc)                                                 \
    do {                                                                       \
        if (count + 2 >= cap) {                                                \
            cap *= 2;                                                          \
            pieces = realloc(pieces, sizeof(token_piece) * (size_t)cap);       \
        }                                                                      \
        pieces[count].bytes = malloc((size_t)(length) + 1);                    \
        memcpy(pieces[count].bytes, (ptr), (size_t)(length));                  \
        pieces[count].bytes[(length)] = 0;                                     \
        pieces[count].len = (int)(length);                                     \
        pieces[count].incomplete = (inc);                                      \
        count++;                                                               \
    } while (0)
    while (i < n) {
        unsigned char c = (unsigned char)text[i];
        int len = utf8_length(c);
        if (i + (size_t)len > n) len = (int)(n - i);
        if (len >= 3) {
            if (mode == UTF8_SPLIT_PIECES) {
                PUSH(text + i, 1, 1);
                PUSH(text + i + 1, len - 1, 0);
            } else if (mode == UTF8_SPLIT_WHOLE) {
                PUSH(text + i, 0, 1);
                PUSH(text + i, len, 0);
            } else {
                PUSH(text + i, 1, 1);
                PUSH(text + i, len, 0);
            }
            i += (size_t)len;
        } else if (len == 2) {
            PUSH(text + i, 2, 0);
            i += 2;
        } else {
            size_t start = i++;
            int word = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
            if (c == ' ' && i < n) word = ((unsigned char)text[i] < 0x80) && text[i] != ' ';
            while (word && i < n && ((text[i] >= 'a' && text[i] <= 'z') || (text[i] >= 'A' && text[i] <= 'Z') ||
                                     (text[i] >= '0' && text[i] <= '9')))
                i++;
            PUSH(text + start, i - start, 0);
        }
    }
#undef PUSH
    *out = pieces;
    return count;
}

/* A scripted response from the manifest: the first rule whose "match" occurs in the prompt and whose
 * "lora" (if given) is the adapter selected for this run. */
static const char *scripted_response(mock_handle *h, run_job *job) {
    json_value *rules = json_get(h->manifest, "responses");
    if (!rules || rules->type != JSON_ARRAY) return NULL;
    for (int i = 0; i < rules->length; i++) {
        json_value *rule = rules->items[i];
        const char *text = json_get_string(rule, "text", NULL);
        if (!text) continue;
        const char *match = json_get_string(rule, "match", NULL);
        const char *lora = json_get_string(rule, "lora", NULL);
        if (match && (!job->prompt.data || !strstr(job->prompt.data, match))) continue;
        if (lora && (!job->lora_name || strcmp(lora, job->lora_name) != 0)) continue;
        return text;
    }
    return NULL;
}

/* ---- callbacks ------------------------------------------------------------------------------------ */

static int deliver(mock_handle *h, RKLLMResult *result, LLMCallState state) {
    if (!h->callback) return 0;
#if ABI_AT_LEAST(121)
    return h->callback(result, h->job.userdata, state);
#else
    h->callback(result, h->job.userdata, state);
    return 0;
#endif
}

static void log_callback_return(const char *event, int value) {
    strbuf b = {0};
    sb_printf(&b, "\"event\":\"%s\",\"value\":%d", event, value);
    call_log("callback_return", &b);
    free(b.data);
}

static void write_prompt_cache(mock_handle *h, const char *path) {
    strbuf b = {0};
    sb_puts(&b, SIM_CACHE_MAGIC);
    sb_puts(&b, "{\"model_id\":");
    sb_json_string(&b, h->model_id, strlen(h->model_id));
    sb_printf(&b, ",\"tokens\":%d}\n", h->kv_tokens);
    strbuf tmp = {0};
    sb_printf(&tmp, "%s.part", path);
    FILE *f = fopen(tmp.data, "wb");
    if (f) {
        fwrite(b.data, 1, b.len, f);
        fclose(f);
        rename(tmp.data, path);
    } else {
        diag("E rkllm: failed to save prompt cache to %s", path);
    }
    free(tmp.data);
    free(b.data);
}

/* ERROR ends a run and carries no token: SEMANTICS.md gives text and token_id to NORMAL (and WAITING) only.
 * UNKNOWN (stand-in choice): what the vendor runtime leaves in the struct; here text is NULL, token_id -1 and
 * no buffer is set, so a client reading it sees no stale token. */
static void deliver_error(mock_handle *h) {
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    result.text = NULL;
    result.token_id = -1;
    deliver(h, &result, RKLLM_RUN_ERROR);
}

/* The value of one position of the logits / hidden-layer output: a pure function of (prompt, row, column), so
 * the rows split over several callbacks join into exactly the buffer a single callback would carry. */
static float buffer_value(uint64_t seed, size_t row, size_t width, size_t column) {
    return (float)sin((double)(seed % 1000) + (double)(row * width + column) * 0.01);
}

/*
 * Logits / last-hidden-layer modes: num_tokens x width floats per callback (SEMANTICS.md). Every position of
 * the input is reported: rows [0, prompt_tokens) in order.
 * UNKNOWN (stand-in choice): how many positions one callback carries. The official demos read num_tokens rows
 * from each NORMAL callback and warn that "the next callback releases the pointer" (so there may be several),
 * and 1.3.0's return value 2 releases the buffer early; no public source says whether the runtime gives every
 * prompt position, the last one only, or chunks. Option "buffer_rows": "all" (default: one callback, every
 * position), "last" (one callback, the last position), N (callbacks of at most N rows, in order).
 * Returns 1 when the client paused (return 1, ABI >= 1.2.1: honoured as in generate mode).
 */
static int run_buffer_mode(mock_handle *h, run_job *job, int *callbacks, int *positions) {
    size_t total = (size_t)(job->prompt_tokens > 0 ? job->prompt_tokens : 1);
    int hidden = job->mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER;
    size_t width = (size_t)(hidden ? h->hidden_size : h->vocab_size);
    size_t first = h->buffer_rows == BUFFER_ROWS_LAST ? total - 1 : 0;
    size_t step = h->buffer_rows > 0 ? (size_t)h->buffer_rows : total - first;
    uint64_t seed = fnv1a(job->prompt.data ? job->prompt.data : "", job->prompt.len, 1469598103934665603ull);
    int paused = 0;
    for (size_t row = first; row < total; row += step) {
        size_t rows = total - row < step ? total - row : step;
        free(h->output_buffer);
        h->output_buffer = malloc(sizeof(float) * rows * width);
        for (size_t r = 0; r < rows; r++)
            for (size_t c = 0; c < width; c++) h->output_buffer[r * width + c] = buffer_value(seed, row + r, width, c);
        RKLLMResult result;
        memset(&result, 0, sizeof result);
        LLMCallState state = RKLLM_RUN_NORMAL;
        if (hidden) {
            result.last_hidden_layer.hidden_states = h->output_buffer;
            result.last_hidden_layer.embd_size = (int)width;
            result.last_hidden_layer.num_tokens = (int)rows;
#if RKEDGE_ABI == 110
            state = RKLLM_RUN_GET_LAST_HIDDEN_LAYER;
#endif
        }
#if ABI_AT_LEAST(120)
        else {
            result.logits.logits = h->output_buffer;
            result.logits.vocab_size = (int)width;
            result.logits.num_tokens = (int)rows;
        }
#endif
        int ret = deliver(h, &result, state);
        (*callbacks)++;
        *positions += (int)rows;
        strbuf b = {0};
        sb_printf(&b, "\"mode\":%d,\"first_position\":%zu,\"num_tokens\":%zu,\"width\":%zu,\"positions\":%zu,"
                      "\"return\":%d", job->mode, row, rows, width, total, ret);
        call_log("buffer", &b);
        free(b.data);
        if (ret == 2 && ABI_AT_LEAST(130)) {
            log_callback_return("release", ret);
            free(h->output_buffer);
            h->output_buffer = NULL;
        }
        if (ABI_AT_LEAST(121) && ret == 1) {
            log_callback_return("pause", ret);
            paused = 1;
            break;
        }
        if (h->abort_requested) break;
    }
    return paused;
}

/*
 * Generation filled the context (max_context_len). SEMANTICS.md: n_keep (>= 1.2.0) is the number of KV entries
 * kept at the start "when the context window shifts". With option "context_full": "shift" the stand-in shifts:
 * it keeps the first n_keep entries and discards half of the rest, then generation goes on.
 * UNKNOWN (stand-in choices): whether the vendor runtime shifts at all (the default, "stop", ends generation
 * at the full context as earlier builds did), how much it discards (half of what follows n_keep here, as
 * llama.cpp does), and what n_keep = -1 (every example's value) keeps: here, as in llama.cpp, the whole input
 * (the cache before this run plus its prompt). ABI 1.1 has no n_keep and behaves as -1.
 * Returns 1 when room was made.
 */
static int shift_context(mock_handle *h, run_job *job) {
    int n_keep_param = -1;
#if ABI_AT_LEAST(120)
    n_keep_param = h->param.n_keep;
#endif
    int before = h->kv_tokens;
    int keep = n_keep_param >= 0 ? n_keep_param : job->kv_before_generation;
    if (keep > before) keep = before;
    int discard = (before - keep) / 2;
    if (discard > 0) {
        h->kv_tokens -= discard;
        job->context_shifts++;
    }
    strbuf b = {0};
    sb_printf(&b, "\"n_keep\":%d,\"kept\":%d,\"discarded\":%d,\"kv_tokens_before\":%d,\"kv_tokens_after\":%d",
              n_keep_param, keep, discard, before, h->kv_tokens);
    call_log("context_shift", &b);
    free(b.data);
    return discard > 0;
}

#if ABI_AT_LEAST(130)
/* The simulated tokenizer's ids for a text nobody tokenized: one per 4 bytes (count_tokens), ids >= 3. */
static int32_t *simulated_ids(mock_handle *h, const char *text, size_t len, int *count) {
    int n = count_tokens(len);
    int32_t *ids = calloc((size_t)(n > 0 ? n : 1), sizeof(int32_t));
    uint64_t vocab = (uint64_t)(h->vocab_size > 3 ? h->vocab_size - 3 : 1);
    for (int i = 0; i < n; i++) {
        size_t at = (size_t)i * 4, chunk = len - at < 4 ? len - at : 4;
        ids[i] = (int32_t)(fnv1a(text + at, chunk, 7) % vocab) + 3;
    }
    *count = n;
    return ids;
}

/* Asks the client's embedding callback for the rows of n ids. Returns its return value (0 = success). */
static int embed_via_callback(mock_handle *h, run_job *job, int32_t *ids, int n, int log_it) {
    size_t floats = (size_t)n * (size_t)h->hidden_size;
    float *rows = calloc(floats > 0 ? floats : 1, sizeof(float));
    /* UNKNOWN (stand-in choice): the unit of `len` (bytes here, the buffer's size) and the meaning of the return
     * value (0 = success, anything else fails the run). */
    int rc = h->embed_callback(h->embed_userdata, ids, (uint64_t)n, rows, (uint64_t)(floats * sizeof(float)));
    job->embed_callback_calls++;
    if (log_it) {
        double sum = 0;
        for (size_t i = 0; i < floats; i++) sum += rows[i];
        strbuf b = {0};
        sb_printf(&b, "\"num_tokens\":%d,\"len\":%zu,\"returned\":%d,\"sum\":%.6g,\"tokens\":[", n,
                  floats * sizeof(float), rc, sum);
        for (int i = 0; i < n; i++) sb_printf(&b, "%s%d", i ? "," : "", ids[i]);
        sb_puts(&b, "]");
        call_log("embed_callback", &b);
        free(b.data);
    }
    free(rows);
    if (rc != 0) diag("E rkllm: [rkedge simulator] the embedding callback returned %d", rc);
    return rc;
}

/*
 * The 1.3.0 tokenizer and embedding callbacks (RKLLMCallback; SEMANTICS.md call flow 2: they may be NULL when
 * the model carries its own tokenizer and embedding, i.e. they serve models exported without them).
 * UNKNOWN (stand-in choices): when and from which thread the runtime calls them. Here, when set, on the
 * runtime's thread at the start of prefill: the tokenizer once for the text input (after the chat template;
 * n_tokens_max = max_context_len; the return value is the number of ids written, < 0 or above n_tokens_max
 * fails the run), then the embedding callback once for the input's ids (token input, or the text's ids), and
 * once per generated token (its row for the next step). Returns 0 on success.
 */
static int prefill_callbacks(mock_handle *h, run_job *job) {
    int32_t *ids = NULL;
    int n_ids = 0;
    if (h->tokenizer_callback && job->has_text) {
        int cap = h->param.max_context_len > 0 ? h->param.max_context_len : 4096;
        ids = calloc((size_t)cap, sizeof(int32_t));
        int n = h->tokenizer_callback(h->tokenizer_userdata, job->prompt.data ? job->prompt.data : "",
                                      (int32_t)job->prompt.len, ids, cap);
        strbuf b = {0};
        sb_printf(&b, "\"text_len\":%zu,\"n_tokens_max\":%d,\"returned\":%d,\"text\":", job->prompt.len, cap, n);
        sb_json_string(&b, job->prompt.data ? job->prompt.data : "", job->prompt.len);
        sb_puts(&b, ",\"tokens\":[");
        for (int i = 0; n <= cap && i < n; i++) sb_printf(&b, "%s%d", i ? "," : "", ids[i]);
        sb_puts(&b, "]");
        call_log("tokenizer_callback", &b);
        free(b.data);
        if (n < 0 || n > cap) {
            diag("E rkllm: [rkedge simulator] the tokenizer callback returned %d (room for %d tokens)", n, cap);
            free(ids);
            return -1;
        }
        n_ids = n;
        job->prompt_tokens = n + job->extra_tokens;
    }
    int rc = 0;
    if (h->embed_callback) {
        if (!ids && job->input_ids) {
            ids = malloc(sizeof(int32_t) * (size_t)(job->n_input_ids > 0 ? job->n_input_ids : 1));
            memcpy(ids, job->input_ids, sizeof(int32_t) * (size_t)job->n_input_ids);
            n_ids = job->n_input_ids;
        } else if (!ids && job->has_text) {
            ids = simulated_ids(h, job->prompt.data ? job->prompt.data : "", job->prompt.len, &n_ids);
        }
        if (ids && n_ids > 0) rc = embed_via_callback(h, job, ids, n_ids, 1);
    }
    free(ids);
    return rc;
}
#endif

static void *generation_main(void *arg) {
    mock_handle *h = arg;
    run_job *job = &h->job;
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    double t_start = now_ms();
    int generated = 0, ended_in_error = 0, paused = 0, buffer_callbacks = 0, buffer_positions = 0;
    double t_first = t_start;
    (void)t_first; /* perf stats exist from ABI 1.2.1 */

    if (h->broken) {
        ended_in_error = 1;
        deliver_error(h);
        goto done;
    }
#if ABI_AT_LEAST(130)
    if (prefill_callbacks(h, job) != 0) {
        ended_in_error = 1;
        deliver_error(h);
        goto done;
    }
#endif
    int limit = h->param.max_context_len;
    if (h->kv_tokens + job->prompt_tokens > limit) {
        /* UNKNOWN (stand-in choice): the runtime's text and state for a prompt beyond the context. */
        diag("E rkllm: the input of %d tokens plus %d cached tokens exceeds max_context_len %d",
             job->prompt_tokens, h->kv_tokens, limit);
        ended_in_error = 1;
        deliver_error(h);
        goto done;
    }
    if (h->prefill_tps > 0 && sleep_unless_aborted(h, 1000.0 * job->prompt_tokens / h->prefill_tps)) goto finish;
    if (h->abort_requested) goto finish;
    h->kv_tokens += job->prompt_tokens;
    job->kv_before_generation = h->kv_tokens;
    t_first = now_ms();
    if (job->save_prompt_cache && job->prompt_cache_path) write_prompt_cache(h, job->prompt_cache_path);

    if (job->mode != RKLLM_INFER_GENERATE) {
        paused = run_buffer_mode(h, job, &buffer_callbacks, &buffer_positions);
        if (paused) goto done;
        goto finish;
    }

    {
        strbuf text = {0};
        const char *scripted = h->garbage ? NULL : scripted_response(h, job);
        if (scripted) {
            sb_puts(&text, scripted);
        } else {
            uint64_t seed = fnv1a(job->prompt.data ? job->prompt.data : "", job->prompt.len, 1469598103934665603ull);
            if (job->lora_name) seed = fnv1a(job->lora_name, strlen(job->lora_name), seed);
            generated_text(&text, seed, h->garbage);
        }
        token_piece *pieces = NULL;
        int n_pieces = split_tokens(text.data ? text.data : "", text.len, h->utf8_split, &pieces);
        double per_token_ms = h->decode_tps > 0 ? 1000.0 / h->decode_tps : 0;
        for (int i = 0; i < n_pieces; i++) {
            if (generated >= job->max_new_tokens) break;
            if (h->kv_tokens >= limit && !(h->context_shift && shift_context(h, job))) break;
            if (sleep_unless_aborted(h, per_token_ms)) break;
            if (h->error_after_tokens >= 0 && generated == h->error_after_tokens) {
                /* The text a runtime prints when an NPU op fails mid-run (F-5, driver 0.8.2 reports). */
                diag("E rkllm: matmul(w8a8) run failed");
                ended_in_error = 1;
                deliver_error(h);
                break;
            }
            if (h->stall_after_tokens >= 0 && generated == h->stall_after_tokens &&
                sleep_unless_aborted(h, h->stall_ms))
                break;
            int n = pieces[i].len < (int)sizeof h->text - 1 ? pieces[i].len : (int)sizeof h->text - 1;
            memcpy(h->text, pieces[i].bytes, (size_t)n);
            h->text[n] = 0;
            result.text = h->text;
            result.token_id = (int32_t)(fnv1a(h->text, (size_t)n, 7) % (uint64_t)(h->vocab_size > 3 ? h->vocab_size - 3 : 1)) + 3;
            int ret = deliver(h, &result, pieces[i].incomplete ? RKLLM_RUN_WAITING : RKLLM_RUN_NORMAL);
            generated++;
            h->kv_tokens++;
#if ABI_AT_LEAST(130)
            if (h->embed_callback) {
                int32_t id = result.token_id;
                if (embed_via_callback(h, job, &id, 1, 0) != 0) {
                    ended_in_error = 1;
                    deliver_error(h);
                    break;
                }
            }
#endif
            if (ABI_AT_LEAST(121) && ret == 1) {
                log_callback_return("pause", ret);
                paused = 1;
                break;
            }
            if (ABI_AT_LEAST(130) && ret == 2) log_callback_return("release", ret);
        }
        for (int i = 0; i < n_pieces; i++) free(pieces[i].bytes);
        free(pieces);
        free(text.data);
    }
    if (ended_in_error || paused) goto done;

finish:
    memset(&result, 0, sizeof result);
#if ABI_AT_LEAST(121)
    {
        double t_end = now_ms();
        result.perf.prefill_time_ms = (float)(t_first - t_start);
        result.perf.prefill_tokens = job->prompt_tokens;
        result.perf.generate_time_ms = (float)(t_end - t_first);
        result.perf.generate_tokens = generated;
        result.perf.memory_usage_mb = (float)(h->memory_mb + h->kv_tokens * 0.05);
    }
#endif
    /* UNKNOWN (stand-in choice): after rkllm_abort the stand-in still ends the run with FINISH. */
    deliver(h, &result, RKLLM_RUN_FINISH);

done:
    {
        strbuf b = {0};
        sb_printf(&b, "\"generated_tokens\":%d,\"aborted\":%s,\"paused\":%s,\"error\":%s", generated,
                  h->abort_requested ? "true" : "false", paused ? "true" : "false",
                  ended_in_error ? "true" : "false");
        sb_printf(&b, ",\"prompt_tokens\":%d,\"context_shifts\":%d,\"kv_tokens_at_end\":%d", job->prompt_tokens,
                  job->context_shifts, h->kv_tokens);
        if (job->mode != RKLLM_INFER_GENERATE)
            sb_printf(&b, ",\"buffer_callbacks\":%d,\"buffer_positions\":%d", buffer_callbacks, buffer_positions);
#if ABI_AT_LEAST(130)
        sb_printf(&b, ",\"embed_callback_calls\":%d", job->embed_callback_calls);
#endif
        call_log("run_end", &b);
        free(b.data);
    }
    pthread_mutex_lock(&h->lock);
    h->paused = paused;
    /* ABI 1.1 has no keep_history: nothing survives a run. Paused runs keep their cache for the resume. */
    if (!paused && !job->keep_history) h->kv_tokens = 0;
    h->running = 0;
    pthread_mutex_unlock(&h->lock);
    return (void *)(intptr_t)(ended_in_error ? -1 : 0);
}

/* ---- model file ------------------------------------------------------------------------------------ */

static const char *simulated_driver_version(json_value *faults) {
    const char *env = getenv("RKEDGE_MOCK_DRIVER_VERSION");
    if (env && *env) return env;
    return json_get_string(faults, "driver_version", "0.9.8");
}

static json_value *effective_faults(json_value *manifest, json_value **owned) {
    *owned = NULL;
    const char *env = getenv("RKEDGE_MOCK_FAULT");
    if (env && *env) {
        *owned = json_parse(env);
        if (*owned && (*owned)->type == JSON_OBJECT) return *owned;
        diag("W rkllm: [rkedge simulator] RKEDGE_MOCK_FAULT is not a JSON object; ignored");
    }
    return json_get(manifest, "faults");
}

/* Faults that act during runs; $RKEDGE_MOCK_FAULT is read again at every run so tests can inject them. */
static void load_run_faults(mock_handle *h, json_value *faults) {
    h->error_after_tokens = (int)json_get_number(faults, "error_after_tokens", -1);
    h->stall_after_tokens = (int)json_get_number(faults, "stall_after_tokens", -1);
    h->stall_ms = (int)json_get_number(faults, "stall_ms", 60000);
    /* The behaviour options (see the top of this file); an unknown value warns and keeps the default. */
    const char *split = json_get_string(faults, "utf8_split", "overlap");
    h->utf8_split = strcmp(split, "pieces") == 0 ? UTF8_SPLIT_PIECES
                    : strcmp(split, "whole") == 0 ? UTF8_SPLIT_WHOLE : UTF8_SPLIT_OVERLAP;
    if (h->utf8_split == UTF8_SPLIT_OVERLAP && strcmp(split, "overlap") != 0)
        diag("W rkllm: [rkedge simulator] utf8_split must be overlap, pieces or whole; using overlap");
    const char *full = json_get_string(faults, "context_full", "stop");
    h->context_shift = strcmp(full, "shift") == 0;
    if (!h->context_shift && strcmp(full, "stop") != 0)
        diag("W rkllm: [rkedge simulator] context_full must be stop or shift; using stop");
    json_value *rows = json_get(faults, "buffer_rows");
    h->buffer_rows = BUFFER_ROWS_ALL;
    if (rows && rows->type == JSON_NUMBER && rows->number >= 1) {
        h->buffer_rows = (int)rows->number;
    } else if (rows && rows->type == JSON_STRING && strcmp(rows->string, "last") == 0) {
        h->buffer_rows = BUFFER_ROWS_LAST;
    } else if (rows && !(rows->type == JSON_STRING && strcmp(rows->string, "all") == 0)) {
        diag("W rkllm: [rkedge simulator] buffer_rows must be all, last or a number of rows >= 1; using all");
    }
}

static void foreign_model_error(const char *path) {
#if RKEDGE_ABI == 110
    (void)path;
    rknn_error("invalid rknn llm model magic");
    rknn_error("load model file error!");
    diag("rknn_init fail! ret=-1");
#else
    (void)path;
    diag("E rkllm: invalid rkllm model!");
    diag("E rkllm: rkllm_init failed");
#endif
}

static void apply_pace(mock_handle *h) {
    json_value *pace = json_get(h->manifest, "pace");
    h->prefill_tps = json_get_number(pace, "prefill_tokens_per_s", 0);
    h->decode_tps = json_get_number(pace, "decode_tokens_per_s", 0);
    const char *env = getenv("RKEDGE_MOCK_PACE");
    if (env && *env) {
        if (strcmp(env, "unlimited") == 0) {
            h->prefill_tps = h->decode_tps = 0;
        } else {
            double p = 0, d = 0;
            if (sscanf(env, "%lf,%lf", &p, &d) == 2) {
                h->prefill_tps = p;
                h->decode_tps = d;
            } else {
                diag("W rkllm: [rkedge simulator] RKEDGE_MOCK_PACE must be 'unlimited' or 'PREFILL_TPS,DECODE_TPS'");
            }
        }
    }
}

static void log_init_params(RKLLMParam *p) {
    strbuf b = {0};
    sb_puts(&b, "\"model_path\":");
    sb_json_string(&b, p->model_path, p->model_path ? strlen(p->model_path) : 0);
    sb_printf(&b, ",\"max_context_len\":%d,\"max_new_tokens\":%d,\"top_k\":%d,\"top_p\":%g,\"temperature\":%g",
              p->max_context_len, p->max_new_tokens, p->top_k, p->top_p, p->temperature);
    sb_printf(&b, ",\"repeat_penalty\":%g,\"frequency_penalty\":%g,\"presence_penalty\":%g,\"mirostat\":%d",
              p->repeat_penalty, p->frequency_penalty, p->presence_penalty, p->mirostat);
    sb_printf(&b, ",\"mirostat_tau\":%g,\"mirostat_eta\":%g,\"skip_special_token\":%s,\"is_async\":%s",
              p->mirostat_tau, p->mirostat_eta, p->skip_special_token ? "true" : "false",
              p->is_async ? "true" : "false");
#if ABI_AT_LEAST(120)
    sb_printf(&b, ",\"n_keep\":%d,\"embed_flash\":%d,\"enabled_cpus_num\":%d,\"enabled_cpus_mask\":%u", p->n_keep,
              p->extend_param.embed_flash, p->extend_param.enabled_cpus_num, p->extend_param.enabled_cpus_mask);
#endif
#if ABI_AT_LEAST(121)
    sb_printf(&b, ",\"n_batch\":%d,\"use_cross_attn\":%d", p->extend_param.n_batch, p->extend_param.use_cross_attn);
#endif
#if ABI_AT_LEAST(130)
    sb_printf(&b, ",\"ignore_eos_token\":%s", p->ignore_eos_token ? "true" : "false");
#else
    sb_field(&b, "img_start", p->img_start);
    sb_field(&b, "img_end", p->img_end);
    sb_field(&b, "img_content", p->img_content);
#endif
    sb_printf(&b, ",\"base_domain_id\":%d", p->extend_param.base_domain_id);
    sb_printf(&b, ",\"struct_sizes\":[%zu,%zu,%zu,%zu,%zu]", sizeof(RKLLMExtendParam), sizeof(RKLLMParam),
              sizeof(RKLLMInput), sizeof(RKLLMInferParam), sizeof(RKLLMResult));
    call_log("rkllm_init", &b);
    free(b.data);
}

static void upper(char *dst, const char *src, size_t cap) {
    size_t i = 0;
    for (; src && src[i] && i + 1 < cap; i++) dst[i] = (char)((src[i] >= 'a' && src[i] <= 'z') ? src[i] - 32 : src[i]);
    dst[i] = 0;
}

/* ---- the API ---------------------------------------------------------------------------------------- */

RKLLM_API RKLLMParam rkllm_createDefaultParam(void) {
    /* UNKNOWN (stand-in choice): the vendor defaults are not public. These are the values Rockchip's 1.3.0
     * server example sets explicitly (SEMANTICS.md, call flow 1). */
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.model_path = NULL;
    p.max_context_len = 4096;
    p.max_new_tokens = 4096;
    p.top_k = 1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    p.mirostat = 0;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    p.is_async = false;
#if ABI_AT_LEAST(120)
    p.n_keep = -1;
    p.extend_param.embed_flash = 1;
    p.extend_param.enabled_cpus_num = 4;
    p.extend_param.enabled_cpus_mask = (1u << 4) | (1u << 5) | (1u << 6) | (1u << 7);
#endif
#if ABI_AT_LEAST(121)
    p.extend_param.n_batch = 1;
#endif
    return p;
}

RKLLM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLM_INIT_CALLBACK_T callback) {
    if (!handle || !param) return -1;
    *handle = NULL;
    log_init_params(param);
    if (!param->model_path) {
        diag("E rkllm: model_path is NULL");
        return -1;
    }
    size_t size = 0;
    char *data = read_file(param->model_path, &size);
    if (!data) {
        /* UNKNOWN (stand-in choice): the text for a missing file; this is the llama.cpp-lineage load error. */
        diag("E rkllm: failed to load model '%s'", param->model_path);
        return -1;
    }
    size_t magic_len = strlen(SIM_MODEL_MAGIC);
    if (size < magic_len || memcmp(data, SIM_MODEL_MAGIC, magic_len) != 0) {
        free(data);
        foreign_model_error(param->model_path);
        return -1;
    }
    json_value *manifest = json_parse(data + magic_len);
    free(data);
    if (!manifest || manifest->type != JSON_OBJECT) {
        json_free(manifest);
        foreign_model_error(param->model_path);
        return -1;
    }
    json_value *owned_faults = NULL;
    json_value *faults = effective_faults(manifest, &owned_faults);
    const char *toolkit = json_get_string(manifest, "toolkit_version", "0");
    const char *platform = json_get_string(manifest, "platform", "rk3588");
    int result = 0, broken = 0, garbage = 0;

    char soc[32], model_platform[32], dtype[32];
    const char *env_soc = getenv("RKEDGE_MOCK_PLATFORM");
    upper(soc, env_soc && *env_soc ? env_soc : "RK3588", sizeof soc);
    upper(model_platform, platform, sizeof model_platform);
    upper(dtype, json_get_string(manifest, "dtype", "w8a8"), sizeof dtype);
    const char *driver = simulated_driver_version(faults);
    int max_context_limit = (int)json_get_number(manifest, "max_context_limit", 4096);
    if (generation_key(toolkit) < 1002) max_context_limit = 4096; /* 1.1.x models report 4096 (#290) */

#if ABI_AT_LEAST(120)
    diag("I rkllm: rkllm-runtime version: %s, rknpu driver version: %s, platform: %s", RKEDGE_RUNTIME_VERSION,
         driver, soc);
    diag("I rkllm: loading rkllm model from %s", param->model_path);
#endif
    if (version_key(driver) < version_key("0.9.7"))
        diag("W rkllm: Warning: Your rknpu driver version is too low, please upgrade to 0.9.7.");

    long model_gen = generation_key(toolkit), runtime_gen = generation_key(RKEDGE_RUNTIME_VERSION);
    if (model_gen < 1001) {
        /* F-3 (b): a 1.0.x model on a >= 1.1 runtime. 1.1.x runtimes then still return 0 (#129, #156). */
        rknn_error("invalid rknn llm model magic");
        rknn_error("load model file error!");
#if RKEDGE_ABI == 110
        diag("rknn_init fail! ret=-1");
        garbage = 1;
#else
        diag("E rkllm: rkllm_init failed");
        result = -1;
#endif
    } else if (model_gen > runtime_gen) {
        /* F-3 (c): a model from a newer toolkit generation than the runtime (#235). */
        diag(": invalid magic characters '\xef\xbf\xbd\xcc\x94'");
        diag(": error: failed to load model '%s'", param->model_path);
        result = -1;
    } else if (strcmp(model_platform, soc) != 0) {
        /* F-3 (a) / F-6: the text a runtime printed for a model built for another platform. */
        diag("E rkllm: The model target_platform does not match!");
        result = -1;
    }
#if ABI_AT_LEAST(120)
    else if (param->max_context_len > max_context_limit) {
        /* F-7 (rkllama#60, #64). */
        diag("E rkllm: max_context[%d] must be less than the model's max_context_limit[%d]", param->max_context_len,
             max_context_limit);
        diag("E rkllm: rkllm_init failed");
        result = -1;
    }
#endif
    else if (strcmp(json_get_string(faults, "init", ""), "npu_malloc") == 0 &&
             !(json_get(faults, "fixed_by_base_domain_id") &&
               param->extend_param.base_domain_id == (int)json_get_number(faults, "fixed_by_base_domain_id", -1))) {
        /* F-1: the IOMMU mapping of a weight buffer fails (gemma-2-9b-it model card, rknn-llm#139, #232). */
        long long bytes = (long long)json_get_number(faults, "npu_malloc_size", 232128512);
        rknn_error("failed to allocate handle, ret: -1, errno: 14, errstr: Bad address");
        rknn_error("failed to malloc npu memory, size: %lld, flags: 0x2", bytes);
        rknn_error("load model file error!");
#if RKEDGE_ABI == 110
        diag("rknn_init fail! ret=-1");
        broken = 1; /* 1.1.x returns 0 here; the handle cannot run */
#else
        diag("E rkllm: rkllm_init failed");
        result = -1;
#endif
    }

#if ABI_AT_LEAST(130)
    /* 1.3.0 models may be exported without their tokenizer or embedding (toolkit export_rkllm(export_tokenizer=,
     * export_embedding=)); the client then supplies them through RKLLMCallback (SEMANTICS.md call flow 2). A
     * simulated model says so with "export_tokenizer": false / "export_embedding": false.
     * UNKNOWN (stand-in choice): what the vendor runtime does when such a model gets no callback; here init fails. */
    if (result == 0) {
        json_value *tok = json_get(manifest, "export_tokenizer"), *emb = json_get(manifest, "export_embedding");
        int no_tokenizer = tok && tok->type == JSON_BOOL && !tok->boolean && !(callback && callback->tokenizer_callback);
        int no_embedding = emb && emb->type == JSON_BOOL && !emb->boolean && !(callback && callback->embed_callback);
        if (no_tokenizer || no_embedding) {
            diag("E rkllm: [rkedge simulator] the model was exported without its %s and no %s callback is set",
                 no_tokenizer ? "tokenizer" : "embedding", no_tokenizer ? "tokenizer" : "embedding");
            diag("E rkllm: rkllm_init failed");
            result = -1;
        }
    }
#endif
    if (result != 0) {
        json_free(owned_faults);
        json_free(manifest);
        return result;
    }

    mock_handle *h = calloc(1, sizeof(mock_handle));
    h->magic = HANDLE_MAGIC;
    pthread_mutex_init(&h->lock, NULL);
    pthread_cond_init(&h->wake, NULL);
    h->manifest = manifest;
    h->model_path = strdup(param->model_path);
    h->model_id = json_get_string(manifest, "model_id", "unknown");
    h->toolkit_version = toolkit;
    h->platform = platform;
    h->dtype = json_get_string(manifest, "dtype", "w8a8");
    h->max_context_limit = max_context_limit;
    h->vocab_size = (int)json_get_number(manifest, "vocab_size", 32000);
    h->hidden_size = (int)json_get_number(manifest, "hidden_size", 64);
    h->npu_cores = (int)json_get_number(manifest, "npu_cores", 3);
    h->memory_mb = json_get_number(manifest, "memory_mb", 512);
    load_run_faults(h, faults);
    h->broken = broken;
    h->garbage = garbage;
    json_free(owned_faults);
    apply_pace(h);
    h->param = *param;
    h->param.model_path = h->model_path;
    json_value *tpl = json_get(manifest, "chat_template");
    h->tpl_system = xstrdup(json_get_string(tpl, "system_prompt", ""));
    h->tpl_prefix = xstrdup(json_get_string(tpl, "prompt_prefix", ""));
    h->tpl_postfix = xstrdup(json_get_string(tpl, "prompt_postfix", ""));
#if ABI_AT_LEAST(130)
    if (callback) {
        h->callback = callback->result_callback;
        h->callback_userdata = callback->result_userdata;
        h->tokenizer_callback = callback->tokenizer_callback;
        h->tokenizer_userdata = callback->tokenizer_userdata;
        h->embed_callback = callback->embed_callback;
        h->embed_userdata = callback->embed_userdata;
        strbuf b = {0};
        sb_printf(&b, "\"tokenizer_callback\":%s,\"embed_callback\":%s",
                  callback->tokenizer_callback ? "true" : "false", callback->embed_callback ? "true" : "false");
        call_log("rkllm_init.callbacks", &b);
        free(b.data);
    }
#else
    h->callback = callback;
    h->img_start = xstrdup(param->img_start);
    h->img_end = xstrdup(param->img_end);
    h->img_content = xstrdup(param->img_content);
    h->param.img_start = h->img_start;
    h->param.img_end = h->img_end;
    h->param.img_content = h->img_content;
#endif
#if ABI_AT_LEAST(120)
    diag("I rkllm: rkllm-toolkit version: %s, max_context_limit: %d, npu_core_num: %d, target_platform: %s, "
         "model_dtype: %s",
         toolkit, max_context_limit, h->npu_cores, model_platform, dtype);
#endif
    *handle = h;
    return 0;
}

static void join_previous_run(mock_handle *h) {
    if (h->thread_joinable) {
        pthread_join(h->thread, NULL);
        h->thread_joinable = 0;
    }
}

/* ---- multimodal input ---------------------------------------------------------------------------------- */

static size_t count_occurrences(const char *text, const char *tag) {
    size_t n = 0, len = strlen(tag);
    for (const char *at = text ? strstr(text, tag) : NULL; at; at = strstr(at + len, tag)) n++;
    return n;
}

/*
 * Checks one kind of media (image, video, audio) of a multimodal input and logs what was seen under `kind`.
 * The embedding holds items x rows_per_item x hidden_size floats (ABI.md; rows = image tokens, frames x frame
 * tokens, audio tokens); the stand-in reads all of them, so a short buffer is a read past its end, as on the
 * board. Returns 0, or -1 with the reason in `why`.
 * Prompt tags: public multimodal demos put one placeholder per item in the prompt ("<image>", and the 1.3.1
 * demo "<audio>", ABI.md "Hazard"); the runtime expands it with the start/content/end tags (per init up to
 * 1.2.3, per input from 1.3.0).
 * UNKNOWN (stand-in choices): what the vendor runtime does with a mismatch (count of placeholders, an empty
 * embedding, no content tag, a token count the model's encoder does not give): here the run is refused,
 * with a text marked as the simulator's own; "<video>" as the video placeholder.
 */
static int check_media(mock_handle *h, strbuf *log, const char *kind, const char *placeholder, const char *prompt,
                       const float *embed, size_t items, size_t rows_per_item, const char *start, const char *end,
                       const char *content, int expected_rows, int *positions, char *why, size_t why_cap) {
    size_t tags = count_occurrences(prompt, placeholder);
    size_t floats = items * rows_per_item * (size_t)h->hidden_size;
    int rc = 0;
    if (tags != items) {
        snprintf(why, why_cap, "the prompt holds %zu %s placeholders for %zu %s(s)", tags, placeholder, items, kind);
        rc = -1;
    } else if (items && (!embed || rows_per_item == 0)) {
        snprintf(why, why_cap, "the %s embedding is empty", kind);
        rc = -1;
    } else if (items && (!content || !*content)) {
        snprintf(why, why_cap, "no %s content tag is set", kind);
        rc = -1;
    } else if (items && expected_rows > 0 && rows_per_item != (size_t)expected_rows) {
        snprintf(why, why_cap, "%zu %s rows per item, the model's encoder gives %d", rows_per_item, kind,
                 expected_rows);
        rc = -1;
    }
    double sum = 0;
    float last = 0;
    if (rc == 0 && floats) {
        for (size_t i = 0; i < floats; i++) sum += embed[i];
        last = embed[floats - 1];
        *positions += (int)(items * rows_per_item);
    }
    sb_printf(log, ",\"%s\":{\"items\":%zu,\"rows_per_item\":%zu,\"embed_floats\":%zu,\"embed_sum\":%.6g,"
                   "\"embed_last\":%.6g,\"tags_in_prompt\":%zu", kind, items, rows_per_item, floats, sum, (double)last,
              tags);
    sb_field(log, "start", start);
    sb_field(log, "end", end);
    sb_field(log, "content", content);
    sb_puts(log, "}");
    return rc;
}

/* Validates an RKLLM_INPUT_MULTIMODAL input and logs it ("multimodal_input"); returns the positions its media
 * add to the prompt (>= 0), or -1 when it is refused. */
static int validate_multimodal(mock_handle *h, const RKLLMMultiModalInput *mm) {
    json_value *expect = json_get(h->manifest, "multimodal"); /* optional: what the model's encoders give */
    char why[256] = "";
    int positions = 0, rc = 0;
    strbuf b = {0};
    sb_printf(&b, "\"hidden_size\":%d", h->hidden_size);
#if ABI_AT_LEAST(130)
    rc = check_media(h, &b, "image", "<image>", mm->prompt, mm->image.image_embed, mm->image.n_image,
                     mm->image.n_image_tokens, mm->image.image_start, mm->image.image_end, mm->image.image_content,
                     (int)json_get_number(expect, "image_tokens", 0), &positions, why, sizeof why);
    sb_printf(&b, ",\"image_width\":%zu,\"image_height\":%zu", mm->image.image_width, mm->image.image_height);
    if (rc == 0)
        rc = check_media(h, &b, "video", "<video>", mm->prompt, mm->video.video_embed, mm->video.n_video,
                         mm->video.n_frame_per_video * mm->video.n_frame_tokens, mm->video.video_start,
                         mm->video.video_end, mm->video.video_content,
                         (int)json_get_number(expect, "video_rows", 0), &positions, why, sizeof why);
#if ABI_AT_LEAST(131)
    if (rc == 0)
        rc = check_media(h, &b, "audio", "<audio>", mm->prompt, mm->audio.audio_embed, mm->audio.n_audio,
                         mm->audio.n_audio_tokens, mm->audio.audio_start, mm->audio.audio_end,
                         mm->audio.audio_content, (int)json_get_number(expect, "audio_tokens", 0), &positions, why,
                         sizeof why);
#endif
#else
#if ABI_AT_LEAST(121)
    size_t images = mm->n_image;
    sb_printf(&b, ",\"image_width\":%zu,\"image_height\":%zu", mm->image_width, mm->image_height);
#else
    size_t images = mm->n_image_tokens ? 1 : 0; /* no n_image before 1.2.1: one image per input */
#endif
    rc = check_media(h, &b, "image", "<image>", mm->prompt, mm->image_embed, images, mm->n_image_tokens,
                     h->img_start, h->img_end, h->img_content, (int)json_get_number(expect, "image_tokens", 0),
                     &positions, why, sizeof why);
#endif
    sb_printf(&b, ",\"accepted\":%s", rc == 0 ? "true" : "false");
    sb_field(&b, "reason", rc == 0 ? NULL : why);
    call_log("multimodal_input", &b);
    free(b.data);
    if (rc != 0) {
        diag("E rkllm: [rkedge simulator] multimodal input refused: %s", why);
        return -1;
    }
    return positions;
}

static int start_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata, int sync) {
    mock_handle *h = as_handle(handle);
    if (!h || !input) return -1;
    pthread_mutex_lock(&h->lock);
    if (h->running) {
        pthread_mutex_unlock(&h->lock);
        /* UNKNOWN (stand-in choice): the vendor text for a second run on a busy handle. */
        diag("E rkllm: a run is already in progress on this handle");
        return -1;
    }
    pthread_mutex_unlock(&h->lock);
    join_previous_run(h);

    run_job *job = &h->job;
    free(job->prompt.data);
    free(job->lora_name);
    free(job->prompt_cache_path);
    free(job->input_ids);
    memset(job, 0, sizeof *job);
    job->input_type = (int)input->input_type;
    job->mode = infer ? (int)infer->mode : RKLLM_INFER_GENERATE;
    job->max_new_tokens = h->param.max_new_tokens;
    job->userdata = userdata;
#if ABI_AT_LEAST(130)
    if (!job->userdata) job->userdata = h->callback_userdata;
#endif
#if ABI_AT_LEAST(120)
    job->keep_history = infer ? infer->keep_history : 0;
#endif
    if (infer && infer->lora_params && infer->lora_params->lora_adapter_name)
        job->lora_name = strdup(infer->lora_params->lora_adapter_name);
    if (infer && infer->prompt_cache_params) {
        job->save_prompt_cache = infer->prompt_cache_params->save_prompt_cache;
        job->prompt_cache_path = xstrdup(infer->prompt_cache_params->prompt_cache_path);
    }
#if ABI_AT_LEAST(130)
    if (infer && infer->max_new_tokens > 0) job->max_new_tokens = infer->max_new_tokens;
#endif
    if (job->lora_name) {
        int found = 0;
        for (int i = 0; i < h->n_loras; i++) found |= strcmp(h->loras[i].name, job->lora_name) == 0;
        if (!found) {
            /* UNKNOWN (stand-in choice): the vendor text for selecting an adapter that was never loaded. */
            diag("E rkllm: lora adapter '%s' is not loaded", job->lora_name);
            return -1;
        }
    }

    const char *text = NULL;
    int extra_tokens = 0;
    switch (input->input_type) {
    case RKLLM_INPUT_PROMPT: text = input->prompt_input; break;
    case RKLLM_INPUT_TOKEN:
        extra_tokens = (int)input->token_input.n_tokens;
        if (input->token_input.input_ids && extra_tokens > 0) {
            job->input_ids = malloc(sizeof(int32_t) * (size_t)extra_tokens);
            memcpy(job->input_ids, input->token_input.input_ids, sizeof(int32_t) * (size_t)extra_tokens);
            job->n_input_ids = extra_tokens;
        }
        break;
    case RKLLM_INPUT_EMBED: extra_tokens = (int)input->embed_input.n_tokens; break;
    case RKLLM_INPUT_MULTIMODAL: text = input->multimodal_input.prompt; break;
    default: diag("E rkllm: unsupported input_type %d", (int)input->input_type); return -1;
    }
    if ((input->input_type == RKLLM_INPUT_PROMPT || input->input_type == RKLLM_INPUT_MULTIMODAL) && !text) {
        diag("E rkllm: prompt is NULL");
        return -1;
    }
    if (input->input_type == RKLLM_INPUT_MULTIMODAL) {
        /* Image, video and audio rows take positions like tokens (UNKNOWN: whether the tags take any more). */
        extra_tokens = validate_multimodal(h, &input->multimodal_input);
        if (extra_tokens < 0) return -1;
    }
    job->extra_tokens = extra_tokens;
    if (h->paused) h->paused = 0; /* a run after a pause resumes on the kept cache */
    {
        json_value *owned = NULL;
        load_run_faults(h, effective_faults(h->manifest, &owned));
        json_free(owned);
        apply_pace(h); /* $RKEDGE_MOCK_PACE, like the faults, is read again at every run */
    }
    if (text) {
#if ABI_AT_LEAST(120)
        /* From 1.2.0 the runtime wraps text input in the model's chat template (SEMANTICS.md); the system
         * prompt goes only in front of an empty cache. */
        if (input->input_type == RKLLM_INPUT_PROMPT) {
            if (h->kv_tokens == 0 && h->tpl_system) sb_puts(&job->prompt, h->tpl_system);
            if (h->tpl_prefix) sb_puts(&job->prompt, h->tpl_prefix);
            sb_puts(&job->prompt, text);
            if (h->tpl_postfix) sb_puts(&job->prompt, h->tpl_postfix);
        } else {
            sb_puts(&job->prompt, text);
        }
#else
        sb_puts(&job->prompt, text);
#endif
        job->has_text = 1;
    }
    job->prompt_tokens = count_tokens(job->prompt.len) + extra_tokens;

    strbuf b = {0};
    sb_printf(&b, "\"sync\":%s,\"input_type\":%d,\"prompt\":", sync ? "true" : "false", (int)input->input_type);
    sb_json_string(&b, job->has_text ? job->prompt.data : NULL, job->prompt.len);
    sb_puts(&b, ",\"prompt_hex\":");
    sb_hex(&b, job->prompt.data ? job->prompt.data : "", job->prompt.len);
    sb_printf(&b, ",\"prompt_tokens\":%d,\"kv_tokens_before\":%d,\"mode\":%d,\"keep_history\":%d,\"max_new_tokens\":%d",
              job->prompt_tokens, h->kv_tokens, job->mode, job->keep_history, job->max_new_tokens);
    sb_puts(&b, ",\"lora\":");
    sb_json_string(&b, job->lora_name, job->lora_name ? strlen(job->lora_name) : 0);
    sb_printf(&b, ",\"save_prompt_cache\":%d,\"userdata\":%llu", job->save_prompt_cache,
              (unsigned long long)(uintptr_t)job->userdata);
    if (input->input_type == RKLLM_INPUT_TOKEN && input->token_input.input_ids) {
        sb_puts(&b, ",\"token_ids\":[");
        for (size_t i = 0; i < input->token_input.n_tokens; i++)
            sb_printf(&b, "%s%d", i ? "," : "", input->token_input.input_ids[i]);
        sb_puts(&b, "]");
    }
#if ABI_AT_LEAST(121)
    sb_puts(&b, ",\"role\":");
    sb_json_string(&b, input->role, input->role ? strlen(input->role) : 0);
    sb_printf(&b, ",\"enable_thinking\":%s", input->enable_thinking ? "true" : "false");
#endif
#if ABI_AT_LEAST(130)
    if (infer && infer->sampling_params) {
        RKLLMSamplingParam *s = infer->sampling_params;
        sb_printf(&b, ",\"sampling\":{\"top_k\":%d,\"top_p\":%g,\"temperature\":%g,\"repeat_penalty\":%g,"
                      "\"frequency_penalty\":%g,\"presence_penalty\":%g,\"mirostat\":%d,\"mirostat_tau\":%g,"
                      "\"mirostat_eta\":%g}",
                  s->top_k, s->top_p, s->temperature, s->repeat_penalty, s->frequency_penalty, s->presence_penalty,
                  s->mirostat, s->mirostat_tau, s->mirostat_eta);
    } else {
        sb_puts(&b, ",\"sampling\":null");
    }
#endif
    call_log(sync ? "rkllm_run" : "rkllm_run_async", &b);
    free(b.data);

    pthread_mutex_lock(&h->lock);
    h->abort_requested = 0;
    h->running = 1;
    pthread_mutex_unlock(&h->lock);
    if (pthread_create(&h->thread, NULL, generation_main, h) != 0) {
        h->running = 0;
        return -1;
    }
    h->thread_joinable = 1;
    if (!sync) return 0;
    void *ret = NULL;
    pthread_join(h->thread, &ret);
    h->thread_joinable = 0;
    return (int)(intptr_t)ret;
}

RKLLM_API int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                        void *userdata) {
    return start_run(handle, rkllm_input, rkllm_infer_params, userdata, 1);
}

RKLLM_API int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                              void *userdata) {
    return start_run(handle, rkllm_input, rkllm_infer_params, userdata, 0);
}

static void request_abort(mock_handle *h) {
    pthread_mutex_lock(&h->lock);
    h->abort_requested = 1;
    pthread_cond_broadcast(&h->wake);
    pthread_mutex_unlock(&h->lock);
}

RKLLM_API int rkllm_abort(LLMHandle handle) {
    mock_handle *h = as_handle(handle);
    if (!h) return -1;
    call_log("rkllm_abort", NULL);
    request_abort(h);
    return 0;
}

RKLLM_API int rkllm_is_running(LLMHandle handle) {
    mock_handle *h = as_handle(handle);
    if (!h) return -1;
    pthread_mutex_lock(&h->lock);
    int running = h->running;
    pthread_mutex_unlock(&h->lock);
#if ABI_AT_LEAST(130)
    return running ? 1 : 0; /* 1.3.0 header: "1 if a task is running" */
#else
    return running ? 0 : 1; /* 1.1-1.2.3 headers: "0 if a task is running, non-zero otherwise" */
#endif
}

RKLLM_API int rkllm_destroy(LLMHandle handle) {
    mock_handle *h = as_handle(handle);
    if (!h) return -1;
    call_log("rkllm_destroy", NULL);
    request_abort(h);
    join_previous_run(h);
    h->magic = 0;
    for (int i = 0; i < h->n_loras; i++) {
        free(h->loras[i].name);
        free(h->loras[i].path);
    }
    free(h->job.prompt.data);
    free(h->job.lora_name);
    free(h->job.prompt_cache_path);
    free(h->job.input_ids);
#if !ABI_AT_LEAST(130)
    free(h->img_start);
    free(h->img_end);
    free(h->img_content);
#endif
    free(h->tpl_system);
    free(h->tpl_prefix);
    free(h->tpl_postfix);
    free(h->output_buffer);
    free(h->model_path);
    json_free(h->manifest);
    pthread_mutex_destroy(&h->lock);
    pthread_cond_destroy(&h->wake);
    free(h);
    return 0;
}

/* Reads a simulated side file (adapter or prompt cache) and checks it belongs to this model. */
static json_value *read_side_file(mock_handle *h, const char *path, const char *magic, const char *what) {
    if (!path) {
        diag("E rkllm: %s path is NULL", what);
        return NULL;
    }
    size_t size = 0;
    char *data = read_file(path, &size);
    if (!data) {
        diag("E rkllm: failed to open %s file %s", what, path);
        return NULL;
    }
    size_t n = strlen(magic);
    json_value *doc = (size >= n && memcmp(data, magic, n) == 0) ? json_parse(data + n) : NULL;
    free(data);
    if (!doc) {
        /* UNKNOWN (stand-in choice): the vendor text for an unreadable adapter or cache file. */
        diag("E rkllm: invalid %s file %s", what, path);
        return NULL;
    }
    const char *model = json_get_string(doc, "model_id", json_get_string(doc, "base_model_id", ""));
    if (strcmp(model, h->model_id) != 0) {
        diag("E rkllm: the %s %s was made for another model", what, path);
        json_free(doc);
        return NULL;
    }
    return doc;
}

RKLLM_API int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter) {
    mock_handle *h = as_handle(handle);
    if (!h || !lora_adapter) return -1;
    strbuf b = {0};
    sb_field(&b, "path", lora_adapter->lora_adapter_path);
    sb_field(&b, "name", lora_adapter->lora_adapter_name);
    sb_printf(&b, ",\"scale\":%g", lora_adapter->scale);
    call_log("rkllm_load_lora", &b);
    free(b.data);
    json_value *doc = read_side_file(h, lora_adapter->lora_adapter_path, SIM_LORA_MAGIC, "lora adapter");
    if (!doc) return -1;
    json_free(doc);
    if (!lora_adapter->lora_adapter_name || h->n_loras >= 16) return -1;
    for (int i = 0; i < h->n_loras; i++) {
        if (strcmp(h->loras[i].name, lora_adapter->lora_adapter_name) == 0) {
            h->loras[i].scale = lora_adapter->scale;
            return 0;
        }
    }
    lora_slot *slot = &h->loras[h->n_loras++];
    slot->name = strdup(lora_adapter->lora_adapter_name);
    slot->path = strdup(lora_adapter->lora_adapter_path);
    slot->scale = lora_adapter->scale;
    return 0;
}

RKLLM_API int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path) {
    mock_handle *h = as_handle(handle);
    if (!h) return -1;
    call_log_simple("rkllm_load_prompt_cache", "path", prompt_cache_path);
    json_value *doc = read_side_file(h, prompt_cache_path, SIM_CACHE_MAGIC, "prompt cache");
    if (!doc) return -1;
    pthread_mutex_lock(&h->lock);
    h->kv_tokens = (int)json_get_number(doc, "tokens", 0);
    pthread_mutex_unlock(&h->lock);
    json_free(doc);
    return 0;
}

RKLLM_API int rkllm_release_prompt_cache(LLMHandle handle) {
    mock_handle *h = as_handle(handle);
    if (!h) return -1;
    call_log("rkllm_release_prompt_cache", NULL);
    pthread_mutex_lock(&h->lock);
    h->kv_tokens = 0;
    pthread_mutex_unlock(&h->lock);
    return 0;
}

#if ABI_AT_LEAST(120)
static int clear_cache(mock_handle *h, int keep_system_prompt, int *start_pos, int *end_pos) {
    pthread_mutex_lock(&h->lock);
    int rc = 0;
    if (h->running) {
        rc = -1;
    } else if (start_pos && end_pos) {
        /* Range clears are valid only while paused with keep_history == 0 (SEMANTICS.md). */
        if (!h->paused || h->job.keep_history) {
            rc = -1;
        } else if (start_pos[0] < 0 || end_pos[0] < start_pos[0] || end_pos[0] > h->kv_tokens) {
            rc = -1;
        } else {
            h->kv_tokens -= end_pos[0] - start_pos[0];
        }
    } else {
        int system_tokens = system_prompt_tokens(h);
        h->kv_tokens = (keep_system_prompt && h->kv_tokens >= system_tokens) ? system_tokens : 0;
        h->paused = 0;
    }
    pthread_mutex_unlock(&h->lock);
    strbuf b = {0};
    sb_printf(&b, "\"keep_system_prompt\":%d,\"range\":%s,\"rc\":%d", keep_system_prompt,
              (start_pos && end_pos) ? "true" : "false", rc);
    call_log("rkllm_clear_kv_cache", &b);
    free(b.data);
    return rc;
}
#endif

#if ABI_AT_LEAST(121)
RKLLM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    mock_handle *h = as_handle(handle);
    return h ? clear_cache(h, keep_system_prompt, start_pos, end_pos) : -1;
}

RKLLM_API int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    mock_handle *h = as_handle(handle);
    if (!h || !cache_sizes) return -1;
    pthread_mutex_lock(&h->lock);
    int batches = h->param.extend_param.n_batch > 0 ? h->param.extend_param.n_batch : 1;
    for (int i = 0; i < batches; i++) cache_sizes[i] = h->kv_tokens;
    pthread_mutex_unlock(&h->lock);
    return 0;
}

RKLLM_API int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                       const char *tool_response_str) {
    mock_handle *h = as_handle(handle);
    if (!h) return -1;
    strbuf b = {0};
    sb_field(&b, "system_prompt", system_prompt);
    sb_field(&b, "tools", tools);
    sb_field(&b, "tool_response_str", tool_response_str);
    call_log("rkllm_set_function_tools", &b);
    free(b.data);
    /* Reported: the tools' system prompt replaces the model's (rknn-llm#431). */
    if (system_prompt) {
        free(h->tpl_system);
        h->tpl_system = strdup(system_prompt);
    }
    return 0;
}

RKLLM_API int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params) {
    mock_handle *h = as_handle(handle);
    if (!h || !cross_attn_params) return -1;
    strbuf b = {0};
    sb_printf(&b, "\"num_tokens\":%d", cross_attn_params->num_tokens);
    call_log("rkllm_set_cross_attn_params", &b);
    free(b.data);
    return 0;
}
#elif ABI_AT_LEAST(120)
RKLLM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt) {
    mock_handle *h = as_handle(handle);
    return h ? clear_cache(h, keep_system_prompt, NULL, NULL) : -1;
}
#endif

#if ABI_AT_LEAST(120)
RKLLM_API int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                                      const char *prompt_postfix) {
    mock_handle *h = as_handle(handle);
    if (!h) return -1;
    strbuf b = {0};
    sb_field(&b, "system_prompt", system_prompt);
    sb_field(&b, "prompt_prefix", prompt_prefix);
    sb_field(&b, "prompt_postfix", prompt_postfix);
    call_log("rkllm_set_chat_template", &b);
    free(b.data);
    pthread_mutex_lock(&h->lock);
    free(h->tpl_system);
    free(h->tpl_prefix);
    free(h->tpl_postfix);
    h->tpl_system = xstrdup(system_prompt ? system_prompt : "");
    h->tpl_prefix = xstrdup(prompt_prefix ? prompt_prefix : "");
    h->tpl_postfix = xstrdup(prompt_postfix ? prompt_postfix : "");
    h->kv_tokens = 0; /* reported: setting a template clears the KV cache (rknn-llm#377) */
    pthread_mutex_unlock(&h->lock);
    return 0;
}
#endif
