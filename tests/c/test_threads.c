/* test_threads.c: libphi3's concurrency contract.
 *
 * - phi3_session_cancel from a second thread while generate runs: PHI3_ERR_CANCELLED, the tokens
 *   generated so far stay, the session stays usable;
 * - two sessions of one model generating at once on two threads give the same tokens as
 *   sequential runs with the same seeds;
 * - a second call on a session that is busy (its generate blocked inside the callback) returns
 *   PHI3_ERR_BUSY from another thread and from inside the callback;
 * - phi3_last_error is per thread.
 * Every wait is bounded, so a broken library fails the test instead of hanging it. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"

#define FIXTURE "tests/fixtures/gqa-longrope-bf16"

/* Used as stop_token_ids with n_stop_token_ids = 0: no stop tokens. */




/* Absolute deadline `seconds` from now, for pthread_cond_timedwait. */
static struct timespec deadline(int seconds)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += seconds;
    return ts;
}

#define WAIT_LIMIT_S 60

/* ---- cancel from another thread -------------------------------------------------------- */

struct cancel_state {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    phi3_session *s;
    size_t tokens_seen;
    int started;    /* the callback saw CANCEL_AFTER tokens */
    int cancelled;  /* the other thread called phi3_session_cancel */
};

#define CANCEL_AFTER 3

static int32_t cancel_cb(void *user_data, const char *utf8, size_t len, int32_t token)
{
    struct cancel_state *st = user_data;
    (void)utf8;
    (void)len;
    if (token == -1)
        return 0;
    pthread_mutex_lock(&st->mu);
    st->tokens_seen++;
    if (st->tokens_seen == CANCEL_AFTER) {
        st->started = 1;
        pthread_cond_broadcast(&st->cv);
    }
    pthread_mutex_unlock(&st->mu);
    return 0; /* never stops by itself: only the cancel can end this generation early */
}

static void *canceller(void *arg)
{
    struct cancel_state *st = arg;
    struct timespec until = deadline(WAIT_LIMIT_S);
    int rc = 0;
    pthread_mutex_lock(&st->mu);
    while (!st->started && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&st->cv, &st->mu, &until);
    pthread_mutex_unlock(&st->mu);
    if (rc == ETIMEDOUT)
        return (void *)"timed out waiting for the generation to start";
    phi3_session_cancel(st->s);
    pthread_mutex_lock(&st->mu);
    st->cancelled = 1;
    pthread_mutex_unlock(&st->mu);
    return NULL;
}

static void test_cancel_from_other_thread(void)
{
    phi3_model *m = NULL;
    phi3_session *s = NULL;
    struct cancel_state st;
    phi3_generate_options o = gen_opts(2000, 0.7f, 1, 5);
    phi3_generate_result r = new_result();
    pthread_t th;
    void *thread_err = NULL;
    size_t len0;

    CHECK_OK(phi3_model_load_demo(NULL, &m));
    CHECK_OK(phi3_session_new(m, NULL, &s));
    CHECK_OK(phi3_session_append_text(s, "Tell me a long story", 20));
    len0 = phi3_session_len(s);

    memset(&st, 0, sizeof st);
    pthread_mutex_init(&st.mu, NULL);
    pthread_cond_init(&st.cv, NULL);
    st.s = s;
    CHECK(pthread_create(&th, NULL, canceller, &st) == 0);

    CHECK_ERR(phi3_session_generate(s, &o, cancel_cb, &st, &r), PHI3_ERR_CANCELLED, NULL);
    CHECK(pthread_join(th, &thread_err) == 0);
    CHECK_MSG(thread_err == NULL, "%s", (const char *)thread_err);
    CHECK(st.cancelled);
    /* *out is filled on cancellation; every token generated so far stays in the session. */
    CHECK(r.finish_reason == PHI3_FINISH_CANCELLED);
    CHECK(r.generated_tokens >= CANCEL_AFTER);
    CHECK(r.generated_tokens < 2000);
    CHECK_EQ_SIZE(r.generated_tokens, st.tokens_seen);
    CHECK_EQ_SIZE(phi3_session_len(s), len0 + r.generated_tokens);

    /* The session stays usable, and a cancel does not stick to the next call. */
    {
        size_t len1, n = 0;
        int32_t *t;
        phi3_generate_options o2 = gen_opts(4, 0.0f, 1, 0);
        r = new_result();
        CHECK_OK(phi3_session_append_text(s, " and then", 9));
        len1 = phi3_session_len(s);
        CHECK_OK(phi3_session_generate(s, &o2, NULL, NULL, &r));
        CHECK(r.finish_reason == PHI3_FINISH_LENGTH);
        CHECK_EQ_SIZE(r.generated_tokens, 4);
        t = session_tokens(s, &n);
        CHECK_EQ_SIZE(n, len1 + 4);
        free(t);
    }

    pthread_cond_destroy(&st.cv);
    pthread_mutex_destroy(&st.mu);
    phi3_session_free(s);
    phi3_model_free(m);
}

