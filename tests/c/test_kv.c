/* test_kv.c: the KV memory budget, copy-on-write forks, session priority and the batching
 * scheduler's counters, through the C API.
 *
 * - phi3_model_options.kv_memory_bytes: a budget below one block fails the load; a session that
 *   outgrows the budget fails with PHI3_ERR_OUT_OF_MEMORY naming KV memory and is left exactly
 *   as it was (length, tokens, logits); truncating another session frees blocks;
 * - kv_wait: a pass short of blocks waits until another thread frees some, and
 *   phi3_session_cancel ends such a wait;
 * - phi3_model_kv_usage: sane numbers, older struct sizes, bad arguments;
 * - structs of the previous versions (before kv_memory_bytes / kv_wait / priority, before
 *   prefill_chunk) still work;
 * - phi3_model_options.prefill_chunk: read when present, out of range is an error;
 * - phi3_session_set_priority / phi3_session_priority.
 * Uses the built-in demo model (CPU). Every wait is bounded. */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"

#define POISON_PTR ((void *)(uintptr_t)0x10)
#define WAIT_LIMIT_S 60

/* ---- helpers ---------------------------------------------------------------------------- */

static phi3_model *load_demo_with(uint64_t kv_memory_bytes, int32_t kv_wait)
{
    phi3_model_options o;
    phi3_model *m = NULL;
    phi3_model_options_init(&o);
    o.device = "cpu";
    o.kv_memory_bytes = kv_memory_bytes;
    o.kv_wait = kv_wait;
    CHECK_OK(phi3_model_load_demo(&o, &m));
    CHECK(m != NULL);
    return m;
}

static phi3_kv_usage kv_usage(const phi3_model *m)
{
    phi3_kv_usage u;
    memset(&u, 0xAB, sizeof u);
    u.struct_size = (uint32_t)sizeof u;
    CHECK_OK(phi3_model_kv_usage(m, &u));
    CHECK(u.struct_size == sizeof u);
    CHECK(u.block_tokens > 0);
    CHECK(u.block_bytes > 0);
    CHECK_MSG(u.blocks_in_use <= u.blocks_allocated, "in use %lu, allocated %lu",
              (unsigned long)u.blocks_in_use, (unsigned long)u.blocks_allocated);
    CHECK(u.max_blocks == 0 || u.blocks_allocated <= u.max_blocks);
    CHECK(u.sequences >= u.steps);
    CHECK(u.max_batch <= u.sequences);
    return u;
}

/* The bytes of one KV block of the demo model on the CPU (from an unlimited load). */
static uint64_t demo_block_bytes(size_t *block_tokens)
{
    phi3_model *m = load_demo_with(0, 0);
    phi3_kv_usage u = kv_usage(m);
    *block_tokens = u.block_tokens;
    phi3_model_free(m);
    return u.block_bytes;
}

/* `n` token ids 5, 6, ... (malloc'd). */
static int32_t *some_tokens(size_t n)
{
    int32_t *t = xmalloc(n * sizeof *t);
    size_t i;
    for (i = 0; i < n; i++)
        t[i] = (int32_t)(5 + i % 200);
    return t;
}

static float *logits_copy(phi3_session *s, size_t vocab)
{
    float *l = xmalloc(vocab * sizeof *l);
    size_t got = 0;
    CHECK_OK(phi3_session_logits(s, l, vocab, &got));
    CHECK_EQ_SIZE(got, vocab);
    return l;
}

static phi3_session *new_session(phi3_model *m)
{
    phi3_session *s = NULL;
    CHECK_OK(phi3_session_new(m, NULL, &s));
    return s;
}

static void sleep_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    nanosleep(&ts, NULL);
}

/* ---- defaults and the previous struct versions ------------------------------------------ */

static void test_option_defaults(void)
{
    phi3_model_options mo;
    phi3_session_options so;
    memset(&mo, 0xAB, sizeof mo);
    phi3_model_options_init(&mo);
    CHECK(mo.struct_size == sizeof mo);
    CHECK(mo.kv_memory_bytes == 0);
    CHECK(mo.kv_wait == 0);
    CHECK(mo.prefill_chunk == 0);
    memset(&so, 0xAB, sizeof so);
    phi3_session_options_init(&so);
    CHECK(so.struct_size == sizeof so);
    CHECK(so.priority == 0);
}

