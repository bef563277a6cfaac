/* soak.c: thousands of short generations on one model through the C API; resident memory,
 * open file descriptors and threads must stay flat once warmed up.
 *
 * Each iteration creates a session (sometimes with a small max context), appends text or chat
 * messages, generates a few tokens with varied options (greedy, seeded sampling, stop strings,
 * stop ids, a callback that stops early), now and then forks, saves and loads, truncates, reads
 * logits, tokenizes, provokes errors (so the thread-local error message is exercised), and frees
 * everything. Every 50th iteration runs on a fresh thread, so per-thread state (the last error
 * message) is created and destroyed too.
 *
 * Input texts come from a pool of TEXT_POOL texts that the warm-up goes through: the BPE model of
 * HF `tokenizers` caches the tokens of up to 10,000 distinct inputs shorter than 256 bytes (by
 * design, bounded), and with all-distinct texts that cache grows RSS by ~3 KiB per iteration for
 * thousands of iterations, which is not what this test looks for.
 *
 * Measured: resident set size (/proc/self/statm, after malloc_trim), open descriptors
 * (/proc/self/fd) and threads (/proc/self/status) after the warm-up and at CHECKPOINTS
 * checkpoints. Checked: descriptors and threads exactly as after the warm-up, and the RSS growth
 * (mean of the last three checkpoints minus mean of the first three, to average out allocator
 * noise) at most PHI3_SOAK_MAX_GROWTH_KB (default 4096 KiB). Why that bound: between checkpoints
 * RSS moves by up to ~1 MiB without a trend (glibc free lists and arenas); a leaked session keeps
 * its KV cache (4 KiB per token, ~100 KiB for a short chat) and exceeds the bound within a few
 * dozen iterations, and any leak of 2 KiB or more per iteration (a logits buffer is 6 KiB)
 * exceeds it over 2000. Smaller leaks are LeakSanitizer's job (test_api.c and test_threads.c run
 * under it).
 *
 * Built without ASan (its quarantine and shadow memory distort RSS): run.sh builds it with -O1
 * against the debug libphi3.so, whose engine is optimised (Cargo.toml's profile.dev settings),
 * so no extra release build is needed. Environment: PHI3_SOAK_ITERS (default 2000),
 * PHI3_SOAK_WARMUP (default 200), PHI3_SOAK_MAX_GROWTH_KB. */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "check.h"

#define CHECKPOINTS 10
/* Distinct texts: see the header comment. */
#define TEXT_POOL 64

static const char *const WORDS[] = {
    "the",   "cat",     "sat",      "on",     "a",     "mat",    "and",  "then",
    "story", "river",   "morning",  "hello",  "world", "quiet",  "café", "\xF0\x9F\x98\x80",
    "water", "running", "tomorrow", "bridge", "under", "garden", "1234", "?",
};
#define N_WORDS (sizeof WORDS / sizeof WORDS[0])

