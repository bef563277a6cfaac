/* A tiny assertion framework for the C tests of libphi3.
 *
 * Every check prints the failing expression, file, line and phi3_last_error(), then exits 1.
 * CHECK_OK also checks that phi3_last_error() is "" after the success, so every successful call
 * in the tests checks that contract too. Header-only: each test program includes it once. */
#ifndef PHI3_TEST_CHECK_H
#define PHI3_TEST_CHECK_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h> /* _exit; includers define _POSIX_C_SOURCE */

#include "phi3.h"

/* phi3_last_error() is valid only until the next phi3 call on this thread: copy it first. */
static inline void check_fail(const char *file, int line, const char *expr, const char *fmt, ...)
{
    char last[1024];
    const char *e = phi3_last_error();
    snprintf(last, sizeof last, "%s", e ? e : "(NULL)");
    fprintf(stderr, "%s:%d: check failed: %s\n", file, line, expr);
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        fputs("    ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
    }
    fprintf(stderr, "    phi3_last_error(): \"%s\"\n", last);
    fflush(stdout);
    fflush(stderr);
    /* _exit: skip LeakSanitizer's exit-time report, which would only list the handles the
     * failed test still held and bury the message above. */
    _exit(1);
}

static inline const char *check_status_name(phi3_status st)
{
    const char *s = phi3_status_str(st);
    return s ? s : "(NULL)";
}

#define CHECK(expr)                                                                                \
    do {                                                                                           \
        if (!(expr))                                                                               \
            check_fail(__FILE__, __LINE__, #expr, NULL);                                           \
    } while (0)

#define CHECK_MSG(expr, ...)                                                                       \
    do {                                                                                           \
        if (!(expr))                                                                               \
            check_fail(__FILE__, __LINE__, #expr, __VA_ARGS__);                                    \
    } while (0)

/* `call` returns `expected`; on failure the message names both codes. */
#define CHECK_STATUS(call, expected)                                                               \
    do {                                                                                           \
        phi3_status check_st_ = (call);                                                            \
        phi3_status check_ex_ = (expected);                                                        \
        if (check_st_ != check_ex_) {                                                              \
            check_fail(__FILE__, __LINE__, #call, "returned %d (%s), expected %d (%s)",            \
                       (int)check_st_, check_status_name(check_st_), (int)check_ex_,               \
                       check_status_name(check_ex_));                                              \
        }                                                                                          \
    } while (0)

/* `call` succeeds and leaves phi3_last_error() empty. */
#define CHECK_OK(call)                                                                             \
    do {                                                                                           \
        const char *check_le_;                                                                     \
        CHECK_STATUS(call, PHI3_OK);                                                               \
        check_le_ = phi3_last_error();                                                             \
        CHECK_MSG(check_le_ != NULL && check_le_[0] == '\0',                                       \
                  "phi3_last_error() is not \"\" after a success");                                \
    } while (0)

/* `call` fails with `expected` and phi3_last_error() contains `needle` (when not NULL). */
#define CHECK_ERR(call, expected, needle)                                                          \
    do {                                                                                           \
        const char *check_le_;                                                                     \
        const char *check_nd_ = (needle);                                                          \
        CHECK_STATUS(call, expected);                                                              \
        check_le_ = phi3_last_error();                                                             \
        CHECK_MSG(check_le_ != NULL && check_le_[0] != '\0',                                       \
                  "phi3_last_error() is empty after a failure");                                   \
        CHECK_MSG(check_nd_ == NULL || strstr(check_le_, check_nd_) != NULL,                       \
                  "the error message does not mention \"%s\"", check_nd_ ? check_nd_ : "");        \
    } while (0)

/* Whether `msg` contains `word` as a whole identifier (so "m" matches "m is NULL" but not
 * "model"). */
static inline int mentions_word(const char *msg, const char *word)
{
    size_t wl = strlen(word);
    const char *p = msg;
    while ((p = strstr(p, word)) != NULL) {
        int before_ok = (p == msg) || !(p[-1] == '_' || (p[-1] >= 'a' && p[-1] <= 'z') ||
                                        (p[-1] >= 'A' && p[-1] <= 'Z') ||
                                        (p[-1] >= '0' && p[-1] <= '9'));
        char a = p[wl];
        int after_ok = !(a == '_' || (a >= 'a' && a <= 'z') || (a >= 'A' && a <= 'Z') ||
                         (a >= '0' && a <= '9'));
        if (before_ok && after_ok)
            return 1;
        p++;
    }
    return 0;
}

/* Whether `msg` names the parameter `param` (the header's name). The handle and options
 * parameters are one letter in the header (s, m, o); a message may spell them out instead
 * ("session is NULL", "options->struct_size"), which is as clear, so both are accepted. */
static inline int names_param(const char *msg, const char *param)
{
    if (mentions_word(msg, param))
        return 1;
    if (strcmp(param, "s") == 0)
        return mentions_word(msg, "session");
    if (strcmp(param, "m") == 0)
        return mentions_word(msg, "model");
    if (strcmp(param, "o") == 0)
        return mentions_word(msg, "options");
    return 0;
}

/* `call` fails with PHI3_ERR_INVALID_ARGUMENT and its message names the parameter `param` (the
 * header's parameter name) as a whole word. */
#define CHECK_BAD_ARG(call, param)                                                                 \
    do {                                                                                           \
        const char *check_le_;                                                                     \
        CHECK_STATUS(call, PHI3_ERR_INVALID_ARGUMENT);                                             \
        check_le_ = phi3_last_error();                                                             \
        CHECK_MSG(check_le_ != NULL && names_param(check_le_, param),                            \
                  "the error message does not name the parameter \"%s\"", param);                \
    } while (0)

#define CHECK_STREQ(a, b)                                                                          \
    do {                                                                                           \
        const char *check_a_ = (a);                                                                \
        const char *check_b_ = (b);                                                                \
        CHECK_MSG(check_a_ != NULL && check_b_ != NULL && strcmp(check_a_, check_b_) == 0,         \
                  "\"%s\" != \"%s\"", check_a_ ? check_a_ : "(NULL)",                              \
                  check_b_ ? check_b_ : "(NULL)");                                                 \
    } while (0)

#define CHECK_EQ_SIZE(a, b)                                                                        \
    do {                                                                                           \
        size_t check_a_ = (size_t)(a);                                                             \
        size_t check_b_ = (size_t)(b);                                                             \
        CHECK_MSG(check_a_ == check_b_, "%s = %lu, %s = %lu", #a, (unsigned long)check_a_, #b,     \
                  (unsigned long)check_b_);                                                        \
    } while (0)

/* Seconds on a monotonic clock. */
static inline double check_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#define RUN_TEST(fn)                                                                               \
    do {                                                                                           \
        double check_t0_;                                                                          \
        printf("  %-44s", #fn);                                                                    \
        fflush(stdout);                                                                            \
        check_t0_ = check_now();                                                                   \
        fn();                                                                                      \
        printf(" ok (%.2f s)\n", check_now() - check_t0_);                                         \
        fflush(stdout);                                                                            \
    } while (0)

/* Strict UTF-8 check: no overlong forms, no surrogates, nothing above U+10FFFF. */
static inline int is_valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t len, k;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
            cp = c & 0x1Fu;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            cp = c & 0x0Fu;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            cp = c & 0x07u;
        } else {
            return 0;
        }
        if (n - i < len)
            return 0;
        for (k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + k] & 0x3Fu);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10FFFF ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += len;
    }
    return 1;
}