/* A caller built against the header before kv_memory_bytes / kv_wait / priority passes the old
 * struct_size; whatever lies past it (garbage here, which would be an invalid budget) is
 * ignored. */
static void test_previous_struct_versions(void)
{
    phi3_model_options o;
    phi3_session_options so;
    phi3_model *m = (phi3_model *)POISON_PTR;
    phi3_session *s = NULL;
    phi3_kv_usage u;

    phi3_model_options_init(&o);
    o.struct_size = (uint32_t)offsetof(phi3_model_options, kv_memory_bytes);
    o.device = "cpu";
    o.kv_memory_bytes = 1; /* less than a block: an error if it were read */
    o.kv_wait = 0x7eadbeef;
    CHECK_OK(phi3_model_load_demo(&o, &m));
    u = kv_usage(m);
    CHECK(u.max_blocks == 0); /* no budget */

    /* A size that ends inside kv_memory_bytes is no version's size. */
    {
        phi3_model *bad = (phi3_model *)POISON_PTR;
        o.struct_size = (uint32_t)offsetof(phi3_model_options, kv_memory_bytes) + 4;
        CHECK_ERR(phi3_model_load_demo(&o, &bad), PHI3_ERR_INVALID_ARGUMENT, "struct_size");
        CHECK(bad == (phi3_model *)POISON_PTR);
    }
    /* The version before prefill_chunk: garbage there (an invalid chunk) is not read. */
    {
        phi3_model *m2 = NULL;
        o.struct_size = (uint32_t)offsetof(phi3_model_options, prefill_chunk);
        o.kv_memory_bytes = 0;
        o.kv_wait = 0;
        o.prefill_chunk = (size_t)1 << 40;
        CHECK_OK(phi3_model_load_demo(&o, &m2));
        phi3_model_free(m2);
        o.prefill_chunk = 0;
    }
    /* The version with kv_memory_bytes but before kv_wait. */
    {
        phi3_model *m2 = NULL;
        o.struct_size = (uint32_t)offsetof(phi3_model_options, kv_wait);
        o.kv_memory_bytes = 0;
        CHECK_OK(phi3_model_load_demo(&o, &m2));
        phi3_model_free(m2);
    }

    phi3_session_options_init(&so);
    so.struct_size = (uint32_t)offsetof(phi3_session_options, priority);
    so.priority = 0x7eadbeef;
    CHECK_OK(phi3_session_new(m, &so, &s));
    CHECK(phi3_session_priority(s) == 0);
    phi3_session_free(s);

    phi3_model_free(m);
}

/* ---- the KV memory budget ----------------------------------------------------------------- */

static void test_budget_below_one_block(void)
{
    phi3_model_options o;
    phi3_model *m = (phi3_model *)POISON_PTR;
    phi3_model_options_init(&o);
    o.device = "cpu";
    o.kv_memory_bytes = 1;
    CHECK_ERR(phi3_model_load_demo(&o, &m), PHI3_ERR_INVALID_ARGUMENT, "KV");
    CHECK(m == (phi3_model *)POISON_PTR);
}

