/* chat.c: a minimal chat on libphi3's C API. Reads one user message per line from stdin,
 * streams each reply to stdout and prints a short stats line to stderr. The session (and so its
 * KV cache) is kept across turns.
 *
 *   ./chat [--max-tokens N] [--device DEVICE] [MODEL_DIR]
 *
 * Without MODEL_DIR it uses the built-in demo model (random weights: the replies are
 * gibberish). Build from the repository root:
 *
 *   cargo build -p phi3-capi
 *   cc -std=c99 -Iinclude examples/c/chat.c -Ltarget/debug -lphi3 \
 *      -Wl,-rpath,"$PWD/target/debug" -o chat
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "phi3.h"

/* Print what failed, with the library's message (read before any other phi3 call). */
static int fail(const char *what, phi3_status st)
{
    fprintf(stderr, "chat: %s: %s: %s\n", what, phi3_status_str(st), phi3_last_error());
    return 1;
}

/* Streams each piece of the reply as it is generated. */
static int32_t print_piece(void *user_data, const char *utf8, size_t len, int32_t token)
{
    (void)user_data;
    (void)token;
    if (len > 0) {
        if (fwrite(utf8, 1, len, stdout) != len)
            return 1; /* stdout is gone (e.g. a closed pipe): stop generating */
        fflush(stdout);
    }
    return 0;
}

static const char *finish_name(int32_t reason)
{
    switch (reason) {
    case PHI3_FINISH_EOS: return "end of reply";
    case PHI3_FINISH_STOP_STRING: return "stop string";
    case PHI3_FINISH_LENGTH: return "length limit";
    case PHI3_FINISH_CALLBACK: return "stopped";
    case PHI3_FINISH_CANCELLED: return "cancelled";
    default: return "unknown";
    }
}

static void usage(FILE *to)
{
    fprintf(to, "usage: chat [--max-tokens N] [--device DEVICE] [MODEL_DIR]\n"
                "One user message per line of stdin; without MODEL_DIR the built-in demo model.\n");
}

/* Remove a trailing newline (and a CR before it); return the new length. */
static size_t chomp(char *line, size_t len)
{
    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
        line[--len] = '\0';
    return len;
}

int main(int argc, char **argv)
{
    const char *model_dir = NULL;
    const char *device = NULL;
    unsigned long max_tokens = 256;
    phi3_model_options mo;
    phi3_generate_options go;
    phi3_model *model = NULL;
    phi3_session *session = NULL;
    phi3_status st;
    char *line = NULL;
    size_t line_cap = 0;
    ssize_t got;
    int status = 0, i;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--max-tokens") == 0 && i + 1 < argc) {
            char *end = NULL;
            max_tokens = strtoul(argv[++i], &end, 10);
            if (!end || *end != '\0' || max_tokens == 0 || max_tokens > 1000000) {
                fprintf(stderr, "chat: --max-tokens needs a positive number\n");
                return 2;
            }
        } else if (strcmp(argv[i], "--device") == 0 && i + 1 < argc) {
            device = argv[++i];
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (argv[i][0] == '-' || model_dir) {
            usage(stderr);
            return 2;
        } else {
            model_dir = argv[i];
        }
    }

    if (phi3_abi_version() != PHI3_ABI_VERSION) {
        fprintf(stderr, "chat: libphi3 has ABI version %u, this program was built for %u\n",
                (unsigned)phi3_abi_version(), (unsigned)PHI3_ABI_VERSION);
        return 1;
    }

    phi3_model_options_init(&mo);
    mo.device = device; /* NULL: "auto" */
    st = model_dir ? phi3_model_load(model_dir, &mo, &model) : phi3_model_load_demo(&mo, &model);
    if (st != PHI3_OK)
        return fail(model_dir ? model_dir : "demo model", st);
    if (!model_dir)
        fprintf(stderr, "chat: using the built-in demo model (random weights)\n");

    st = phi3_session_new(model, NULL, &session);
    phi3_model_free(model); /* the session keeps the model alive */
    model = NULL;
    if (st != PHI3_OK)
        return fail("new session", st);

    phi3_generate_options_init(&go);
    go.max_tokens = (uint32_t)max_tokens;

    while ((got = getline(&line, &line_cap, stdin)) != -1) {
        phi3_generate_result result;
        size_t len = chomp(line, (size_t)got);
        if (len == 0 || strspn(line, " \t") == len)
            continue;
        if (strlen(line) != len) {
            fprintf(stderr, "chat: skipping a line with a NUL byte\n");
            continue;
        }

        st = phi3_session_append_message(session, "user", line);
        if (st == PHI3_ERR_CONTEXT_FULL) {
            /* Start a new conversation rather than give up. */
            fprintf(stderr, "chat: the context is full; starting a new conversation\n");
            st = phi3_session_reset(session);
            if (st == PHI3_OK)
                st = phi3_session_append_message(session, "user", line);
        }
        if (st != PHI3_OK) {
            status = fail("append message", st);
            break;
        }

        memset(&result, 0, sizeof result);
        result.struct_size = (uint32_t)sizeof result;
        st = phi3_session_generate(session, &go, print_piece, NULL, &result);
        fputc('\n', stdout);
        fflush(stdout);
        if (st != PHI3_OK) {
            status = fail("generate", st);
            break;
        }
        fprintf(stderr,
                "[%lu prompt tokens, %lu generated, first token %.2f s, %.1f tok/s, %s; "
                "%lu tokens in the session]\n",
                (unsigned long)result.prompt_tokens, (unsigned long)result.generated_tokens,
                result.time_to_first_token_s, result.decode_tokens_per_s,
                finish_name(result.finish_reason), (unsigned long)phi3_session_len(session));
    }
    if (status == 0 && ferror(stdin)) {
        perror("chat: reading stdin");
        status = 1;
    }

    free(line);
    phi3_session_free(session);
    return status;
}