/* ---- two sessions generating at once ---------------------------------------------------- */

struct gen_job {
    phi3_model *m;
    const char *prompt;
    uint64_t seed;
    pthread_barrier_t *start; /* NULL: run at once */
    int32_t *tokens;          /* out: the session's tokens after generate */
    size_t n_tokens;
    phi3_status status;
    char error[256];
};

#define JOB_TOKENS 16

static void *gen_job_run(void *arg)
{
    struct gen_job *j = arg;
    phi3_session *s = NULL;
    phi3_generate_options o = gen_opts(JOB_TOKENS, 1.0f, 1, j->seed);
    size_t need = 0;

    j->status = phi3_session_new(j->m, NULL, &s);
    if (j->status == PHI3_OK)
        j->status = phi3_session_append_text(s, j->prompt, strlen(j->prompt));
    if (j->start)
        pthread_barrier_wait(j->start);
    if (j->status == PHI3_OK)
        j->status = phi3_session_generate(s, &o, NULL, NULL, NULL);
    if (j->status == PHI3_OK) {
        (void)phi3_session_tokens(s, NULL, 0, &need);
        j->tokens = malloc((need ? need : 1) * sizeof *j->tokens);
        j->status = phi3_session_tokens(s, j->tokens, need, &j->n_tokens);
    }
    snprintf(j->error, sizeof j->error, "%s", phi3_last_error());
    phi3_session_free(s);
    return NULL;
}

static void check_job(const struct gen_job *j)
{
    CHECK_MSG(j->status == PHI3_OK, "job \"%s\": status %d: %s", j->prompt, (int)j->status,
              j->error);
    CHECK(j->n_tokens > JOB_TOKENS);
}

static void test_two_sessions_two_threads(void)
{
    phi3_model *m = NULL;
    struct gen_job seq[2], par[2];
    pthread_t th[2];
    pthread_barrier_t start;
    int i;
    const char *prompts[2] = {"The river at night", "A quiet garden in the morning"};

    CHECK_OK(phi3_model_load_demo(NULL, &m));
    memset(seq, 0, sizeof seq);
    memset(par, 0, sizeof par);
    for (i = 0; i < 2; i++) {
        seq[i].m = par[i].m = m;
        seq[i].prompt = par[i].prompt = prompts[i];
        seq[i].seed = par[i].seed = (uint64_t)(100 + i);
    }
    /* Sequential reference runs. */
    for (i = 0; i < 2; i++) {
        gen_job_run(&seq[i]);
        check_job(&seq[i]);
    }
    /* The same jobs at once, on two threads sharing the model. */
    CHECK(pthread_barrier_init(&start, NULL, 2) == 0);
    for (i = 0; i < 2; i++) {
        par[i].start = &start;
        CHECK(pthread_create(&th[i], NULL, gen_job_run, &par[i]) == 0);
    }
    for (i = 0; i < 2; i++)
        CHECK(pthread_join(th[i], NULL) == 0);
    pthread_barrier_destroy(&start);
    /* The model may be freed while other threads' sessions... are done here; free it now. */
    phi3_model_free(m);
    for (i = 0; i < 2; i++) {
        check_job(&par[i]);
        CHECK_EQ_SIZE(par[i].n_tokens, seq[i].n_tokens);
        CHECK_MSG(memcmp(par[i].tokens, seq[i].tokens, seq[i].n_tokens * sizeof(int32_t)) == 0,
                  "job %d: concurrent tokens differ from the sequential run", i);
        free(par[i].tokens);
        free(seq[i].tokens);
    }
    /* Different prompts and seeds: different continuations (the threads did not mix state). */
    CHECK(seq[0].n_tokens != seq[1].n_tokens ||
          memcmp(seq[0].tokens, seq[1].tokens, seq[0].n_tokens * sizeof(int32_t)) != 0);
}

