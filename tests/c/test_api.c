/* test_api.c: every function of libphi3's C API, on success and on each error path.
 *
 * Models: the built-in demo model (random weights, has a tokenizer) for text and generation, and
 * the fixture folder tests/fixtures/gqa-longrope-bf16 (vocab 384, max context 64, no tokenizer)
 * for token and logits tests. Paths are relative to the repository root (the runner cds there).
 * Run under ASan/UBSan with LeakSanitizer on, so every handle must be freed. */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "check.h"

#define FIXTURE "tests/fixtures/gqa-longrope-bf16"
#define FIXTURE_VOCAB 384
#define FIXTURE_MAX_CONTEXT 64

/* A pointer value that must never be dereferenced (fields past an older struct_size). */
#define POISON_PTR ((void *)(uintptr_t)0x10)


/* ---- helpers ---------------------------------------------------------------------------- */


static phi3_model *load_demo(void)
{
    phi3_model *m = NULL;
    CHECK_OK(phi3_model_load_demo(NULL, &m));
    CHECK(m != NULL);
    return m;
}

/* The demo model shared by the tests that do not free it (loading it costs a little). */
static phi3_model *g_demo;

static phi3_model *shared_demo(void)
{
    if (!g_demo)
        g_demo = load_demo();
    return g_demo;
}

static phi3_model *load_fixture(void)
{
    phi3_model *m = NULL;
    CHECK_OK(phi3_model_load(FIXTURE, NULL, &m));
    CHECK(m != NULL);
    return m;
}

static phi3_session *new_session(phi3_model *m)
{
    phi3_session *s = NULL;
    CHECK_OK(phi3_session_new(m, NULL, &s));
    CHECK(s != NULL);
    return s;
}

static phi3_session *new_session_ctx(phi3_model *m, size_t max_context)
{
    phi3_session_options o;
    phi3_session *s = NULL;
    phi3_session_options_init(&o);
    o.max_context = max_context;
    CHECK_OK(phi3_session_new(m, &o, &s));
    CHECK(s != NULL);
    return s;
}


/* The logits after the session's last token (malloc'd, vocab floats). */
static float *session_logits(phi3_session *s, size_t vocab)
{
    size_t got = 0;
    float *l = xmalloc(vocab * sizeof *l);
    CHECK_OK(phi3_session_logits(s, l, vocab, &got));
    CHECK_EQ_SIZE(got, vocab);
    return l;
}

static float max_abs_diff(const float *a, const float *b, size_t n)
{
    float d = 0.0f;
    size_t i;
    for (i = 0; i < n; i++) {
        float e = fabsf(a[i] - b[i]);
        if (!(e <= d))
            d = e; /* also catches NaN */
    }
    return d;
}

static float max_abs(const float *a, size_t n)
{
    float d = 0.0f;
    size_t i;
    for (i = 0; i < n; i++)
        if (fabsf(a[i]) > d)
            d = fabsf(a[i]);
    return d;
}

/* Logits computed along different paths (one prefill vs incremental) agree to rounding. */
static void check_logits_close(const float *a, const float *b, size_t n)
{
    float scale = max_abs(a, n);
    float diff = max_abs_diff(a, b, n);
    CHECK_MSG(diff <= 1e-3f * (scale > 1.0f ? scale : 1.0f), "max |a - b| = %g (max |a| = %g)",
              (double)diff, (double)scale);
}

/* Text of `tokens` (malloc'd, NUL-terminated here whatever the library writes). */
static char *detokenize(const phi3_model *m, const int32_t *tokens, size_t n, size_t *len)
{
    size_t need = 0, got = 0;
    char *out;
    phi3_status st = phi3_detokenize(m, tokens, n, NULL, 0, &need);
    CHECK(st == PHI3_OK || st == PHI3_ERR_BUFFER_TOO_SMALL);
    out = xmalloc(need + 1);
    memset(out, 0, need + 1);
    CHECK_OK(phi3_detokenize(m, tokens, n, out, need, &got));
    CHECK_EQ_SIZE(got, need);
    out[need] = '\0';
    if (len)
        *len = strlen(out);
    return out;
}

static int32_t *tokenize(const phi3_model *m, const char *text, int32_t add_special, size_t *n)
{
    size_t need = 0, got = 0;
    int32_t *t;
    phi3_status st = phi3_tokenize(m, text, strlen(text), add_special, NULL, 0, &need);
    CHECK(st == PHI3_OK || st == PHI3_ERR_BUFFER_TOO_SMALL);
    t = xmalloc(need * sizeof *t);
    CHECK_OK(phi3_tokenize(m, text, strlen(text), add_special, t, need, &got));
    CHECK_EQ_SIZE(got, need);
    *n = got;
    return t;
}



/* What a generate callback saw. */
struct collect {
    char *text;
    size_t len, cap;
    int32_t *tokens;
    size_t n_tokens, cap_tokens;
    size_t n_final;       /* calls with token == -1 */
    size_t after_final;   /* calls after the token == -1 call (must stay 0) */
    size_t null_text;     /* calls with utf8 == NULL and len > 0 (must stay 0) */
    size_t stop_after;    /* return non-zero once this many tokens were seen (0: never) */
};

static int32_t collect_cb(void *user_data, const char *utf8, size_t len, int32_t token)
{
    struct collect *c = user_data;
    if (c->n_final > 0)
        c->after_final++;
    if (len > 0 && utf8 == NULL) {
        c->null_text++;
        return 1;
    }
    if (len > 0) {
        if (c->len + len + 1 > c->cap) {
            c->cap = (c->len + len + 1) * 2;
            c->text = realloc(c->text, c->cap);
            CHECK(c->text != NULL);
        }
        memcpy(c->text + c->len, utf8, len);
        c->len += len;
        c->text[c->len] = '\0';
    }
    if (token == -1) {
        c->n_final++;
        return 0;
    }
    if (c->n_tokens == c->cap_tokens) {
        c->cap_tokens = c->cap_tokens ? c->cap_tokens * 2 : 64;
        c->tokens = realloc(c->tokens, c->cap_tokens * sizeof *c->tokens);
        CHECK(c->tokens != NULL);
    }
    c->tokens[c->n_tokens++] = token;
    return (c->stop_after != 0 && c->n_tokens >= c->stop_after) ? 1 : 0;
}

static void collect_free(struct collect *c)
{
    free(c->text);
    free(c->tokens);
    memset(c, 0, sizeof *c);
}

static void check_collect_sane(const struct collect *c)
{
    CHECK(c->after_final == 0);
    CHECK(c->null_text == 0);
    CHECK(c->n_final <= 1);
    CHECK(is_valid_utf8((const unsigned char *)c->text, c->len));
}