/* xorshift64*: the soak's own deterministic choices. */
static uint64_t next_rand(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static size_t below(uint64_t *state, size_t n)
{
    return (size_t)(next_rand(state) % n);
}

/* One of TEXT_POOL texts of 1 to 16 words into `buf` (NUL-terminated). */
static void random_text(uint64_t *r, char *buf, size_t cap)
{
    size_t used = 0, i, n;
    uint64_t pick = 1 + below(r, TEXT_POOL);
    n = 1 + below(&pick, 16);
    buf[0] = '\0';
    for (i = 0; i < n; i++) {
        const char *w = WORDS[below(&pick, N_WORDS)];
        int wrote = snprintf(buf + used, cap - used, "%s%s", i ? " " : "", w);
        if (wrote < 0 || (size_t)wrote >= cap - used)
            break;
        used += (size_t)wrote;
    }
}

struct stop_after {
    size_t seen, limit;
};

static int32_t stop_cb(void *user_data, const char *utf8, size_t len, int32_t token)
{
    struct stop_after *st = user_data;
    (void)utf8;
    (void)len;
    if (token < 0)
        return 0;
    return ++st->seen >= st->limit;
}

static void generate_some(phi3_session *s, uint64_t *r)
{
    static const char *const stops[] = {"e", "the", "\n"};
    phi3_generate_options o;
    phi3_generate_result res = new_result();
    struct stop_after st = {0, 1 + below(r, 4)};
    int use_cb = below(r, 4) == 0;
    phi3_status status;

    phi3_generate_options_init(&o);
    o.max_tokens = (uint32_t)(1 + below(r, 8));
    if (below(r, 2)) {
        o.temperature = 0.8f;
        o.has_seed = 1;
        o.seed = next_rand(r);
        o.top_k = below(r, 2) ? 20 : 0;
        o.top_p = below(r, 2) ? 0.9f : 1.0f;
    }
    if (below(r, 5) == 0)
        o.repetition_penalty = 1.2f;
    if (below(r, 5) == 0) {
        o.stop = &stops[below(r, 3)];
        o.n_stop = 1;
    }
    if (below(r, 2)) {
        o.stop_token_ids = NO_STOP_IDS;
        o.n_stop_token_ids = 0;
    }
    status = phi3_session_generate(s, &o, use_cb ? stop_cb : NULL, &st, &res);
    /* A session near its max context may fill up (its assistant prompt does not fit). */
    CHECK_MSG(status == PHI3_OK || status == PHI3_ERR_CONTEXT_FULL, "generate returned %d: %s",
              (int)status, phi3_last_error());
    if (status == PHI3_OK)
        CHECK(res.generated_tokens <= o.max_tokens);
}

/* One iteration: a session's whole life. `path` is this process's scratch session file. */
static void iteration(phi3_model *m, uint64_t seed, const char *path)
{
    uint64_t r = seed * 0x9E3779B97F4A7C15ULL + 1;
    phi3_session_options so;
    phi3_session *s = NULL;
    char text[512];
    size_t len, i, n_msgs;
    phi3_status status;

    phi3_session_options_init(&so);
    so.max_context = below(&r, 4) == 0 ? 48 : 0;
    CHECK_OK(phi3_session_new(m, &so, &s));

    if (below(&r, 2)) {
        random_text(&r, text, sizeof text);
        status = phi3_session_append_text(s, text, strlen(text));
        CHECK(status == PHI3_OK || status == PHI3_ERR_CONTEXT_FULL);
    }
    n_msgs = 1 + below(&r, 2);
    for (i = 0; i < n_msgs; i++) {
        random_text(&r, text, sizeof text);
        status = phi3_session_append_message(s, i % 2 ? "assistant" : "user", text);
        CHECK(status == PHI3_OK || status == PHI3_ERR_CONTEXT_FULL);
    }
    if (phi3_session_len(s) > 0)
        generate_some(s, &r);

    switch (below(&r, 8)) {
    case 0: { /* fork, continue both */
        phi3_session *f = NULL;
        CHECK_OK(phi3_session_fork(s, &f));
        status = phi3_session_append_message(f, "user", "and then?");
        CHECK(status == PHI3_OK || status == PHI3_ERR_CONTEXT_FULL);
        generate_some(f, &r);
        phi3_session_free(f);
        break;
    }
    case 1: { /* save, load, continue the loaded copy */
        phi3_session *l = NULL;
        CHECK_OK(phi3_session_save(s, path));
        CHECK_OK(phi3_session_load(m, path, &l));
        CHECK_EQ_SIZE(phi3_session_len(l), phi3_session_len(s));
        if (phi3_session_len(l) > 0)
            generate_some(l, &r);
        phi3_session_free(l);
        break;
    }
    case 2: /* rewind and go on */
        len = phi3_session_len(s);
        CHECK_OK(phi3_session_truncate(s, len / 2));
        if (len / 2 > 0)
            generate_some(s, &r);
        break;
    case 3: { /* read the logits */
        float *logits = xmalloc(phi3_model_vocab_size(m) * sizeof *logits);
        size_t got = 0;
        if (phi3_session_len(s) > 0) {
            CHECK_OK(phi3_session_logits(s, logits, phi3_model_vocab_size(m), &got));
            CHECK_EQ_SIZE(got, phi3_model_vocab_size(m));
        }
        free(logits);
        break;
    }
    case 4: { /* tokenize and detokenize */
        int32_t ids[256];
        char back[1024];
        size_t n_ids = 0, n_back = 0;
        random_text(&r, text, sizeof text);
        CHECK_OK(phi3_tokenize(m, text, strlen(text), 0, ids, 256, &n_ids));
        CHECK_OK(phi3_detokenize(m, ids, n_ids, back, sizeof back, &n_back));
        break;
    }
    case 5: { /* errors: a bad token id and a truncate past the end, each with a message */
        int32_t bad = (int32_t)phi3_model_vocab_size(m);
        status = phi3_session_append_tokens(s, &bad, 1); /* a full session may say so first */
        CHECK(status == PHI3_ERR_TOKEN_OUT_OF_RANGE || status == PHI3_ERR_CONTEXT_FULL);
        CHECK(phi3_last_error()[0] != '\0');
        CHECK_ERR(phi3_session_truncate(s, phi3_session_len(s) + 1), PHI3_ERR_INVALID_ARGUMENT,
                  NULL);
        break;
    }
    case 6:
        CHECK_OK(phi3_session_reset(s));
        break;
    default:
        break;
    }
    phi3_session_free(s);
}

struct thread_job {
    phi3_model *m;
    uint64_t seed;
    const char *path;
};

static void *thread_iteration(void *arg)
{
    struct thread_job *j = arg;
    iteration(j->m, j->seed, j->path);
    return NULL;
}

static void run_iteration(phi3_model *m, uint64_t seed, const char *path)
{
    if (seed % 50 == 0) {
        pthread_t th;
        struct thread_job j = {m, seed, path};
        CHECK(pthread_create(&th, NULL, thread_iteration, &j) == 0);
        CHECK(pthread_join(th, NULL) == 0);
    } else {
        iteration(m, seed, path);
    }
}

/* ---- measurements ------------------------------------------------------------------------ */

static long rss_kib(void)
{
    long size = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    CHECK(f != NULL);
    CHECK(fscanf(f, "%ld %ld", &size, &resident) == 2);
    fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static int open_fds(void)
{
    int n = 0;
    struct dirent *e;
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL);
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the directory stream itself */
}

static int threads(void)
{
    char line[256];
    int n = -1;
    FILE *f = fopen("/proc/self/status", "r");
    CHECK(f != NULL);
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "Threads: %d", &n) == 1)
            break;
    fclose(f);
    CHECK(n > 0);
    return n;
}