static void test_out_of_kv_memory(void)
{
    size_t block_tokens = 0;
    const uint64_t block_bytes = demo_block_bytes(&block_tokens);
    /* Two blocks, and a bit that does not make a third. */
    phi3_model *m = load_demo_with(2 * block_bytes + block_bytes / 2, 0);
    const size_t vocab = phi3_model_vocab_size(m);
    const size_t fill = block_tokens + block_tokens / 2; /* two blocks, partly used */
    int32_t *toks = some_tokens(4 * block_tokens);
    phi3_session *a = new_session(m);
    phi3_session *b = new_session(m);
    phi3_session *fork = NULL;
    int32_t *before_tokens, *after_tokens;
    size_t n_before, n_after;
    float *before, *after;
    phi3_kv_usage u;

    u = kv_usage(m);
    CHECK_EQ_SIZE(u.max_blocks, 2);
    CHECK_EQ_SIZE(u.blocks_in_use, 0);

    /* More than the whole budget in one append: out of memory at once, nothing kept. */
    CHECK_ERR(phi3_session_append_tokens(b, toks, 3 * block_tokens), PHI3_ERR_OUT_OF_MEMORY,
              "KV memory");
    CHECK_EQ_SIZE(phi3_session_len(b), 0);
    CHECK_EQ_SIZE(kv_usage(m).blocks_in_use, 0);

    CHECK_OK(phi3_session_append_tokens(a, toks, fill));
    u = kv_usage(m);
    CHECK_EQ_SIZE(u.blocks_in_use, 2);
    CHECK(u.steps >= 1);

    /* Growing past the budget: the error names KV memory, and the session is as it was. */
    before = logits_copy(a, vocab);
    before_tokens = session_tokens(a, &n_before);
    CHECK_ERR(phi3_session_append_tokens(a, toks, block_tokens), PHI3_ERR_OUT_OF_MEMORY,
              "KV memory");
    CHECK_EQ_SIZE(phi3_session_len(a), fill);
    after_tokens = session_tokens(a, &n_after);
    CHECK_EQ_SIZE(n_after, n_before);
    CHECK(memcmp(before_tokens, after_tokens, n_before * sizeof *before_tokens) == 0);
    after = logits_copy(a, vocab);
    CHECK(memcmp(before, after, vocab * sizeof *before) == 0);
    CHECK_EQ_SIZE(kv_usage(m).blocks_in_use, 2);

    /* Generation hits the wall too, through phi3_session_generate. */
    {
        phi3_generate_options go = gen_opts((uint32_t)(2 * block_tokens), 0.0f, 1, 1);
        phi3_generate_result r = new_result();
        CHECK_ERR(phi3_session_generate(a, &go, NULL, NULL, &r), PHI3_ERR_OUT_OF_MEMORY,
                  "KV memory");
        /* The tokens sampled until then stay (the last one pending: its pass failed). */
        CHECK(phi3_session_len(a) > fill && phi3_session_len(a) <= 2 * block_tokens + 1);
        CHECK_OK(phi3_session_truncate(a, fill));
    }

    /* Another session finds no free block either... */
    CHECK_ERR(phi3_session_append_tokens(b, toks, 2), PHI3_ERR_OUT_OF_MEMORY, "KV memory");
    CHECK_EQ_SIZE(phi3_session_len(b), 0);

    /* ...until the first one gives a block back. */
    CHECK_OK(phi3_session_truncate(a, block_tokens / 2));
    CHECK_EQ_SIZE(kv_usage(m).blocks_in_use, 1);
    CHECK_OK(phi3_session_append_tokens(b, toks, 2));
    CHECK_EQ_SIZE(kv_usage(m).blocks_in_use, 2);

    /* A fork shares its parent's blocks: no new memory, even with the budget spent. */
    CHECK_OK(phi3_session_fork(b, &fork));
    CHECK_EQ_SIZE(kv_usage(m).blocks_in_use, 2);
    CHECK_EQ_SIZE(phi3_session_len(fork), 2);

    /* Freeing a session returns its blocks (the fork keeps the shared one alive). */
    phi3_session_free(a);
    CHECK_EQ_SIZE(kv_usage(m).blocks_in_use, 1);
    phi3_session_free(b);
    CHECK_EQ_SIZE(kv_usage(m).blocks_in_use, 1);
    phi3_session_free(fork);
    u = kv_usage(m);
    CHECK_EQ_SIZE(u.blocks_in_use, 0);
    CHECK(u.blocks_allocated <= 2);

    free(before);
    free(after);
    free(before_tokens);
    free(after_tokens);
    free(toks);
    phi3_model_free(m);
}

/* ---- waiting for KV memory ---------------------------------------------------------------- */

struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    phi3_session *s;
    const int32_t *toks;
    size_t n;
    int done;
    phi3_status status;
    char error[512];
};