/* A path for a temporary file (the file is created; caller unlinks). */
static void temp_path(char *buf, size_t cap)
{
    const char *dir = getenv("TMPDIR");
    int fd;
    snprintf(buf, cap, "%s/phi3-c-test-XXXXXX", dir && dir[0] ? dir : "/tmp");
    fd = mkstemp(buf);
    CHECK(fd >= 0);
    close(fd);
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_versions(void)
{
    const char *v = phi3_version();
    CHECK(phi3_abi_version() == PHI3_ABI_VERSION);
    CHECK(v != NULL);
    CHECK_STREQ(v, "0.1.0");
    {
        char expect[64];
        snprintf(expect, sizeof expect, "%d.%d.%d", PHI3_VERSION_MAJOR, PHI3_VERSION_MINOR,
                 PHI3_VERSION_PATCH);
        CHECK_STREQ(v, expect);
    }
    /* Calls that are not status-returning still leave a valid (empty) last error. */
    CHECK(phi3_last_error() != NULL);
    CHECK_STREQ(phi3_last_error(), "");
}

static void test_status_str(void)
{
    static const char *const names[] = {
        "PHI3_OK",
        "PHI3_ERR_INVALID_ARGUMENT",
        "PHI3_ERR_IO",
        "PHI3_ERR_MODEL_FORMAT",
        "PHI3_ERR_TOKEN_OUT_OF_RANGE",
        "PHI3_ERR_CONTEXT_FULL",
        "PHI3_ERR_OUT_OF_MEMORY",
        "PHI3_ERR_DEVICE",
        "PHI3_ERR_CANCELLED",
        "PHI3_ERR_BUSY",
        "PHI3_ERR_BUFFER_TOO_SMALL",
        "PHI3_ERR_UNSUPPORTED",
        "PHI3_ERR_INTERNAL",
    };
    static const phi3_status codes[] = {
        PHI3_OK,
        PHI3_ERR_INVALID_ARGUMENT,
        PHI3_ERR_IO,
        PHI3_ERR_MODEL_FORMAT,
        PHI3_ERR_TOKEN_OUT_OF_RANGE,
        PHI3_ERR_CONTEXT_FULL,
        PHI3_ERR_OUT_OF_MEMORY,
        PHI3_ERR_DEVICE,
        PHI3_ERR_CANCELLED,
        PHI3_ERR_BUSY,
        PHI3_ERR_BUFFER_TOO_SMALL,
        PHI3_ERR_UNSUPPORTED,
        PHI3_ERR_INTERNAL,
    };
    const size_t n = sizeof codes / sizeof codes[0];
    size_t i, j;
    /* The numbers are part of the ABI and never change. */
    CHECK(PHI3_OK == 0);
    CHECK(PHI3_ERR_INVALID_ARGUMENT == 1);
    CHECK(PHI3_ERR_IO == 2);
    CHECK(PHI3_ERR_MODEL_FORMAT == 3);
    CHECK(PHI3_ERR_TOKEN_OUT_OF_RANGE == 4);
    CHECK(PHI3_ERR_CONTEXT_FULL == 5);
    CHECK(PHI3_ERR_OUT_OF_MEMORY == 6);
    CHECK(PHI3_ERR_DEVICE == 7);
    CHECK(PHI3_ERR_CANCELLED == 8);
    CHECK(PHI3_ERR_BUSY == 9);
    CHECK(PHI3_ERR_BUFFER_TOO_SMALL == 10);
    CHECK(PHI3_ERR_UNSUPPORTED == 11);
    CHECK(PHI3_ERR_INTERNAL == 12);
    CHECK(PHI3_FINISH_EOS == 0);
    CHECK(PHI3_FINISH_STOP_STRING == 1);
    CHECK(PHI3_FINISH_LENGTH == 2);
    CHECK(PHI3_FINISH_CALLBACK == 3);
    CHECK(PHI3_FINISH_CANCELLED == 4);
    for (i = 0; i < n; i++) {
        const char *s = phi3_status_str(codes[i]);
        CHECK_MSG(s != NULL && s[0] != '\0', "phi3_status_str(%d)", (int)codes[i]);
        CHECK_STREQ(s, names[i]);
        CHECK_MSG(s == phi3_status_str(codes[i]) || strcmp(s, phi3_status_str(codes[i])) == 0,
                  "phi3_status_str(%d) is not stable", (int)codes[i]);
        for (j = 0; j < i; j++)
            CHECK_MSG(strcmp(s, phi3_status_str(codes[j])) != 0,
                      "phi3_status_str(%d) == phi3_status_str(%d) == \"%s\"", (int)codes[i],
                      (int)codes[j], s);
    }
    /* Codes this library does not know still give a static string, never NULL. */
    CHECK_STREQ(phi3_status_str(-1), "PHI3_ERR_UNKNOWN");
    CHECK_STREQ(phi3_status_str(13), "PHI3_ERR_UNKNOWN");
    CHECK_STREQ(phi3_status_str(INT32_MAX), "PHI3_ERR_UNKNOWN");
    CHECK_STREQ(phi3_status_str(INT32_MIN), "PHI3_ERR_UNKNOWN");
}

static void test_free_null_and_init(void)
{
    phi3_model_options mo;
    phi3_session_options so;
    phi3_generate_options go;

    phi3_model_free(NULL);
    phi3_session_free(NULL);
    phi3_model_options_init(NULL);
    phi3_session_options_init(NULL);
    phi3_generate_options_init(NULL);

    memset(&mo, 0xAB, sizeof mo);
    phi3_model_options_init(&mo);
    CHECK(mo.struct_size == sizeof mo);
    CHECK(mo.device == NULL || strcmp(mo.device, "auto") == 0);
    CHECK(mo.max_context == 0);
    CHECK(mo.weights == NULL || strcmp(mo.weights, "native") == 0);

    memset(&so, 0xAB, sizeof so);
    phi3_session_options_init(&so);
    CHECK(so.struct_size == sizeof so);
    CHECK(so.max_context == 0);

    memset(&go, 0xAB, sizeof go);
    phi3_generate_options_init(&go);
    CHECK(go.struct_size == sizeof go);
    CHECK(go.max_tokens == 256);
    CHECK(go.temperature == 0.0f);
    CHECK(go.top_k == 0);
    CHECK(go.top_p == 1.0f);
    CHECK(go.min_p == 0.0f);
    CHECK(go.repetition_penalty == 1.0f);
    CHECK(go.presence_penalty == 0.0f);
    CHECK(go.frequency_penalty == 0.0f);
    CHECK(go.has_seed == 0);
    CHECK(go.stop == NULL);
    CHECK(go.n_stop == 0);
    CHECK(go.stop_token_ids == NULL);
    CHECK(go.n_stop_token_ids == 0);
}

static void test_model_load_errors(void)
{
    phi3_model *m = (phi3_model *)POISON_PTR;
    phi3_model_options o;

    CHECK_BAD_ARG(phi3_model_load(NULL, NULL, &m), "path");
    CHECK(m == (phi3_model *)POISON_PTR); /* out is written only on success */
    CHECK_BAD_ARG(phi3_model_load(FIXTURE, NULL, NULL), "out");
    CHECK_BAD_ARG(phi3_model_load_demo(NULL, NULL), "out");

    CHECK_ERR(phi3_model_load("tests/fixtures/does-not-exist", NULL, &m), PHI3_ERR_IO,
              "does-not-exist");
    CHECK(m == (phi3_model *)POISON_PTR);

    /* A folder that exists but holds no model. */
    {
        phi3_status st = phi3_model_load("tests/c", NULL, &m);
        CHECK_MSG(st == PHI3_ERR_IO || st == PHI3_ERR_MODEL_FORMAT, "returned %d (%s)", (int)st,
                  check_status_name(st));
        CHECK(phi3_last_error()[0] != '\0');
        CHECK(m == (phi3_model *)POISON_PTR);
    }

    /* A struct_size larger than the library knows. */
    phi3_model_options_init(&o);
    o.struct_size = (uint32_t)sizeof o + 8;
    CHECK_ERR(phi3_model_load(FIXTURE, &o, &m), PHI3_ERR_INVALID_ARGUMENT, "struct_size");
    CHECK_ERR(phi3_model_load_demo(&o, &m), PHI3_ERR_INVALID_ARGUMENT, "struct_size");
    CHECK(m == (phi3_model *)POISON_PTR);

    /* An unknown device name. */
    phi3_model_options_init(&o);
    o.device = "tpu";
    {
        phi3_status st = phi3_model_load_demo(&o, &m);
        CHECK_MSG(st == PHI3_ERR_INVALID_ARGUMENT || st == PHI3_ERR_UNSUPPORTED,
                  "device \"tpu\": returned %d (%s)", (int)st, check_status_name(st));
        CHECK(strstr(phi3_last_error(), "tpu") != NULL);
    }
    CHECK(m == (phi3_model *)POISON_PTR);
}

static void test_model_options(void)
{
    phi3_model_options o;
    phi3_model *m = NULL;

    /* Explicit defaults, device "cpu", and NULL device ("auto"). */
    phi3_model_options_init(&o);
    CHECK_OK(phi3_model_load(FIXTURE, &o, &m));
    CHECK_EQ_SIZE(phi3_model_max_context(m), FIXTURE_MAX_CONTEXT);
    phi3_model_free(m);

    phi3_model_options_init(&o);
    o.device = "cpu";
    o.max_context = 32;
    CHECK_OK(phi3_model_load(FIXTURE, &o, &m));
    CHECK_EQ_SIZE(phi3_model_max_context(m), 32);
    CHECK_EQ_SIZE(phi3_model_vocab_size(m), FIXTURE_VOCAB);
    phi3_model_free(m);

    phi3_model_options_init(&o);
    o.device = NULL;
    CHECK_OK(phi3_model_load_demo(&o, &m));
    phi3_model_free(m);

    /* An older, smaller struct: the fields past struct_size are garbage and must be ignored. */
    phi3_model_options_init(&o);
    o.struct_size = (uint32_t)offsetof(phi3_model_options, max_context);
    o.device = "cpu";
    o.max_context = 5;
    CHECK_OK(phi3_model_load(FIXTURE, &o, &m));
    CHECK_EQ_SIZE(phi3_model_max_context(m), FIXTURE_MAX_CONTEXT);
    phi3_model_free(m);

    phi3_model_options_init(&o);
    o.struct_size = (uint32_t)offsetof(phi3_model_options, device);
    o.device = (const char *)POISON_PTR;
    o.max_context = 5;
    CHECK_OK(phi3_model_load(FIXTURE, &o, &m));
    CHECK_EQ_SIZE(phi3_model_max_context(m), FIXTURE_MAX_CONTEXT);
    phi3_model_free(m);

    /* A size that ends inside a field (half of the device pointer) is no version's size. */
    phi3_model_options_init(&o);
    o.struct_size = (uint32_t)(offsetof(phi3_model_options, device) + 4);
    CHECK_ERR(phi3_model_load(FIXTURE, &o, &m), PHI3_ERR_INVALID_ARGUMENT, "struct_size");

    /* Quantized weights: int8 on the fixture runs; int4 is refused on it (its down_proj rows are
       112 wide, which no group size divides) and runs on the demo model. */
    phi3_model_options_init(&o);
    o.device = "cpu";
    o.weights = "int8";
    CHECK_OK(phi3_model_load(FIXTURE, &o, &m));
    {
        phi3_session *s = NULL;
        const int32_t tokens[3] = {1, 2, 3};
        float *l;
        size_t i;
        CHECK_OK(phi3_session_new(m, NULL, &s));
        CHECK_OK(phi3_session_append_tokens(s, tokens, 3));
        l = session_logits(s, FIXTURE_VOCAB);
        for (i = 0; i < FIXTURE_VOCAB; i++)
            CHECK(l[i] == l[i]); /* not NaN */
        free(l);
        phi3_session_free(s);
    }
    phi3_model_free(m);
    m = (phi3_model *)POISON_PTR;
    o.weights = "int4-g32";
    CHECK_ERR(phi3_model_load(FIXTURE, &o, &m), PHI3_ERR_INVALID_ARGUMENT, "down_proj");
    CHECK(m == (phi3_model *)POISON_PTR);
    o.weights = "int4";
    CHECK_OK(phi3_model_load_demo(&o, &m));
    phi3_model_free(m);
    m = (phi3_model *)POISON_PTR;
    o.weights = "int3";
    CHECK_ERR(phi3_model_load_demo(&o, &m), PHI3_ERR_INVALID_ARGUMENT, "int3");
    /* An already-quantized folder (AWQ int4-g32) loads as stored with "native" or its own
       format; another format would round twice and is refused. */
    o.weights = "int8";
    CHECK_ERR(phi3_model_load("tests/fixtures/quant/model-awq-g32", &o, &m),
              PHI3_ERR_INVALID_ARGUMENT, "already quantized");
    CHECK(m == (phi3_model *)POISON_PTR);
    o.weights = NULL;
    CHECK_OK(phi3_model_load("tests/fixtures/quant/model-awq-g32", &o, &m));
    phi3_model_free(m);
    m = (phi3_model *)POISON_PTR;

    /* A struct that ends before `weights` (an older header): garbage there is ignored. */
    phi3_model_options_init(&o);
    o.struct_size = (uint32_t)offsetof(phi3_model_options, weights);
    o.device = "cpu";
    o.weights = (const char *)POISON_PTR;
    CHECK_OK(phi3_model_load_demo(&o, &m));
    phi3_model_free(m);
}

static void test_model_getters(void)
{
    phi3_model *f = load_fixture();
    phi3_model *d = shared_demo();
    CHECK_EQ_SIZE(phi3_model_vocab_size(f), FIXTURE_VOCAB);
    CHECK_EQ_SIZE(phi3_model_max_context(f), FIXTURE_MAX_CONTEXT);
    CHECK(phi3_model_vocab_size(d) > 300);
    CHECK(phi3_model_vocab_size(d) % 64 == 0);
    CHECK(phi3_model_max_context(d) >= 1024);
    phi3_model_free(f);
}

static void test_tokenize(void)
{
    phi3_model *m = shared_demo();
    phi3_model *f = load_fixture();
    const char *text = "Hello world, the sun is bright";
    size_t n = 0, n_plain = 0, need = 0, got = 0, i;
    int32_t *with = tokenize(m, text, 1, &n);
    int32_t *plain = tokenize(m, text, 0, &n_plain);
    int32_t buf[64];

    CHECK(n_plain > 0);
    CHECK_EQ_SIZE(n, n_plain + 1); /* <s> */
    CHECK(with[0] == 1);
    CHECK(memcmp(with + 1, plain, n_plain * sizeof *plain) == 0);
    for (i = 0; i < n; i++)
        CHECK(with[i] >= 0 && (size_t)with[i] < phi3_model_vocab_size(m));

    /* Size query, then a buffer one too small: BUFFER_TOO_SMALL, the needed size, nothing
     * written; then the exact size succeeds. */
    need = 0;
    CHECK_ERR(phi3_tokenize(m, text, strlen(text), 0, NULL, 0, &need), PHI3_ERR_BUFFER_TOO_SMALL,
              NULL);
    CHECK_EQ_SIZE(need, n_plain);
    for (i = 0; i < 64; i++)
        buf[i] = -7;
    need = 0;
    CHECK_ERR(phi3_tokenize(m, text, strlen(text), 0, buf, n_plain - 1, &need),
              PHI3_ERR_BUFFER_TOO_SMALL, NULL);
    CHECK_EQ_SIZE(need, n_plain);
    for (i = 0; i < 64; i++)
        CHECK(buf[i] == -7);
    CHECK_OK(phi3_tokenize(m, text, strlen(text), 0, buf, n_plain, &got));
    CHECK_EQ_SIZE(got, n_plain);
    CHECK(memcmp(buf, plain, n_plain * sizeof *plain) == 0);
    /* A larger buffer: only out_len entries are written. */
    for (i = 0; i < 64; i++)
        buf[i] = -7;
    CHECK_OK(phi3_tokenize(m, text, strlen(text), 0, buf, 64, &got));
    CHECK_EQ_SIZE(got, n_plain);
    CHECK(buf[n_plain] == -7);

    /* (utf8, len) need not be NUL-terminated. */
    CHECK_OK(phi3_tokenize(m, "Hello world, the sun is brightXYZ", strlen(text), 0, buf, 64, &got));
    CHECK_EQ_SIZE(got, n_plain);
    CHECK(memcmp(buf, plain, n_plain * sizeof *plain) == 0);

    /* Multi-byte text round-trips. */
    {
        const char *mb = "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80!";
        size_t nm = 0, len = 0;
        int32_t *t = tokenize(m, mb, 0, &nm);
        char *back = detokenize(m, t, nm, &len);
        CHECK_STREQ(back, mb);
        free(back);
        free(t);
    }

    /* Errors. */
    CHECK_BAD_ARG(phi3_tokenize(NULL, text, strlen(text), 0, buf, 64, &got), "m");
    CHECK_BAD_ARG(phi3_tokenize(m, NULL, 5, 0, buf, 64, &got), "utf8");
    CHECK_BAD_ARG(phi3_tokenize(m, text, strlen(text), 0, NULL, 64, &got), "out");
    /* out_len is optional (the header: "NULL or writable"). */
    CHECK_OK(phi3_tokenize(m, text, strlen(text), 0, buf, 64, NULL));
    CHECK(memcmp(buf, plain, n_plain * sizeof *plain) == 0);
    CHECK_ERR(phi3_tokenize(m, text, strlen(text), 0, buf, 1, NULL), PHI3_ERR_BUFFER_TOO_SMALL,
              NULL);
    got = 12345;
    CHECK_ERR(phi3_tokenize(m, "ab\xff\xfe", 4, 0, buf, 64, &got), PHI3_ERR_INVALID_ARGUMENT,
              "UTF-8");
    CHECK_ERR(phi3_tokenize(m, "\xc3", 1, 0, buf, 64, &got), PHI3_ERR_INVALID_ARGUMENT, "UTF-8");
    CHECK_ERR(phi3_tokenize(f, text, strlen(text), 0, buf, 64, &got), PHI3_ERR_UNSUPPORTED, NULL);

    free(with);
    free(plain);
    phi3_model_free(f);
}

static void test_detokenize(void)
{
    phi3_model *m = shared_demo();
    phi3_model *f = load_fixture();
    const char *text = "Hello world, the sun is bright";
    size_t n = 0, need = 0, got = 0, len = 0, i;
    int32_t *t = tokenize(m, text, 0, &n);
    char *s = detokenize(m, t, n, &len);
    char buf[256];
    int32_t bad[2];

    CHECK_STREQ(s, text);
    need = 0;
    CHECK_ERR(phi3_detokenize(m, t, n, NULL, 0, &need), PHI3_ERR_BUFFER_TOO_SMALL, NULL);
    CHECK(need >= strlen(text)); /* = the text, or the text + NUL */
    memset(buf, 'Z', sizeof buf);
    {
        size_t need2 = 0;
        CHECK_ERR(phi3_detokenize(m, t, n, buf, need - 1, &need2), PHI3_ERR_BUFFER_TOO_SMALL,
                  NULL);
        CHECK_EQ_SIZE(need2, need);
    }
    for (i = 0; i < sizeof buf; i++)
        CHECK(buf[i] == 'Z');
    CHECK_OK(phi3_detokenize(m, t, n, buf, need, &got));
    CHECK_EQ_SIZE(got, need);
    CHECK(memcmp(buf, text, strlen(text)) == 0);

    /* Nothing to decode. */
    got = 99;
    CHECK_OK(phi3_detokenize(m, t, 0, buf, sizeof buf, &got));
    CHECK(got <= 1);

    /* Errors. */
    bad[0] = t[0];
    bad[1] = (int32_t)phi3_model_vocab_size(m) + 5;
    CHECK_ERR(phi3_detokenize(m, bad, 2, buf, sizeof buf, &got), PHI3_ERR_TOKEN_OUT_OF_RANGE,
              "tokens[1]");
    bad[1] = -3;
    CHECK_ERR(phi3_detokenize(m, bad, 2, buf, sizeof buf, &got), PHI3_ERR_TOKEN_OUT_OF_RANGE,
              "-3");
    CHECK_BAD_ARG(phi3_detokenize(NULL, t, n, buf, sizeof buf, &got), "m");
    CHECK_BAD_ARG(phi3_detokenize(m, NULL, n, buf, sizeof buf, &got), "tokens");
    CHECK_BAD_ARG(phi3_detokenize(m, t, n, NULL, sizeof buf, &got), "out");
    CHECK_OK(phi3_detokenize(m, t, n, buf, sizeof buf, NULL)); /* out_len is optional */
    CHECK(memcmp(buf, text, strlen(text)) == 0);
    CHECK_ERR(phi3_detokenize(f, t, n, buf, sizeof buf, &got), PHI3_ERR_UNSUPPORTED, NULL);

    free(s);
    free(t);
    phi3_model_free(f);
}

static void test_session_new_errors(void)
{
    phi3_model *m = load_fixture();
    phi3_session *s = (phi3_session *)POISON_PTR;
    phi3_session_options o;
    int32_t toks[10] = {1, 5, 6, 7, 8, 9, 10, 11, 12, 13};

    CHECK_BAD_ARG(phi3_session_new(NULL, NULL, &s), "m");
    CHECK_BAD_ARG(phi3_session_new(m, NULL, NULL), "out");
    phi3_session_options_init(&o);
    o.struct_size = (uint32_t)sizeof o + 4;
    CHECK_ERR(phi3_session_new(m, &o, &s), PHI3_ERR_INVALID_ARGUMENT, "struct_size");
    CHECK(s == (phi3_session *)POISON_PTR);

    /* Defaults: the model's max context. */
    phi3_session_options_init(&o);
    CHECK_OK(phi3_session_new(m, &o, &s));
    CHECK_EQ_SIZE(phi3_session_len(s), 0);
    phi3_session_free(s);

    /* An older struct: max_context (garbage 3) is ignored, so 10 tokens fit. */
    phi3_session_options_init(&o);
    o.struct_size = (uint32_t)offsetof(phi3_session_options, max_context);
    o.max_context = 3;
    CHECK_OK(phi3_session_new(m, &o, &s));
    CHECK_OK(phi3_session_append_tokens(s, toks, 10));
    CHECK_EQ_SIZE(phi3_session_len(s), 10);
    phi3_session_free(s);

    phi3_model_free(m);
}

static void test_append_errors(void)
{
    phi3_model *m = shared_demo();
    phi3_session *s = new_session(m);
    int32_t tok = 5;
    size_t len;

    CHECK_BAD_ARG(phi3_session_append_text(NULL, "hi", 2), "s");
    CHECK_BAD_ARG(phi3_session_append_text(s, NULL, 2), "utf8");
    CHECK_BAD_ARG(phi3_session_append_tokens(NULL, &tok, 1), "s");
    CHECK_BAD_ARG(phi3_session_append_tokens(s, NULL, 1), "tokens");
    CHECK_BAD_ARG(phi3_session_append_tokens(s, &tok, 0), "tokens");
    CHECK_BAD_ARG(phi3_session_append_message(NULL, "user", "hi"), "s");
    CHECK_BAD_ARG(phi3_session_append_message(s, NULL, "hi"), "role");
    CHECK_BAD_ARG(phi3_session_append_message(s, "user", NULL), "content");
    CHECK_EQ_SIZE(phi3_session_len(s), 0);

    /* Non-UTF-8 text: rejected, session unchanged (empty and non-empty). */
    CHECK_ERR(phi3_session_append_text(s, "\xff\xfe", 2), PHI3_ERR_INVALID_ARGUMENT, "UTF-8");
    CHECK_EQ_SIZE(phi3_session_len(s), 0);
    CHECK_OK(phi3_session_append_text(s, "Hello", 5));
    len = phi3_session_len(s);
    CHECK(len >= 2);
    CHECK_ERR(phi3_session_append_text(s, " ok \xff\xfe", 6), PHI3_ERR_INVALID_ARGUMENT, "UTF-8");
    CHECK_ERR(phi3_session_append_message(s, "user", "bad \xc3("), PHI3_ERR_INVALID_ARGUMENT,
              "UTF-8");
    CHECK_ERR(phi3_session_append_message(s, "\xff", "fine"), PHI3_ERR_INVALID_ARGUMENT, "UTF-8");
    CHECK_EQ_SIZE(phi3_session_len(s), len);

    /* (utf8, len) need not be NUL-terminated. */
    CHECK_OK(phi3_session_append_text(s, " worldGARBAGE", 6));
    {
        size_t n = 0, tl = 0;
        int32_t *t = session_tokens(s, &n);
        char *text = detokenize(m, t, n, &tl);
        CHECK(strstr(text, "Hello world") != NULL);
        CHECK(strstr(text, "GARBAGE") == NULL);
        free(text);
        free(t);
    }

    phi3_session_free(s);
}

static void test_token_out_of_range(void)
{
    phi3_model *m = load_fixture();
    phi3_session *s = new_session(m);
    int32_t good[3] = {1, 17, 42};
    int32_t bad[3] = {1, FIXTURE_VOCAB, 2};
    float *before, *after;

    CHECK_OK(phi3_session_append_tokens(s, good, 3));
    before = session_logits(s, FIXTURE_VOCAB);
    CHECK_ERR(phi3_session_append_tokens(s, bad, 3), PHI3_ERR_TOKEN_OUT_OF_RANGE, "tokens[1]");
    CHECK(strstr(phi3_last_error(), "384") != NULL);
    CHECK_EQ_SIZE(phi3_session_len(s), 3);
    bad[1] = -1;
    CHECK_ERR(phi3_session_append_tokens(s, bad, 3), PHI3_ERR_TOKEN_OUT_OF_RANGE, "tokens[1]");
    CHECK_EQ_SIZE(phi3_session_len(s), 3);
    bad[1] = INT32_MIN;
    CHECK_ERR(phi3_session_append_tokens(s, bad, 3), PHI3_ERR_TOKEN_OUT_OF_RANGE, NULL);
    CHECK_EQ_SIZE(phi3_session_len(s), 3);
    /* The session is unchanged: same logits, and it keeps working. */
    after = session_logits(s, FIXTURE_VOCAB);
    CHECK(memcmp(before, after, FIXTURE_VOCAB * sizeof(float)) == 0);
    CHECK_OK(phi3_session_append_tokens(s, good, 3));
    CHECK_EQ_SIZE(phi3_session_len(s), 6);

    free(before);
    free(after);
    phi3_session_free(s);
    phi3_model_free(m);
}

/* The greedy choice without the logits: equal to the argmax (lowest id on ties) of the logits
 * another session computes for the same tokens; the logits asked for afterwards are the same
 * bits; bad arguments leave the session and *out_token as they were. */
static void test_append_tokens_greedy(void)
{
    phi3_model *m = load_fixture();
    phi3_session *by_logits = new_session(m), *by_choice = new_session(m);
    int32_t prompt[3] = {1, 17, 42}, tok = 0, chosen = -7, bad = FIXTURE_VOCAB;
    float *l = NULL, *a, *b;
    size_t i;
    int step;

    CHECK_OK(phi3_session_append_tokens(by_logits, prompt, 3));
    CHECK_OK(phi3_session_append_tokens_greedy(by_choice, prompt, 3, &chosen));
    for (step = 0; step < 5; step++) {
        l = session_logits(by_logits, FIXTURE_VOCAB);
        tok = 0;
        for (i = 1; i < FIXTURE_VOCAB; i++)
            if (l[i] > l[tok]) tok = (int32_t)i;
        free(l);
        CHECK(chosen == tok);
        CHECK_OK(phi3_session_append_tokens(by_logits, &tok, 1));
        CHECK_OK(phi3_session_append_tokens_greedy(by_choice, &tok, 1, &chosen));
    }
    a = session_logits(by_logits, FIXTURE_VOCAB);
    b = session_logits(by_choice, FIXTURE_VOCAB);
    CHECK(memcmp(a, b, FIXTURE_VOCAB * sizeof(float)) == 0);
    free(a);
    free(b);

    CHECK_BAD_ARG(phi3_session_append_tokens_greedy(NULL, &tok, 1, &chosen), "s");
    CHECK_BAD_ARG(phi3_session_append_tokens_greedy(by_choice, NULL, 1, &chosen), "tokens");
    CHECK_BAD_ARG(phi3_session_append_tokens_greedy(by_choice, &tok, 1, NULL), "out_token");
    chosen = -7;
    CHECK_ERR(phi3_session_append_tokens_greedy(by_choice, &bad, 1, &chosen),
              PHI3_ERR_TOKEN_OUT_OF_RANGE, "tokens[0]");
    CHECK(chosen == -7);
    CHECK_EQ_SIZE(phi3_session_len(by_choice), 8);

    phi3_session_free(by_logits);
    phi3_session_free(by_choice);
    phi3_model_free(m);
}

static void test_context_full(void)
{
    phi3_model *m = load_fixture();
    phi3_model *d = shared_demo();
    phi3_session *s = new_session_ctx(m, 8);
    int32_t toks[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    float *before;

    CHECK_OK(phi3_session_append_tokens(s, toks, 6));
    CHECK_ERR(phi3_session_append_tokens(s, toks, 3), PHI3_ERR_CONTEXT_FULL, NULL);
    CHECK_EQ_SIZE(phi3_session_len(s), 6);
    CHECK_OK(phi3_session_append_tokens(s, toks, 2));
    CHECK_EQ_SIZE(phi3_session_len(s), 8);
    before = session_logits(s, FIXTURE_VOCAB);
    CHECK_ERR(phi3_session_append_tokens(s, toks, 1), PHI3_ERR_CONTEXT_FULL, NULL);
    CHECK_EQ_SIZE(phi3_session_len(s), 8);
    {
        float *after = session_logits(s, FIXTURE_VOCAB);
        CHECK(memcmp(before, after, FIXTURE_VOCAB * sizeof(float)) == 0);
        free(after);
    }
    free(before);
    phi3_session_free(s);

    /* A max_context above the model's is capped at the model's. */
    s = new_session_ctx(m, 100000);
    {
        int32_t many[FIXTURE_MAX_CONTEXT + 1];
        size_t i;
        for (i = 0; i < FIXTURE_MAX_CONTEXT + 1; i++)
            many[i] = (int32_t)(i % FIXTURE_VOCAB);
        CHECK_ERR(phi3_session_append_tokens(s, many, FIXTURE_MAX_CONTEXT + 1),
                  PHI3_ERR_CONTEXT_FULL, NULL);
        CHECK_EQ_SIZE(phi3_session_len(s), 0);
        CHECK_OK(phi3_session_append_tokens(s, many, FIXTURE_MAX_CONTEXT));
    }
    phi3_session_free(s);

    /* Text and messages too; generation stops at the context (finish reason LENGTH). */
    s = new_session_ctx(d, 12);
    CHECK_OK(phi3_session_append_text(s, "Hello", 5));
    CHECK_ERR(phi3_session_append_text(s, " the the the the the the the the the the the", 44),
              PHI3_ERR_CONTEXT_FULL, NULL);
    CHECK_ERR(phi3_session_append_message(s, "user", "a long message that does not fit at all"),
              PHI3_ERR_CONTEXT_FULL, NULL);
    {
        phi3_generate_options o = gen_opts(50, 0.0f, 0, 0);
        phi3_generate_result r = new_result();
        size_t len0 = phi3_session_len(s);
        CHECK_OK(phi3_session_generate(s, &o, NULL, NULL, &r));
        CHECK(r.finish_reason == PHI3_FINISH_LENGTH);
        CHECK_EQ_SIZE(phi3_session_len(s), 12);
        CHECK_EQ_SIZE(r.generated_tokens, 12 - len0);
    }
    phi3_session_free(s);

    phi3_model_free(m);
}

static void test_logits_and_tokens_buffers(void)
{
    phi3_model *m = load_fixture();
    phi3_session *s = new_session(m);
    int32_t toks[5] = {1, 100, 200, 300, 383};
    float *l = xmalloc((FIXTURE_VOCAB + 8) * sizeof *l);
    int32_t tb[16];
    size_t need = 0, got = 0, i;
    int finite = 1;

    /* Empty session: no logits. */
    CHECK_ERR(phi3_session_logits(s, l, FIXTURE_VOCAB, &got), PHI3_ERR_INVALID_ARGUMENT, NULL);
    /* Tokens of an empty session: zero of them. */
    got = 99;
    CHECK_OK(phi3_session_tokens(s, NULL, 0, &got));
    CHECK_EQ_SIZE(got, 0);

    CHECK_OK(phi3_session_append_tokens(s, toks, 5));
    CHECK_EQ_SIZE(phi3_session_len(s), 5);

    /* Logits: size query, too small (nothing written), exact, larger. */
    CHECK_ERR(phi3_session_logits(s, NULL, 0, &need), PHI3_ERR_BUFFER_TOO_SMALL, NULL);
    CHECK_EQ_SIZE(need, FIXTURE_VOCAB);
    for (i = 0; i < FIXTURE_VOCAB + 8; i++)
        l[i] = -123.0f;
    need = 0;
    CHECK_ERR(phi3_session_logits(s, l, FIXTURE_VOCAB - 1, &need), PHI3_ERR_BUFFER_TOO_SMALL,
              NULL);
    CHECK_EQ_SIZE(need, FIXTURE_VOCAB);
    for (i = 0; i < FIXTURE_VOCAB + 8; i++)
        CHECK(l[i] == -123.0f);
    CHECK_OK(phi3_session_logits(s, l, FIXTURE_VOCAB, &got));
    CHECK_EQ_SIZE(got, FIXTURE_VOCAB);
    for (i = 0; i < FIXTURE_VOCAB; i++)
        finite &= (l[i] == l[i] && fabsf(l[i]) < 1e30f);
    CHECK(finite);
    CHECK(max_abs(l, FIXTURE_VOCAB) > 0.0f);
    CHECK_OK(phi3_session_logits(s, l, FIXTURE_VOCAB + 8, &got));
    CHECK_EQ_SIZE(got, FIXTURE_VOCAB);
    CHECK(l[FIXTURE_VOCAB] == -123.0f);

    CHECK_BAD_ARG(phi3_session_logits(NULL, l, FIXTURE_VOCAB, &got), "s");
    CHECK_BAD_ARG(phi3_session_logits(s, NULL, FIXTURE_VOCAB, &got), "out");
    CHECK_OK(phi3_session_logits(s, l, FIXTURE_VOCAB, NULL)); /* out_len is optional */
    CHECK_ERR(phi3_session_logits(s, l, 3, NULL), PHI3_ERR_BUFFER_TOO_SMALL, NULL);

    /* Tokens: the same buffer protocol. */
    need = 0;
    CHECK_ERR(phi3_session_tokens(s, NULL, 0, &need), PHI3_ERR_BUFFER_TOO_SMALL, NULL);
    CHECK_EQ_SIZE(need, 5);
    for (i = 0; i < 16; i++)
        tb[i] = -9;
    need = 0;
    CHECK_ERR(phi3_session_tokens(s, tb, 4, &need), PHI3_ERR_BUFFER_TOO_SMALL, NULL);
    CHECK_EQ_SIZE(need, 5);
    for (i = 0; i < 16; i++)
        CHECK(tb[i] == -9);
    CHECK_OK(phi3_session_tokens(s, tb, 16, &got));
    CHECK_EQ_SIZE(got, 5);
    CHECK(memcmp(tb, toks, sizeof toks) == 0);
    CHECK(tb[5] == -9);
    CHECK_BAD_ARG(phi3_session_tokens(NULL, tb, 16, &got), "s");
    CHECK_BAD_ARG(phi3_session_tokens(s, NULL, 16, &got), "out");
    CHECK_OK(phi3_session_tokens(s, tb, 16, NULL)); /* out_len is optional */
    CHECK_ERR(phi3_session_tokens(s, tb, 2, NULL), PHI3_ERR_BUFFER_TOO_SMALL, NULL);

    free(l);
    phi3_session_free(s);
    phi3_model_free(m);
}

static void test_last_error_cleared(void)
{
    phi3_model *m = load_fixture();
    phi3_session *s = new_session(m);
    int32_t tok = 3;
    const char *e;

    CHECK_BAD_ARG(phi3_session_append_tokens(s, NULL, 1), "tokens");
    /* Getters and other non-status calls leave it alone... */
    (void)phi3_session_len(s);
    CHECK(phi3_last_error()[0] != '\0');
    /* ...and the next status-returning call clears it on success. */
    CHECK_STATUS(phi3_session_append_tokens(s, &tok, 1), PHI3_OK);
    e = phi3_last_error();
    CHECK(e != NULL);
    CHECK_STREQ(e, "");

    /* A failure in one call and success in a call of another family. */
    CHECK_ERR(phi3_session_truncate(s, 99), PHI3_ERR_INVALID_ARGUMENT, NULL);
    CHECK_STATUS(phi3_session_reset(s), PHI3_OK);
    CHECK_STREQ(phi3_last_error(), "");

    phi3_session_free(s);
    phi3_model_free(m);
}

static void test_generate_basic(void)
{
    phi3_model *m = shared_demo();
    phi3_session *s = new_session(m);
    phi3_generate_options o = gen_opts(10, 0.0f, 0, 0);
    phi3_generate_result r = new_result();
    struct collect c, d;
    size_t len0, n = 0;
    int32_t *t;

    memset(&c, 0, sizeof c);
    memset(&d, 0, sizeof d);
    /* Empty session: nothing to continue. */
    CHECK_ERR(phi3_session_generate(s, &o, collect_cb, &c, &r), PHI3_ERR_INVALID_ARGUMENT, NULL);
    CHECK_EQ_SIZE(c.n_tokens, 0);

    CHECK_OK(phi3_session_append_text(s, "Hello, the world", 16));
    len0 = phi3_session_len(s);
    CHECK_OK(phi3_session_generate(s, &o, collect_cb, &c, &r));
    check_collect_sane(&c);
    CHECK(r.struct_size == sizeof r);
    CHECK(r.finish_reason == PHI3_FINISH_LENGTH);
    CHECK_EQ_SIZE(r.prompt_tokens, len0);
    CHECK_EQ_SIZE(r.generated_tokens, 10);
    CHECK_EQ_SIZE(c.n_tokens, 10);
    CHECK(r.time_to_first_token_s >= 0.0);
    CHECK(r.prefill_tokens_per_s >= 0.0);
    CHECK(r.decode_tokens_per_s >= 0.0);
    CHECK_EQ_SIZE(phi3_session_len(s), len0 + 10);
    t = session_tokens(s, &n);
    CHECK(memcmp(t + len0, c.tokens, 10 * sizeof *t) == 0);
    free(t);

    /* Greedy is deterministic: truncate back and regenerate without a callback or result. */
    CHECK_OK(phi3_session_truncate(s, len0));
    CHECK_OK(phi3_session_generate(s, &o, NULL, NULL, NULL));
    t = session_tokens(s, &n);
    CHECK_EQ_SIZE(n, len0 + 10);
    CHECK(memcmp(t + len0, c.tokens, 10 * sizeof *t) == 0);
    free(t);

    /* NULL options: the defaults (greedy, 256 tokens, the model's stop tokens). The callback
     * stops it after 10 tokens (keeps the test fast on an unoptimised debug build); greedy
     * means the same 10 tokens, unless the model's stop token comes first. */
    CHECK_OK(phi3_session_truncate(s, len0));
    r = new_result();
    d.stop_after = 10;
    CHECK_OK(phi3_session_generate(s, NULL, collect_cb, &d, &r));
    check_collect_sane(&d);
    CHECK(r.finish_reason == PHI3_FINISH_CALLBACK || r.finish_reason == PHI3_FINISH_EOS);
    CHECK(r.prompt_tokens <= 1); /* nothing new was pending */
    CHECK(d.n_tokens <= 10);
    CHECK(memcmp(d.tokens, c.tokens, d.n_tokens * sizeof *d.tokens) == 0);

    collect_free(&c);
    collect_free(&d);
    phi3_session_free(s);
}

static void test_generate_errors_and_struct_size(void)
{
    phi3_model *m = shared_demo();
    phi3_model *f = load_fixture();
    phi3_session *s = new_session(m);
    phi3_generate_options o;
    phi3_generate_result r = new_result();
    size_t len0;
    int32_t ids[1];
    const char *stops[2] = {"ok", ""};

    CHECK_OK(phi3_session_append_text(s, "Hello", 5));
    len0 = phi3_session_len(s);

    o = gen_opts(5, 0.0f, 0, 0);
    CHECK_BAD_ARG(phi3_session_generate(NULL, &o, NULL, NULL, &r), "s");

    o.struct_size = (uint32_t)sizeof o + 16;
    CHECK_ERR(phi3_session_generate(s, &o, NULL, NULL, &r), PHI3_ERR_INVALID_ARGUMENT,
              "struct_size");

    o = gen_opts(5, -1.0f, 0, 0);
    CHECK_ERR(phi3_session_generate(s, &o, NULL, NULL, &r), PHI3_ERR_INVALID_ARGUMENT,
              "temperature");
    o = gen_opts(5, 0.0f, 0, 0);
    o.top_p = 1.5f;
    CHECK_ERR(phi3_session_generate(s, &o, NULL, NULL, &r), PHI3_ERR_INVALID_ARGUMENT, "top_p");
    o = gen_opts(5, 0.0f, 0, 0);
    o.n_stop = 2;
    o.stop = NULL;
    CHECK_ERR(phi3_session_generate(s, &o, NULL, NULL, &r), PHI3_ERR_INVALID_ARGUMENT, "stop");
    o.stop = stops;
    CHECK_ERR(phi3_session_generate(s, &o, NULL, NULL, &r), PHI3_ERR_INVALID_ARGUMENT, "stop[1]");
    o = gen_opts(5, 0.0f, 0, 0);
    o.stop_token_ids = ids;
    o.n_stop_token_ids = 1;
    o.n_stop_token_ids = 1;
    ids[0] = (int32_t)phi3_model_vocab_size(m);
    o.stop_token_ids = ids;
    CHECK_ERR(phi3_session_generate(s, &o, NULL, NULL, &r), PHI3_ERR_INVALID_ARGUMENT,
              "stop_token_ids[0]");
    CHECK_EQ_SIZE(phi3_session_len(s), len0);

    /* The result struct: too large a struct_size is rejected before any work... */
    o = gen_opts(3, 0.0f, 0, 0);
    r = new_result();
    r.struct_size = (uint32_t)sizeof r + 8;
    CHECK_ERR(phi3_session_generate(s, &o, NULL, NULL, &r), PHI3_ERR_INVALID_ARGUMENT,
              "struct_size");
    CHECK_EQ_SIZE(phi3_session_len(s), len0);
    /* ...and an older, smaller one gets only the fields it has. */
    r = new_result();
    r.struct_size = (uint32_t)offsetof(phi3_generate_result, prompt_tokens);
    {
        size_t sentinel;
        memset(&sentinel, 0xAB, sizeof sentinel);
        CHECK_OK(phi3_session_generate(s, &o, NULL, NULL, &r));
        CHECK(r.finish_reason == PHI3_FINISH_LENGTH);
        CHECK(r.prompt_tokens == sentinel);
        CHECK(r.generated_tokens == sentinel);
    }
    CHECK_OK(phi3_session_truncate(s, len0));

    /* An older struct (only struct_size and max_tokens): the rest, garbage here, takes its
     * defaults, so this is a greedy 4-token generation. */
    memset(&o, 0xFF, sizeof o);
    o.struct_size = (uint32_t)offsetof(phi3_generate_options, temperature);
    o.max_tokens = 4;
    o.stop = (const char *const *)POISON_PTR;
    o.stop_token_ids = (const int32_t *)POISON_PTR;
    r = new_result();
    CHECK_OK(phi3_session_generate(s, &o, NULL, NULL, &r));
    CHECK(r.generated_tokens <= 4);
    CHECK(r.generated_tokens >= 1);
    CHECK(r.finish_reason == PHI3_FINISH_LENGTH || r.finish_reason == PHI3_FINISH_EOS);
    CHECK_EQ_SIZE(phi3_session_len(s), len0 + r.generated_tokens);

    /* A model without a tokenizer cannot generate text. */
    phi3_session_free(s);
    s = new_session(f);
    ids[0] = 1;
    CHECK_OK(phi3_session_append_tokens(s, ids, 1));
    o = gen_opts(5, 0.0f, 0, 0);
    CHECK_ERR(phi3_session_generate(s, &o, NULL, NULL, &r), PHI3_ERR_UNSUPPORTED, NULL);
    CHECK_EQ_SIZE(phi3_session_len(s), 1);
    CHECK_ERR(phi3_session_append_text(s, "hi", 2), PHI3_ERR_UNSUPPORTED, NULL);
    CHECK_ERR(phi3_session_append_message(s, "user", "hi"), PHI3_ERR_UNSUPPORTED, NULL);
    CHECK_EQ_SIZE(phi3_session_len(s), 1);

    phi3_session_free(s);
    phi3_model_free(f);
}

/* A callback that calls back into its own session gets PHI3_ERR_BUSY; the outer generate still
 * succeeds, and its PHI3_OK leaves no stale message in phi3_last_error(). */
static int32_t reenter_cb(void *user, const char *utf8, size_t len, int32_t token)
{
    phi3_session *s = (phi3_session *)user;
    (void)utf8;
    (void)len;
    if (token >= 0)
        CHECK_STATUS(phi3_session_append_text(s, "x", 1), PHI3_ERR_BUSY);
    return 0;
}

static void test_callback_reentry_is_busy(void)
{
    phi3_model *m = shared_demo();
    phi3_session *s = new_session(m);
    phi3_generate_options o = gen_opts(3, 0.0f, 0, 0);
    CHECK_OK(phi3_session_append_text(s, "Hello", 5));
    CHECK_OK(phi3_session_generate(s, &o, reenter_cb, s, NULL));
    phi3_session_free(s);
}

static void test_generate_callback_stop(void)
{
    phi3_model *m = shared_demo();
    phi3_session *s = new_session(m);
    phi3_generate_options o = gen_opts(50, 0.8f, 1, 7);
    phi3_generate_result r = new_result();
    struct collect c;
    size_t len0, n = 0;
    int32_t *t;

    memset(&c, 0, sizeof c);
    c.stop_after = 3;
    CHECK_OK(phi3_session_append_text(s, "Once upon a time", 16));
    len0 = phi3_session_len(s);
    CHECK_OK(phi3_session_generate(s, &o, collect_cb, &c, &r));
    check_collect_sane(&c);
    CHECK(r.finish_reason == PHI3_FINISH_CALLBACK);
    CHECK_EQ_SIZE(c.n_tokens, 3);
    CHECK_EQ_SIZE(r.generated_tokens, 3);
    CHECK_EQ_SIZE(phi3_session_len(s), len0 + 3);
    t = session_tokens(s, &n);
    CHECK(memcmp(t + len0, c.tokens, 3 * sizeof *t) == 0);
    free(t);

    /* The session keeps working after a callback stop. */
    o = gen_opts(2, 0.0f, 0, 0);
    CHECK_OK(phi3_session_generate(s, &o, NULL, NULL, &r));
    CHECK_EQ_SIZE(phi3_session_len(s), len0 + 5);

    collect_free(&c);
    phi3_session_free(s);
}

static void test_generate_stop_string(void)
{
    phi3_model *m = shared_demo();
    phi3_session *s = new_session(m);
    phi3_generate_options o = gen_opts(24, 0.0f, 0, 0);
    phi3_generate_result r = new_result();
    struct collect full, cut;
    size_t len0, start;
    char stop[8];
    const char *stops[1];

    memset(&full, 0, sizeof full);
    memset(&cut, 0, sizeof cut);
    CHECK_OK(phi3_session_append_text(s, "Hello", 5));
    len0 = phi3_session_len(s);
    CHECK_OK(phi3_session_generate(s, &o, collect_cb, &full, &r));
    check_collect_sane(&full);
    CHECK(full.len > 12);

    /* Stop at a piece of the greedy reply (4 ASCII-safe bytes from its middle). */
    start = full.len / 2;
    while (start > 0 && ((unsigned char)full.text[start] & 0xC0) == 0x80)
        start--;
    {
        size_t k = 0, i = start;
        while (k < 4 && i < full.len) {
            unsigned char ch = (unsigned char)full.text[i];
            if (ch >= 0x80)
                break;
            stop[k++] = (char)ch;
            i++;
        }
        stop[k] = '\0';
        if (k < 2) { /* the middle is multi-byte: fall back to the first 3 bytes */
            memcpy(stop, full.text, 3);
            stop[3] = '\0';
            start = 0;
        }
    }
    stops[0] = stop;
    CHECK_OK(phi3_session_truncate(s, len0));
    o.stop = stops;
    o.n_stop = 1;
    CHECK_OK(phi3_session_generate(s, &o, collect_cb, &cut, &r));
    check_collect_sane(&cut);
    CHECK(r.finish_reason == PHI3_FINISH_STOP_STRING);
    CHECK(strstr(cut.text ? cut.text : "", stop) == NULL);
    {
        /* The streamed text is the greedy reply up to the first occurrence of the stop string. */
        const char *first = strstr(full.text, stop);
        CHECK(first != NULL);
        CHECK_EQ_SIZE(cut.len, (size_t)(first - full.text));
        CHECK(cut.len == 0 || memcmp(cut.text, full.text, cut.len) == 0);
    }

    collect_free(&full);
    collect_free(&cut);
    phi3_session_free(s);
}

/* Sampled generation streams valid UTF-8 (multi-byte characters included, split across byte
 * tokens or not), and the callback's tokens are exactly the new tokens of the session. */
static void test_stream_utf8(void)
{
    phi3_model *m = shared_demo();
    phi3_session *s = new_session(m);
    /* PHI3_C_TEST_QUICK (set by run.sh for valgrind, ~50x slower) shortens the generation. */
    const int quick = getenv("PHI3_C_TEST_QUICK") != NULL;
    const uint32_t n_gen = quick ? 24 : 100;
    const uint32_t n_again = quick ? 8 : 30;
    phi3_generate_options o = gen_opts(n_gen, 1.5f, 1, 1234);
    phi3_generate_result r = new_result();
    const char *prompt = "Caf\xc3\xa9 na\xc3\xafve \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80 hello";
    struct collect c, c2;
    size_t len0, n = 0, i;
    int32_t *t;
    int multibyte = 0;

    memset(&c, 0, sizeof c);
    memset(&c2, 0, sizeof c2);
    CHECK_OK(phi3_session_append_text(s, prompt, strlen(prompt)));
    len0 = phi3_session_len(s);
    CHECK_OK(phi3_session_generate(s, &o, collect_cb, &c, &r));
    check_collect_sane(&c);
    CHECK(c.len > 0);
    CHECK(is_valid_utf8((const unsigned char *)c.text, c.len));
    CHECK(strlen(c.text) == c.len); /* no NUL bytes inside */
    CHECK(r.finish_reason == PHI3_FINISH_LENGTH);
    CHECK_EQ_SIZE(r.generated_tokens, n_gen);
    CHECK_EQ_SIZE(c.n_tokens, n_gen);
    t = session_tokens(s, &n);
    CHECK_EQ_SIZE(n, len0 + n_gen);
    CHECK(memcmp(t + len0, c.tokens, n_gen * sizeof *t) == 0);
    for (i = 0; i < c.len; i++)
        multibyte |= ((unsigned char)c.text[i] >= 0x80);
    if (!multibyte)
        printf(" (note: the sampled reply is all ASCII)");

    /* The streamed text is the text of the generated tokens decoded in context:
     * decode(prompt + generated) == decode(prompt) + stream. Special tokens are left out of the
     * stream but maybe not out of phi3_detokenize, so this holds only when none was sampled
     * (the seed is chosen so that none is). */
    {
        size_t tl = 0, pl = 0, specials = 0;
        char *all = detokenize(m, t, n, &tl);
        char *pre = detokenize(m, t, len0, &pl);
        for (i = len0; i < n; i++) {
            size_t one_len = 0;
            char *one = detokenize(m, t + i, 1, &one_len);
            if (t[i] <= 2 || (one_len >= 4 && one[0] == '<' && one[1] == '|'))
                specials++;
            free(one);
        }
        CHECK(is_valid_utf8((const unsigned char *)all, tl));
        if (specials == 0) {
            CHECK_MSG(tl == pl + c.len && memcmp(all, pre, pl) == 0 &&
                          memcmp(all + pl, c.text, c.len) == 0,
                      "streamed \"%s\"\n    decode(all) \"%s\"\n    decode(prompt) \"%s\"", c.text,
                      all, pre);
        } else {
            printf(" (note: %lu special tokens sampled; decode check skipped)",
                   (unsigned long)specials);
        }
        free(all);
        free(pre);
    }
    free(t);

    /* Same seed, same prompt: same stream (its first tokens, to save time). */
    CHECK_OK(phi3_session_truncate(s, len0));
    o.max_tokens = n_again;
    CHECK_OK(phi3_session_generate(s, &o, collect_cb, &c2, &r));
    CHECK_EQ_SIZE(c2.n_tokens, n_again);
    CHECK(memcmp(c2.tokens, c.tokens, n_again * sizeof *c.tokens) == 0);
    CHECK(c2.len <= c.len && memcmp(c2.text, c.text, c2.len) == 0);

    collect_free(&c);
    collect_free(&c2);
    phi3_session_free(s);
}

static void test_append_message(void)
{
    phi3_model *m = shared_demo();
    phi3_session *s = new_session(m);
    phi3_generate_options o = gen_opts(8, 0.0f, 0, 0);
    phi3_generate_result r = new_result();
    size_t n = 0, tl = 0, len1;
    int32_t *t;
    char *text;

    CHECK_OK(phi3_session_append_message(s, "system", "You are kind."));
    CHECK_OK(phi3_session_append_message(s, "user", "Hello"));
    len1 = phi3_session_len(s);
    t = session_tokens(s, &n);
    text = detokenize(m, t, n, &tl);
    CHECK(strstr(text, "You are kind.") != NULL);
    CHECK(strstr(text, "Hello") != NULL);
    free(text);
    free(t);

    /* generate adds the assistant prompt first (counted as prompt tokens). */
    CHECK_OK(phi3_session_generate(s, &o, NULL, NULL, &r));
    CHECK(r.prompt_tokens > 0);
    CHECK(phi3_session_len(s) > len1 + r.generated_tokens - 1);
    CHECK_OK(phi3_session_append_message(s, "user", "And then?"));
    r = new_result();
    CHECK_OK(phi3_session_generate(s, &o, NULL, NULL, &r));
    CHECK(r.generated_tokens >= 1);

    phi3_session_free(s);
}

static void test_model_free_while_session_lives(void)
{
    phi3_model *m = load_demo();
    phi3_session *s = new_session(m);
    phi3_session *s2 = NULL;
    phi3_generate_options o = gen_opts(12, 0.0f, 0, 0);
    phi3_generate_result r = new_result();
    size_t n = 0;
    int32_t *t;

    phi3_model_free(m); /* the session keeps the model alive */
    m = NULL;
    CHECK_OK(phi3_session_append_text(s, "Hello there", 11));
    CHECK_OK(phi3_session_generate(s, &o, NULL, NULL, &r));
    CHECK_EQ_SIZE(r.generated_tokens, 12);
    CHECK_OK(phi3_session_fork(s, &s2));
    phi3_session_free(s);
    /* The fork holds the model too. */
    CHECK_OK(phi3_session_append_text(s2, " and more", 9));
    CHECK_OK(phi3_session_generate(s2, &o, NULL, NULL, &r));
    t = session_tokens(s2, &n);
    CHECK(n > 24);
    free(t);
    phi3_session_free(s2);
}

static void test_fork(void)
{
    phi3_model *m = load_fixture();
    phi3_session *a = new_session(m);
    phi3_session *b = (phi3_session *)POISON_PTR;
    phi3_session *fresh;
    int32_t prefix[6] = {1, 10, 20, 30, 40, 50};
    int32_t more[3] = {60, 70, 80};
    float *la, *lb, *la2, *lf;

    CHECK_BAD_ARG(phi3_session_fork(NULL, &b), "s");
    CHECK_BAD_ARG(phi3_session_fork(a, NULL), "out");
    CHECK(b == (phi3_session *)POISON_PTR);

    CHECK_OK(phi3_session_append_tokens(a, prefix, 6));
    la = session_logits(a, FIXTURE_VOCAB);
    CHECK_OK(phi3_session_fork(a, &b));
    CHECK(b != NULL && b != a);
    CHECK_EQ_SIZE(phi3_session_len(b), 6);
    lb = session_logits(b, FIXTURE_VOCAB);
    CHECK(memcmp(la, lb, FIXTURE_VOCAB * sizeof(float)) == 0);
    free(lb);

    /* Appending to the fork changes neither the original's length nor its logits. */
    CHECK_OK(phi3_session_append_tokens(b, more, 3));
    CHECK_EQ_SIZE(phi3_session_len(b), 9);
    CHECK_EQ_SIZE(phi3_session_len(a), 6);
    la2 = session_logits(a, FIXTURE_VOCAB);
    CHECK(memcmp(la, la2, FIXTURE_VOCAB * sizeof(float)) == 0);
    free(la2);

    /* The fork's logits equal those of a fresh session with the same tokens. */
    lb = session_logits(b, FIXTURE_VOCAB);
    fresh = new_session(m);
    CHECK_OK(phi3_session_append_tokens(fresh, prefix, 6));
    CHECK_OK(phi3_session_append_tokens(fresh, more, 3));
    lf = session_logits(fresh, FIXTURE_VOCAB);
    check_logits_close(lb, lf, FIXTURE_VOCAB);
    free(lf);

    /* And the other way round: appending to the original leaves the fork alone. */
    CHECK_OK(phi3_session_append_tokens(a, more, 2));
    CHECK_EQ_SIZE(phi3_session_len(b), 9);
    la2 = session_logits(b, FIXTURE_VOCAB);
    CHECK(memcmp(lb, la2, FIXTURE_VOCAB * sizeof(float)) == 0);
    free(la2);

    /* Freeing the original first leaves the fork working. */
    phi3_session_free(a);
    CHECK_OK(phi3_session_append_tokens(b, prefix, 1));
    CHECK_EQ_SIZE(phi3_session_len(b), 10);

    free(la);
    free(lb);
    phi3_session_free(b);
    phi3_session_free(fresh);
    phi3_model_free(m);
}

static void test_truncate_reset(void)
{
    phi3_model *m = load_fixture();
    phi3_session *s = new_session(m);
    phi3_session *ref = new_session(m);
    int32_t toks[24];
    size_t i, n = 0;
    float *ls, *lr;
    int32_t *t;

    for (i = 0; i < 24; i++)
        toks[i] = (int32_t)((i * 37 + 1) % FIXTURE_VOCAB);
    CHECK_BAD_ARG(phi3_session_truncate(NULL, 0), "s");
    CHECK_BAD_ARG(phi3_session_reset(NULL), "s");

    /* 24 tokens: past the fixture's LongRoPE threshold (16); truncating to 10 goes back. */
    CHECK_OK(phi3_session_append_tokens(s, toks, 24));
    CHECK_ERR(phi3_session_truncate(s, 25), PHI3_ERR_INVALID_ARGUMENT, NULL);
    CHECK_EQ_SIZE(phi3_session_len(s), 24);
    CHECK_OK(phi3_session_truncate(s, 24)); /* no-op */
    CHECK_EQ_SIZE(phi3_session_len(s), 24);
    CHECK_OK(phi3_session_truncate(s, 10));
    CHECK_EQ_SIZE(phi3_session_len(s), 10);
    t = session_tokens(s, &n);
    CHECK_EQ_SIZE(n, 10);
    CHECK(memcmp(t, toks, 10 * sizeof *t) == 0);
    free(t);
    ls = session_logits(s, FIXTURE_VOCAB);
    CHECK_OK(phi3_session_append_tokens(ref, toks, 10));
    lr = session_logits(ref, FIXTURE_VOCAB);
    check_logits_close(ls, lr, FIXTURE_VOCAB);
    free(ls);
    free(lr);

    /* Append after truncate: as if the dropped tokens never were. */
    CHECK_OK(phi3_session_append_tokens(s, toks + 12, 4));
    CHECK_OK(phi3_session_append_tokens(ref, toks + 12, 4));
    ls = session_logits(s, FIXTURE_VOCAB);
    lr = session_logits(ref, FIXTURE_VOCAB);
    check_logits_close(ls, lr, FIXTURE_VOCAB);
    free(ls);
    free(lr);

    /* Truncate to 0 and reset empty the session. */
    CHECK_OK(phi3_session_truncate(s, 0));
    CHECK_EQ_SIZE(phi3_session_len(s), 0);
    CHECK_OK(phi3_session_append_tokens(s, toks, 3));
    CHECK_OK(phi3_session_reset(s));
    CHECK_EQ_SIZE(phi3_session_len(s), 0);
    {
        float dummy[4];
        size_t got = 0;
        CHECK_ERR(phi3_session_logits(s, dummy, 4, &got), PHI3_ERR_INVALID_ARGUMENT, NULL);
    }
    CHECK_OK(phi3_session_reset(s)); /* resetting an empty session is fine */
    CHECK_OK(phi3_session_append_tokens(s, toks, 10));
    ls = session_logits(s, FIXTURE_VOCAB);
    CHECK_OK(phi3_session_truncate(ref, 10));
    lr = session_logits(ref, FIXTURE_VOCAB);
    check_logits_close(ls, lr, FIXTURE_VOCAB);
    free(ls);
    free(lr);

    phi3_session_free(s);
    phi3_session_free(ref);
    phi3_model_free(m);
}

static void test_save_load(void)
{
    phi3_model *m = load_demo();
    phi3_model *f = load_fixture();
    phi3_session *s = new_session(m);
    phi3_session *loaded = (phi3_session *)POISON_PTR;
    phi3_generate_options o = gen_opts(20, 1.0f, 1, 99);
    phi3_generate_result r = new_result();
    size_t vocab = phi3_model_vocab_size(m);
    size_t na = 0, nb = 0;
    float *la, *lb;
    int32_t *ta, *tb;
    char path[512];

    temp_path(path, sizeof path);
    CHECK_OK(phi3_session_append_text(s, "Hello, the moon is bright", 25));
    la = session_logits(s, vocab);

    CHECK_BAD_ARG(phi3_session_save(NULL, path), "s");
    CHECK_BAD_ARG(phi3_session_save(s, NULL), "path");
    CHECK_ERR(phi3_session_save(s, "tests/fixtures/no-such-dir/x.session"), PHI3_ERR_IO,
              "no-such-dir");
    CHECK_OK(phi3_session_save(s, path));

    CHECK_BAD_ARG(phi3_session_load(NULL, path, &loaded), "m");
    CHECK_BAD_ARG(phi3_session_load(m, NULL, &loaded), "path");
    CHECK_BAD_ARG(phi3_session_load(m, path, NULL), "out");
    CHECK_ERR(phi3_session_load(m, "tests/fixtures/no-such-file.session", &loaded), PHI3_ERR_IO,
              "no-such-file");
    /* Saved from another model. */
    CHECK_ERR(phi3_session_load(f, path, &loaded), PHI3_ERR_INVALID_ARGUMENT, NULL);
    /* Not a session file. */
    CHECK_ERR(phi3_session_load(m, FIXTURE "/config.json", &loaded), PHI3_ERR_MODEL_FORMAT, NULL);
    CHECK(loaded == (phi3_session *)POISON_PTR);

    CHECK_OK(phi3_session_load(m, path, &loaded));
    CHECK(loaded != NULL);
    CHECK_EQ_SIZE(phi3_session_len(loaded), phi3_session_len(s));
    ta = session_tokens(s, &na);
    tb = session_tokens(loaded, &nb);
    CHECK(na == nb && memcmp(ta, tb, na * sizeof *ta) == 0);
    free(ta);
    free(tb);
    lb = session_logits(loaded, vocab);
    CHECK(memcmp(la, lb, vocab * sizeof *la) == 0);
    free(lb);

    /* Same seed: same continuation from both. */
    CHECK_OK(phi3_session_generate(s, &o, NULL, NULL, &r));
    CHECK_OK(phi3_session_generate(loaded, &o, NULL, NULL, &r));
    ta = session_tokens(s, &na);
    tb = session_tokens(loaded, &nb);
    CHECK(na == nb && memcmp(ta, tb, na * sizeof *ta) == 0);
    free(ta);
    free(tb);

    /* A session that outlives its model, loaded from the file. */
    phi3_session_free(loaded);
    loaded = NULL;
    phi3_model_free(m);
    m = load_demo();
    CHECK_OK(phi3_session_load(m, path, &loaded));
    phi3_model_free(m);
    lb = session_logits(loaded, vocab);
    CHECK(memcmp(la, lb, vocab * sizeof *la) == 0);
    free(lb);

    /* Truncated file. */
    {
        FILE *fp = fopen(path, "r+b");
        CHECK(fp != NULL);
        CHECK(ftruncate(fileno(fp), 40) == 0);
        fclose(fp);
        m = load_demo();
        CHECK_ERR(phi3_session_load(m, path, &loaded), PHI3_ERR_MODEL_FORMAT, NULL);
        phi3_model_free(m);
    }

    unlink(path);
    free(la);
    phi3_session_free(loaded);
    phi3_session_free(s);
    phi3_model_free(f);
}

/* A negative stop token id is a bad option like an id >= vocab: PHI3_ERR_INVALID_ARGUMENT (the
 * header's list for generate), not TOKEN_OUT_OF_RANGE. Run last so that a failure here does not
 * hide the other tests. */
static void test_negative_stop_token_id(void)
{
    phi3_model *m = shared_demo();
    phi3_session *s = new_session(m);
    phi3_generate_options o = gen_opts(5, 0.0f, 0, 0);
    int32_t ids[1] = {-1};
    size_t len0;

    CHECK_OK(phi3_session_append_text(s, "Hello", 5));
    len0 = phi3_session_len(s);
    o.stop_token_ids = ids;
    o.n_stop_token_ids = 1;
    CHECK_ERR(phi3_session_generate(s, &o, NULL, NULL, NULL), PHI3_ERR_INVALID_ARGUMENT,
              "stop_token_ids[0]");
    CHECK_EQ_SIZE(phi3_session_len(s), len0);
    phi3_session_free(s);
}

/* phi3_session_cancel on an idle session: harmless; NULL: a no-op. */
static void test_cancel_idle(void)
{
    phi3_model *m = load_fixture();
    phi3_session *s = new_session(m);
    int32_t toks[3] = {1, 2, 3};
    phi3_session_cancel(NULL);
    phi3_session_cancel(s);
    /* A cancel that arrives before a call does not cancel it: each call starts afresh. */
    CHECK_OK(phi3_session_append_tokens(s, toks, 3));
    CHECK_EQ_SIZE(phi3_session_len(s), 3);
    phi3_session_free(s);
    phi3_model_free(m);
}

/* Getters on NULL handles return 0 instead of crashing. */
static void test_getters_null(void)
{
    CHECK_EQ_SIZE(phi3_model_vocab_size(NULL), 0);
    CHECK_EQ_SIZE(phi3_model_max_context(NULL), 0);
    CHECK_EQ_SIZE(phi3_session_len(NULL), 0);
}

/* Counts that no buffer can back (a wrong size_t, a hostile host) are errors before anything is
 * read or allocated from them; the session is unchanged. */
static void test_size_bombs(void)
{
    phi3_model *d = shared_demo();
    phi3_session *s = new_session_ctx(d, 0);
    int32_t toks[2] = {1, 2};
    size_t huge = (size_t)1 << 40;
    size_t absurd = SIZE_MAX / 2;
    char buf[16];
    size_t got = 0;

    CHECK_OK(phi3_session_append_tokens(s, toks, 2));
    CHECK_ERR(phi3_session_append_tokens(s, toks, huge), PHI3_ERR_CONTEXT_FULL, "1099511627776");
    CHECK_ERR(phi3_session_append_tokens(s, toks, absurd), PHI3_ERR_CONTEXT_FULL, NULL);
    CHECK_EQ_SIZE(phi3_session_len(s), 2);
    CHECK_ERR(phi3_detokenize(d, toks, absurd, buf, sizeof buf, &got), PHI3_ERR_INVALID_ARGUMENT,
              "more than any buffer");
    CHECK_ERR(phi3_session_append_text(s, "hi", SIZE_MAX), PHI3_ERR_INVALID_ARGUMENT,
              "more than any buffer");
    {
        phi3_generate_options o = gen_opts(4, 0.0f, 0, 0);
        const char *stop[1] = {"x"};
        o.stop = stop;
        o.n_stop = huge;
        CHECK_ERR(phi3_session_generate(s, &o, NULL, NULL, NULL), PHI3_ERR_INVALID_ARGUMENT,
                  "options->n_stop");
        o.n_stop = 1;
        o.stop_token_ids = toks;
        o.n_stop_token_ids = huge;
        CHECK_ERR(phi3_session_generate(s, &o, NULL, NULL, NULL), PHI3_ERR_INVALID_ARGUMENT,
                  "options->n_stop_token_ids");
    }
    CHECK_EQ_SIZE(phi3_session_len(s), 2);
    phi3_session_free(s);
}

static unsigned char *read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long len;
    CHECK(f != NULL);
    CHECK(fseek(f, 0, SEEK_END) == 0);
    len = ftell(f);
    CHECK(len >= 0);
    rewind(f);
    buf = xmalloc((size_t)len + 1);
    CHECK(fread(buf, 1, (size_t)len, f) == (size_t)len);
    fclose(f);
    *n = (size_t)len;
    return buf;
}

/* A save that runs out of space (here: RLIMIT_FSIZE, which fails writes with EFBIG just as a full
 * disk fails them with ENOSPC) is PHI3_ERR_IO; the previous file at the path is intact, no
 * temporary file is left behind, and the session is unchanged. */
static void test_save_disk_full(void)
{
    phi3_model *m = shared_demo();
    phi3_session *s = new_session(m);
    phi3_session *loaded = NULL;
    char dir[256], path[512];
    unsigned char *before, *after;
    size_t n_before, n_after, len;
    struct rlimit old_limit, small;
    void (*old_handler)(int);
    DIR *d;
    struct dirent *e;
    int entries = 0;

    snprintf(dir, sizeof dir, "%s/phi3-c-full-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/chat.session", dir);
    CHECK_OK(phi3_session_append_text(s, "Hello, the moon", 15));
    CHECK_OK(phi3_session_save(s, path));
    before = read_file(path, &n_before);

    CHECK_OK(phi3_session_append_text(s, " is bright tonight and the sea is calm", 38));
    len = phi3_session_len(s);
    CHECK(getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
    small = old_limit;
    small.rlim_cur = (rlim_t)n_before; /* the new file is larger than the old one */
    old_handler = signal(SIGXFSZ, SIG_IGN);
    CHECK(setrlimit(RLIMIT_FSIZE, &small) == 0);
    CHECK_ERR(phi3_session_save(s, path), PHI3_ERR_IO, "chat.session");
    CHECK(setrlimit(RLIMIT_FSIZE, &old_limit) == 0);
    signal(SIGXFSZ, old_handler);

    after = read_file(path, &n_after);
    CHECK(n_after == n_before && memcmp(before, after, n_before) == 0);
    d = opendir(dir);
    CHECK(d != NULL);
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            entries++;
    closedir(d);
    CHECK_MSG(entries == 1, "%d files in the save folder: a temporary file was left behind", entries);

    /* The session is unchanged and the next save works. */
    CHECK_EQ_SIZE(phi3_session_len(s), len);
    CHECK_OK(phi3_session_save(s, path));
    CHECK_OK(phi3_session_load(m, path, &loaded));
    CHECK_EQ_SIZE(phi3_session_len(loaded), len);

    phi3_session_free(loaded);
    phi3_session_free(s);
    free(before);
    free(after);
    CHECK(unlink(path) == 0);
    CHECK(rmdir(dir) == 0);
}

int main(void)
{
    printf("test_api\n");
    RUN_TEST(test_versions);
    RUN_TEST(test_status_str);
    RUN_TEST(test_free_null_and_init);
    RUN_TEST(test_getters_null);
    RUN_TEST(test_model_load_errors);
    RUN_TEST(test_model_options);
    RUN_TEST(test_model_getters);
    RUN_TEST(test_tokenize);
    RUN_TEST(test_detokenize);
    RUN_TEST(test_session_new_errors);
    RUN_TEST(test_append_errors);
    RUN_TEST(test_token_out_of_range);
    RUN_TEST(test_append_tokens_greedy);
    RUN_TEST(test_context_full);
    RUN_TEST(test_logits_and_tokens_buffers);
    RUN_TEST(test_last_error_cleared);
    RUN_TEST(test_generate_basic);
    RUN_TEST(test_generate_errors_and_struct_size);
    RUN_TEST(test_generate_callback_stop);
    RUN_TEST(test_callback_reentry_is_busy);
    RUN_TEST(test_generate_stop_string);
    RUN_TEST(test_stream_utf8);
    RUN_TEST(test_append_message);
    RUN_TEST(test_model_free_while_session_lives);
    RUN_TEST(test_fork);
    RUN_TEST(test_truncate_reset);
    RUN_TEST(test_save_load);
    RUN_TEST(test_cancel_idle);
    RUN_TEST(test_negative_stop_token_id);
    RUN_TEST(test_size_bombs);
    RUN_TEST(test_save_disk_full);
    phi3_model_free(g_demo);
    printf("test_api: all tests passed\n");
    return 0;
}