/* Give freed memory back to the OS where the allocator can, so RSS shows what is live. */
static void trim(void)
{
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

static long env_long(const char *name, long fallback)
{
    const char *v = getenv(name);
    char *end;
    long x;
    if (!v || !*v)
        return fallback;
    x = strtol(v, &end, 10);
    CHECK_MSG(*end == '\0' && x >= 0, "%s=%s is not a count", name, v);
    return x;
}

int main(void)
{
    long iters = env_long("PHI3_SOAK_ITERS", 2000);
    long warmup = env_long("PHI3_SOAK_WARMUP", 200);
    long max_growth = env_long("PHI3_SOAK_MAX_GROWTH_KB", 4096);
    long rss[CHECKPOINTS + 1], rss0, growth;
    int fds0, threads0, fds1, threads1, k;
    long i;
    char path[64];
    phi3_model *m = NULL;
    double t0 = check_now(), t1;

    snprintf(path, sizeof path, "/tmp/phi3-soak-%ld.session", (long)getpid());
    printf("soak: %ld iterations after %ld warm-up iterations\n", iters, warmup);
    CHECK_OK(phi3_model_load_demo(NULL, &m));
    for (i = 0; i < warmup; i++)
        run_iteration(m, (uint64_t)i + 1, path);
    trim();
    rss0 = rss_kib();
    fds0 = open_fds();
    threads0 = threads();
    t1 = check_now();
    printf("soak: after warm-up (%.1f s): RSS %ld KiB, %d fds, %d threads\n", t1 - t0, rss0, fds0,
           threads0);

    rss[0] = rss0;
    for (k = 1; k <= CHECKPOINTS; k++) {
        long end = iters * k / CHECKPOINTS;
        for (i = iters * (k - 1) / CHECKPOINTS; i < end; i++)
            run_iteration(m, (uint64_t)(warmup + i) + 1, path);
        trim();
        rss[k] = rss_kib();
        printf("soak: %6ld iterations: RSS %ld KiB (%+ld), %d fds, %d threads\n", end, rss[k],
               rss[k] - rss0, open_fds(), threads());
        fflush(stdout);
    }
    unlink(path);
    phi3_model_free(m);

    fds1 = open_fds();
    threads1 = threads();
    growth = (rss[CHECKPOINTS] + rss[CHECKPOINTS - 1] + rss[CHECKPOINTS - 2] - rss[0] - rss[1] -
              rss[2]) /
             3;
    printf("soak: %ld iterations in %.1f s (%.2f ms each): RSS %ld KiB after the warm-up, %ld KiB "
           "at the end, growth %+ld KiB (bound %ld); fds %d -> %d, threads %d -> %d\n",
           iters, check_now() - t1, iters ? (check_now() - t1) * 1e3 / (double)iters : 0.0, rss0,
           rss[CHECKPOINTS], growth, max_growth, fds0, fds1, threads0, threads1);
    CHECK_MSG(growth <= max_growth, "RSS grew by %ld KiB after the warm-up (bound %ld KiB)",
              growth, max_growth);
    CHECK_MSG(fds1 == fds0, "open file descriptors: %d after the warm-up, %d at the end", fds0,
              fds1);
    CHECK_MSG(threads1 == threads0, "threads: %d after the warm-up, %d at the end", threads0,
              threads1);
    printf("soak: passed\n");
    return 0;
}