static void *waiter_run(void *arg)
{
    struct waiter *w = arg;
    phi3_status st = phi3_session_append_tokens(w->s, w->toks, w->n);
    pthread_mutex_lock(&w->mu);
    w->status = st;
    snprintf(w->error, sizeof w->error, "%s", phi3_last_error());
    w->done = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

static void waiter_start(struct waiter *w, pthread_t *t, phi3_session *s, const int32_t *toks,
                         size_t n)
{
    memset(w, 0, sizeof *w);
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->s = s;
    w->toks = toks;
    w->n = n;
    CHECK(pthread_create(t, NULL, waiter_run, w) == 0);
}

static int waiter_done(struct waiter *w)
{
    int done;
    pthread_mutex_lock(&w->mu);
    done = w->done;
    pthread_mutex_unlock(&w->mu);
    return done;
}

/* Wait for the waiter to finish; `cancel` non-NULL: cancel that session again every 20 ms (a
 * cancel that lands before the call starts is cleared by it). */
static void waiter_join(struct waiter *w, pthread_t t, phi3_session *cancel)
{
    double until = check_now() + WAIT_LIMIT_S;
    while (!waiter_done(w)) {
        CHECK_MSG(check_now() < until, "the waiting append did not return within %d s",
                  WAIT_LIMIT_S);
        if (cancel)
            phi3_session_cancel(cancel);
        sleep_ms(20);
    }
    CHECK(pthread_join(t, NULL) == 0);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
}

static void test_kv_wait(void)
{
    size_t block_tokens = 0;
    const uint64_t block_bytes = demo_block_bytes(&block_tokens);
    phi3_model *m = load_demo_with(2 * block_bytes, 1);
    int32_t *toks = some_tokens(4 * block_tokens);
    phi3_session *a = new_session(m);
    phi3_session *b = new_session(m);
    struct waiter w;
    pthread_t t;

    /* More than the budget could ever hold fails at once, also with kv_wait. */
    CHECK_ERR(phi3_session_append_tokens(b, toks, 3 * block_tokens), PHI3_ERR_OUT_OF_MEMORY,
              "KV memory");

    CHECK_OK(phi3_session_append_tokens(a, toks, 2 * block_tokens));
    CHECK_EQ_SIZE(kv_usage(m).blocks_in_use, 2);

    /* b waits for a block; freeing a's blocks from this thread lets it run. */
    waiter_start(&w, &t, b, toks, 3);
    sleep_ms(200);
    CHECK_MSG(!waiter_done(&w), "the append returned %d (%s) instead of waiting for KV memory",
              (int)w.status, w.error);
    CHECK_OK(phi3_session_reset(a));
    waiter_join(&w, t, NULL);
    CHECK_MSG(w.status == PHI3_OK, "status %d: %s", (int)w.status, w.error);
    CHECK_EQ_SIZE(phi3_session_len(b), 3);

    /* A wait ends with PHI3_ERR_CANCELLED when the waiting session is cancelled; unchanged. */
    CHECK_OK(phi3_session_append_tokens(a, toks, block_tokens)); /* a 1 block + b 1: all... */
    waiter_start(&w, &t, b, toks, block_tokens); /* ...and b needs a second one */
    sleep_ms(200);
    CHECK_MSG(!waiter_done(&w), "the append returned %d (%s) instead of waiting for KV memory",
              (int)w.status, w.error);
    waiter_join(&w, t, b);
    CHECK_MSG(w.status == PHI3_ERR_CANCELLED, "status %d: %s", (int)w.status, w.error);
    CHECK_MSG(strstr(w.error, "KV memory") != NULL, "message: %s", w.error);
    CHECK_EQ_SIZE(phi3_session_len(b), 3);
    CHECK_OK(phi3_session_append_tokens(b, toks, 1)); /* still in its own block */
    CHECK_EQ_SIZE(phi3_session_len(b), 4);

    phi3_session_free(a);
    phi3_session_free(b);
    free(toks);
    phi3_model_free(m);
}

/* ---- phi3_model_kv_usage ------------------------------------------------------------------- */

static void test_kv_usage_args(void)
{
    phi3_model *m = load_demo_with(0, 0);
    phi3_session *s = new_session(m);
    int32_t toks[3] = {5, 6, 7};
    phi3_kv_usage u;

    CHECK_BAD_ARG(phi3_model_kv_usage(NULL, &u), "m");
    CHECK_BAD_ARG(phi3_model_kv_usage(m, NULL), "out");

    memset(&u, 0xAB, sizeof u);
    u.struct_size = (uint32_t)sizeof u + 8;
    CHECK_ERR(phi3_model_kv_usage(m, &u), PHI3_ERR_INVALID_ARGUMENT, "struct_size");
    u.struct_size = (uint32_t)offsetof(phi3_kv_usage, block_bytes) + 2;
    CHECK_ERR(phi3_model_kv_usage(m, &u), PHI3_ERR_INVALID_ARGUMENT, "struct_size");

    CHECK_OK(phi3_session_append_tokens(s, toks, 3));
    u = kv_usage(m);
    CHECK_EQ_SIZE(u.blocks_in_use, 1);
    CHECK(u.blocks_allocated >= 1);
    CHECK(u.max_blocks == 0);
    CHECK(u.steps >= 1 && u.sequences >= 1 && u.max_batch >= 1);

    /* An older, smaller struct gets only the fields it has. */
    {
        phi3_kv_usage old;
        unsigned char poison[sizeof old];
        const size_t cut = offsetof(phi3_kv_usage, steps);
        memset(&old, 0xAB, sizeof old);
        memset(poison, 0xAB, sizeof poison);
        old.struct_size = (uint32_t)cut;
        CHECK_OK(phi3_model_kv_usage(m, &old));
        CHECK(old.struct_size == cut);
        CHECK(old.block_tokens == u.block_tokens);
        CHECK(old.blocks_in_use == 1);
        CHECK(memcmp((unsigned char *)&old + cut, poison + cut, sizeof old - cut) == 0);
    }

    phi3_session_free(s);
    phi3_model_free(m);
}

/* ---- priority ------------------------------------------------------------------------------- */

static void test_priority(void)
{
    phi3_model *m = load_demo_with(0, 0);
    phi3_session_options so;
    phi3_session *s = NULL, *fork = NULL;
    int32_t toks[3] = {5, 6, 7};

    phi3_session_options_init(&so);
    so.priority = 5;
    CHECK_OK(phi3_session_new(m, &so, &s));
    CHECK(phi3_session_priority(s) == 5);
    CHECK_OK(phi3_session_set_priority(s, -3));
    CHECK(phi3_session_priority(s) == -3);
    CHECK_OK(phi3_session_append_tokens(s, toks, 3));
    CHECK_OK(phi3_session_fork(s, &fork));
    CHECK(phi3_session_priority(fork) == -3);
    CHECK_OK(phi3_session_set_priority(fork, INT32_MAX));
    CHECK(phi3_session_priority(fork) == INT32_MAX);
    CHECK(phi3_session_priority(s) == -3);

    CHECK_BAD_ARG(phi3_session_set_priority(NULL, 1), "s");
    CHECK(phi3_session_priority(NULL) == 0);

    phi3_session_free(fork);
    phi3_session_free(s);
    phi3_model_free(m);
}

/* prefill_chunk: a small chunk loads and prefills a prompt of several chunks; above 65536 is
 * PHI3_ERR_INVALID_ARGUMENT naming the field. */
static void test_prefill_chunk(void)
{
    phi3_model_options o;
    phi3_model *m = NULL, *bad = (phi3_model *)POISON_PTR;
    phi3_session *s = NULL;
    int32_t prompt[40];
    phi3_model_options_init(&o);
    o.device = "cpu";
    o.prefill_chunk = 65537;
    CHECK_ERR(phi3_model_load_demo(&o, &bad), PHI3_ERR_INVALID_ARGUMENT, "prefill_chunk");
    CHECK(bad == (phi3_model *)POISON_PTR);
    o.prefill_chunk = 7;
    CHECK_OK(phi3_model_load_demo(&o, &m));
    CHECK_OK(phi3_session_new(m, NULL, &s));
    for (int32_t i = 0; i < 40; i++) prompt[i] = 10 + i;
    CHECK_OK(phi3_session_append_tokens(s, prompt, 40));
    phi3_session_free(s);
    phi3_model_free(m);
}

int main(void)
{
    printf("test_kv\n");
    RUN_TEST(test_option_defaults);
    RUN_TEST(test_previous_struct_versions);
    RUN_TEST(test_budget_below_one_block);
    RUN_TEST(test_out_of_kv_memory);
    RUN_TEST(test_kv_wait);
    RUN_TEST(test_kv_usage_args);
    RUN_TEST(test_priority);
    RUN_TEST(test_prefill_chunk);
    printf("test_kv: all tests passed\n");
    return 0;
}