/* ---- PHI3_ERR_BUSY ---------------------------------------------------------------------- */

struct busy_state {
    phi3_session *s;
    pthread_barrier_t inside;  /* the generating thread is blocked inside its callback */
    pthread_barrier_t release; /* the other thread is done probing */
    int blocked_once;
    phi3_status reentrant_status; /* a call into the same session from inside the callback */
    char reentrant_error[256];
};

static int32_t busy_cb(void *user_data, const char *utf8, size_t len, int32_t token)
{
    struct busy_state *b = user_data;
    (void)utf8;
    (void)len;
    if (token == -1 || b->blocked_once)
        return 0;
    b->blocked_once = 1;
    /* Re-entering the same session from its own callback is refused, not a deadlock or UB. */
    b->reentrant_status = phi3_session_append_text(b->s, "x", 1);
    snprintf(b->reentrant_error, sizeof b->reentrant_error, "%s", phi3_last_error());
    pthread_barrier_wait(&b->inside);
    pthread_barrier_wait(&b->release);
    return 0;
}

struct busy_gen {
    struct busy_state *b;
    phi3_status status;
    phi3_generate_result r;
};

static void *busy_generate(void *arg)
{
    struct busy_gen *g = arg;
    phi3_generate_options o = gen_opts(5, 0.0f, 1, 0);
    g->r = new_result();
    g->status = phi3_session_generate(g->b->s, &o, busy_cb, g->b, &g->r);
    return NULL;
}