/* ---- phi3 helpers shared by the test programs ------------------------------------------ */

/* Used as stop_token_ids with n_stop_token_ids = 0: "no stop tokens", so generation always runs
 * to max_tokens and the token counts of the tests are exact. */
static const int32_t NO_STOP_IDS[1] = {0};

static inline void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    CHECK(p != NULL);
    return p;
}

/* The session's tokens (malloc'd; *n receives the count). */
static inline int32_t *session_tokens(const phi3_session *s, size_t *n)
{
    size_t need = 0, got = 0;
    int32_t *t;
    phi3_status st = phi3_session_tokens(s, NULL, 0, &need);
    CHECK(st == PHI3_OK || st == PHI3_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ_SIZE(need, phi3_session_len(s));
    t = xmalloc(need * sizeof *t);
    CHECK_OK(phi3_session_tokens(s, t, need, &got));
    CHECK_EQ_SIZE(got, need);
    *n = got;
    return t;
}

/* Generation options with no stop tokens (always runs to max_tokens). */
static inline phi3_generate_options gen_opts(uint32_t max_tokens, float temperature, int has_seed,
                                      uint64_t seed)
{
    phi3_generate_options o;
    phi3_generate_options_init(&o);
    o.max_tokens = max_tokens;
    o.temperature = temperature;
    o.has_seed = has_seed;
    o.seed = seed;
    o.stop_token_ids = NO_STOP_IDS;
    o.n_stop_token_ids = 0;
    return o;
}

/* A result struct with its size set and the other fields poisoned, so a test sees what was written. */
static inline phi3_generate_result new_result(void)
{
    phi3_generate_result r;
    memset(&r, 0xAB, sizeof r);
    r.struct_size = (uint32_t)sizeof r;
    return r;
}


#endif /* PHI3_TEST_CHECK_H */
