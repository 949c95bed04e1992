/*
 * A small JSON reader for the simulated NPU: it reads the manifest of a simulated model, adapter or
 * prompt cache (objects, arrays, strings with escapes, numbers, booleans, null). Not a general library:
 * inputs are files we write ourselves, and anything malformed is rejected as a whole.
 */
#ifndef RKEDGE_JSON_MINI_H
#define RKEDGE_JSON_MINI_H

#include <stdlib.h>
#include <string.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_type;

typedef struct json_value {
    json_type type;
    double number;
    int boolean;
    char *string; /* JSON_STRING: NUL-terminated UTF-8 */
    int length;   /* JSON_ARRAY / JSON_OBJECT: number of items */
    char **keys;  /* JSON_OBJECT */
    struct json_value **items;
} json_value;

static void json_free(json_value *v) {
    if (!v) return;
    free(v->string);
    for (int i = 0; i < v->length; i++) {
        if (v->keys) free(v->keys[i]);
        json_free(v->items[i]);
    }
    free(v->keys);
    free(v->items);
    free(v);
}

static void json_skip_ws(const char **p) {
    while (**p == ' ' || **p == '\t' || **p == '\n' || **p == '\r') (*p)++;
}

static int json_append_utf8(char *out, unsigned cp) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F)); return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18)); out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F)); return 4;
}

static int json_hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static char *json_parse_string_raw(const char **p) {
    if (**p != '"') return NULL;
    (*p)++;
    size_t cap = 64, len = 0;
    char *out = malloc(cap);
    while (**p && **p != '"') {
        if (len + 8 >= cap) { cap *= 2; out = realloc(out, cap); }
        char c = *(*p)++;
        if (c != '\\') { out[len++] = c; continue; }
        char e = *(*p)++;
        switch (e) {
        case '"': out[len++] = '"'; break;
        case '\\': out[len++] = '\\'; break;
        case '/': out[len++] = '/'; break;
        case 'b': out[len++] = '\b'; break;
        case 'f': out[len++] = '\f'; break;
        case 'n': out[len++] = '\n'; break;
        case 'r': out[len++] = '\r'; break;
        case 't': out[len++] = '\t'; break;
        case 'u': {
            unsigned cp;
            if (json_hex4(*p, &cp)) { free(out); return NULL; }
            *p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF && (*p)[0] == '\\' && (*p)[1] == 'u') {
                unsigned low;
                if (json_hex4(*p + 2, &low) == 0 && low >= 0xDC00 && low <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    *p += 6;
                }
            }
            len += (size_t)json_append_utf8(out + len, cp);
            break;
        }
        default: free(out); return NULL;
        }
    }
    if (**p != '"') { free(out); return NULL; }
    (*p)++;
    out[len] = 0;
    return out;
}

static json_value *json_new(json_type type) {
    json_value *v = calloc(1, sizeof(json_value));
    v->type = type;
    return v;
}

static json_value *json_parse_value(const char **p, int depth);

static int json_push(json_value *container, char *key, json_value *item) {
    container->items = realloc(container->items, sizeof(json_value *) * (size_t)(container->length + 1));
    if (container->type == JSON_OBJECT) {
        container->keys = realloc(container->keys, sizeof(char *) * (size_t)(container->length + 1));
        container->keys[container->length] = key;
    }
    container->items[container->length++] = item;
    return 0;
}

static json_value *json_parse_value(const char **p, int depth) {
    if (depth > 64) return NULL;
    json_skip_ws(p);
    char c = **p;
    if (c == '{' || c == '[') {
        int is_object = c == '{';
        json_value *v = json_new(is_object ? JSON_OBJECT : JSON_ARRAY);
        (*p)++;
        json_skip_ws(p);
        if (**p == (is_object ? '}' : ']')) { (*p)++; return v; }
        for (;;) {
            char *key = NULL;
            if (is_object) {
                json_skip_ws(p);
                key = json_parse_string_raw(p);
                json_skip_ws(p);
                if (!key || **p != ':') { free(key); json_free(v); return NULL; }
                (*p)++;
            }
            json_value *item = json_parse_value(p, depth + 1);
            if (!item) { free(key); json_free(v); return NULL; }
            json_push(v, key, item);
            json_skip_ws(p);
            if (**p == ',') { (*p)++; continue; }
            if (**p == (is_object ? '}' : ']')) { (*p)++; return v; }
            json_free(v);
            return NULL;
        }
    }
    if (c == '"') {
        char *s = json_parse_string_raw(p);
        if (!s) return NULL;
        json_value *v = json_new(JSON_STRING);
        v->string = s;
        return v;
    }
    if (strncmp(*p, "true", 4) == 0) { *p += 4; json_value *v = json_new(JSON_BOOL); v->boolean = 1; return v; }
    if (strncmp(*p, "false", 5) == 0) { *p += 5; return json_new(JSON_BOOL); }
    if (strncmp(*p, "null", 4) == 0) { *p += 4; return json_new(JSON_NULL); }
    if (c == '-' || (c >= '0' && c <= '9')) {
        char *end;
        double d = strtod(*p, &end);
        if (end == *p) return NULL;
        *p = end;
        json_value *v = json_new(JSON_NUMBER);
        v->number = d;
        return v;
    }
    return NULL;
}

/* Parses a whole document; trailing whitespace is allowed, anything else is an error. */
static json_value *json_parse(const char *text) {
    const char *p = text;
    json_value *v = json_parse_value(&p, 0);
    if (!v) return NULL;
    json_skip_ws(&p);
    if (*p) { json_free(v); return NULL; }
    return v;
}

static json_value *json_get(const json_value *object, const char *key) {
    if (!object || object->type != JSON_OBJECT) return NULL;
    for (int i = 0; i < object->length; i++)
        if (strcmp(object->keys[i], key) == 0) return object->items[i];
    return NULL;
}

static const char *json_get_string(const json_value *object, const char *key, const char *fallback) {
    json_value *v = json_get(object, key);
    return (v && v->type == JSON_STRING) ? v->string : fallback;
}

static double json_get_number(const json_value *object, const char *key, double fallback) {
    json_value *v = json_get(object, key);
    if (v && v->type == JSON_NUMBER) return v->number;
    if (v && v->type == JSON_BOOL) return v->boolean;
    return fallback;
}

#endif /* RKEDGE_JSON_MINI_H */