static void test_busy(void)
{
    phi3_model *m = NULL;
    phi3_session *fork = (phi3_session *)(uintptr_t)0x10;
    struct busy_state b;
    struct busy_gen g;
    pthread_t th;
    size_t len0, got = 0;
    int32_t tok = 5;
    float logit;
    int32_t toks[4];
    char path[64];

    CHECK_OK(phi3_model_load_demo(NULL, &m));
    memset(&b, 0, sizeof b);
    memset(&g, 0, sizeof g);
    CHECK_OK(phi3_session_new(m, NULL, &b.s));
    CHECK_OK(phi3_session_append_text(b.s, "Hello there", 11));
    len0 = phi3_session_len(b.s);
    CHECK(pthread_barrier_init(&b.inside, NULL, 2) == 0);
    CHECK(pthread_barrier_init(&b.release, NULL, 2) == 0);
    g.b = &b;
    CHECK(pthread_create(&th, NULL, busy_generate, &g) == 0);

    pthread_barrier_wait(&b.inside);
    /* The session is inside generate on the other thread: every call is refused with BUSY. */
    CHECK_ERR(phi3_session_append_text(b.s, " more", 5), PHI3_ERR_BUSY, NULL);
    CHECK_ERR(phi3_session_append_tokens(b.s, &tok, 1), PHI3_ERR_BUSY, NULL);
    CHECK_ERR(phi3_session_append_message(b.s, "user", "hi"), PHI3_ERR_BUSY, NULL);
    CHECK_ERR(phi3_session_logits(b.s, &logit, 1, &got), PHI3_ERR_BUSY, NULL);
    CHECK_ERR(phi3_session_tokens(b.s, toks, 4, &got), PHI3_ERR_BUSY, NULL);
    CHECK_ERR(phi3_session_truncate(b.s, 1), PHI3_ERR_BUSY, NULL);
    CHECK_ERR(phi3_session_reset(b.s), PHI3_ERR_BUSY, NULL);
    CHECK_ERR(phi3_session_fork(b.s, &fork), PHI3_ERR_BUSY, NULL);
    CHECK(fork == (phi3_session *)(uintptr_t)0x10);
    snprintf(path, sizeof path, "/tmp/phi3-c-busy-never-written.session");
    CHECK_ERR(phi3_session_save(b.s, path), PHI3_ERR_BUSY, NULL);
    CHECK_ERR(phi3_session_generate(b.s, NULL, NULL, NULL, NULL), PHI3_ERR_BUSY, NULL);
    /* Getters answer without waiting (the length as of the last completed call). */
    {
        size_t len = phi3_session_len(b.s);
        CHECK(len >= len0 && len <= len0 + 5);
    }
    pthread_barrier_wait(&b.release);
    CHECK(pthread_join(th, NULL) == 0);

    CHECK_MSG(b.reentrant_status == PHI3_ERR_BUSY, "re-entrant call returned %d: %s",
              (int)b.reentrant_status, b.reentrant_error);
    CHECK_MSG(g.status == PHI3_OK, "generate returned %d", (int)g.status);
    CHECK(g.r.finish_reason == PHI3_FINISH_LENGTH);
    CHECK_EQ_SIZE(g.r.generated_tokens, 5);
    /* None of the refused calls changed the session; it is usable again. */
    CHECK_EQ_SIZE(phi3_session_len(b.s), len0 + 5);
    CHECK_OK(phi3_session_append_text(b.s, " more", 5));
    CHECK_OK(phi3_session_fork(b.s, &fork));
    CHECK(phi3_session_len(fork) == phi3_session_len(b.s));

    pthread_barrier_destroy(&b.inside);
    pthread_barrier_destroy(&b.release);
    phi3_session_free(fork);
    phi3_session_free(b.s);
    phi3_model_free(m);
}

/* ---- thread-local last error ------------------------------------------------------------ */

struct tl_job {
    phi3_model *m;
    int initially_empty;
    int ok_then_empty;
};

static void *tl_run(void *arg)
{
    struct tl_job *j = arg;
    phi3_session *s = NULL;
    j->initially_empty = phi3_last_error() != NULL && phi3_last_error()[0] == '\0';
    j->ok_then_empty = phi3_session_new(j->m, NULL, &s) == PHI3_OK && phi3_last_error()[0] == '\0';
    phi3_session_free(s);
    return NULL;
}

static void test_last_error_is_per_thread(void)
{
    phi3_model *m = NULL;
    phi3_model *none = NULL;
    struct tl_job j;
    pthread_t th;
    char before[256];

    CHECK_OK(phi3_model_load(FIXTURE, NULL, &m));
    CHECK_ERR(phi3_model_load("tests/fixtures/does-not-exist", NULL, &none), PHI3_ERR_IO, NULL);
    snprintf(before, sizeof before, "%s", phi3_last_error());
    memset(&j, 0, sizeof j);
    j.m = m;
    CHECK(pthread_create(&th, NULL, tl_run, &j) == 0);
    CHECK(pthread_join(th, NULL) == 0);
    CHECK(j.initially_empty);
    CHECK(j.ok_then_empty);
    CHECK_STREQ(phi3_last_error(), before);
    phi3_model_free(m);
}

int main(void)
{
    printf("test_threads\n");
    RUN_TEST(test_last_error_is_per_thread);
    RUN_TEST(test_cancel_from_other_thread);
    RUN_TEST(test_two_sessions_two_threads);
    RUN_TEST(test_busy);
    printf("test_threads: all tests passed\n");
    return 0;
}
