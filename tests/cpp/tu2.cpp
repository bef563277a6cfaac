// Handle tests: error mapping, move semantics, ownership across model and session, fork, save
// and load, logits and token history.

#include "phi3.hpp"
#include "tests.hpp"

#include <cstdio>
#include <filesystem>
#include <string>
#include <type_traits>
#include <unistd.h>
#include <utility>
#include <vector>

static_assert(!std::is_copy_constructible_v<phi3::Model>, "Model is move-only");
static_assert(!std::is_copy_assignable_v<phi3::Model>, "Model is move-only");
static_assert(std::is_nothrow_move_constructible_v<phi3::Model>, "");
static_assert(std::is_nothrow_move_assignable_v<phi3::Model>, "");
static_assert(!std::is_copy_constructible_v<phi3::Session>, "Session is move-only");
static_assert(!std::is_copy_assignable_v<phi3::Session>, "Session is move-only");
static_assert(std::is_nothrow_move_constructible_v<phi3::Session>, "");
static_assert(std::is_nothrow_move_assignable_v<phi3::Session>, "");
static_assert(std::is_base_of_v<std::runtime_error, phi3::Error>, "");

void test_errors(phi3::Model &model) {
    const std::string missing = "/nonexistent/phi3-model-folder";
    try {
        phi3::Model::load(missing);
        CHECK(!"loading a missing folder succeeded");
    } catch (const phi3::Error &e) {
        CHECK(e.status() == PHI3_ERR_IO);
        CHECK(std::string(e.what()).find("phi3-model-folder") != std::string::npos);
        CHECK(std::string(e.status_name()).find("IO") != std::string::npos);
    }
    // After a success the thread's last error is cleared again.
    CHECK(phi3::Model::demo().vocab_size() == model.vocab_size());
    CHECK(std::string(phi3_last_error()).empty());

    phi3::Session session = model.session();
    session.append_text("Hello");
    const std::vector<int32_t> before = session.tokens();
    CHECK_STATUS(PHI3_ERR_TOKEN_OUT_OF_RANGE, session.append_tokens({1, -5}));
    CHECK_STATUS(PHI3_ERR_TOKEN_OUT_OF_RANGE,
                 session.append_tokens({static_cast<int32_t>(model.vocab_size()) + 100}));
    CHECK(session.tokens() == before); // a failed call leaves the session as it was
    CHECK_STATUS(PHI3_ERR_INVALID_ARGUMENT, session.append_message("user", std::string("a\0b", 3)));
    CHECK_STATUS(PHI3_ERR_IO, phi3::Session::load(model, "/nonexistent/phi3-session.bin"));

    // A null handle is INVALID_ARGUMENT naming the parameter, never a crash.
    phi3::Session empty;
    CHECK_STATUS(PHI3_ERR_INVALID_ARGUMENT, empty.append_text("x"));
    CHECK(empty.size() == 0);

    // Quantized weights through the options; an unknown format is INVALID_ARGUMENT.
    phi3::ModelOptions int8;
    int8.weights = "int8";
    phi3::Session quantized = phi3::Model::demo(int8).session();
    quantized.append_text("Hello");
    CHECK(quantized.size() > 0);
    phi3::ModelOptions bad;
    bad.weights = "int3";
    CHECK_STATUS(PHI3_ERR_INVALID_ARGUMENT, phi3::Model::demo(bad));
}

void test_move_semantics(phi3::Model &) {
    phi3::Model a = phi3::Model::demo();
    CHECK(static_cast<bool>(a));
    phi3_model *raw = a.get();
    phi3::Model b(std::move(a));
    CHECK(!a); // NOLINT(bugprone-use-after-move): moved-from is empty by contract
    CHECK(a.get() == nullptr);
    CHECK(b.get() == raw);
    a.reset(); // no-op on an empty handle
    phi3::Model c;
    c = std::move(b);
    CHECK(!b);
    CHECK(c.get() == raw);

    phi3::Session s1 = c.session();
    s1.append_text("Hello");
    phi3_session *raw_session = s1.get();
    phi3::Session s2 = std::move(s1);
    CHECK(!s1);
    CHECK(s2.get() == raw_session);
    CHECK(s2.size() > 0);
    phi3::Session s3 = c.session();
    s3 = std::move(s2); // frees s3's own session, takes s2's
    CHECK(!s2);
    CHECK(s3.get() == raw_session);

    // release() hands the handle over; the wrapper then frees nothing.
    phi3_session *released = s3.release();
    CHECK(!s3);
    phi3_session_free(released);

    std::vector<phi3::Session> many;
    for (int i = 0; i < 4; ++i) {
        many.push_back(c.session()); // reallocation moves the sessions
    }
    for (phi3::Session &s : many) {
        CHECK(static_cast<bool>(s));
    }
}

void test_model_outlives_handle(phi3::Model &) {
    phi3::Session session;
    {
        phi3::Model model = phi3::Model::demo();
        session = model.session();
        session.append_message("user", "Hello");
    } // the wrapper frees its model handle; the session keeps the model alive
    phi3::GenerateOptions options;
    options.max_tokens = 4;
    CHECK(!session.generate(options).tokens.empty());
}

void test_fork_save_load(phi3::Model &model) {
    phi3::Session session = model.session();
    session.append_message("user", "Hello");
    phi3::GenerateOptions options;
    options.max_tokens = 6;
    session.generate(options);
    const std::vector<int32_t> history = session.tokens();
    CHECK(history.size() == session.size());

    phi3::Session fork = session.fork();
    CHECK(fork.tokens() == history);
    const phi3::GenerateResult a = session.generate(options);
    const phi3::GenerateResult b = fork.generate(options);
    CHECK(a.tokens == b.tokens); // greedy from the same state
    CHECK(a.text == b.text);

    const std::filesystem::path path = std::filesystem::temp_directory_path() /
                                       ("phi3-cpp-test-" + std::to_string(getpid()) + ".session");
    fork.save(path.string());
    phi3::Session loaded = phi3::Session::load(model, path.string());
    std::filesystem::remove(path);
    CHECK(loaded.tokens() == fork.tokens());
    const phi3::GenerateResult c = fork.generate(options);
    const phi3::GenerateResult d = loaded.generate(options);
    CHECK(c.tokens == d.tokens);
    CHECK(loaded.logits() == fork.logits());
}

void test_logits_tokens_truncate(phi3::Model &model) {
    phi3::Session session = model.session();
    session.append_text("Hello world");
    std::vector<float> logits = session.logits();
    CHECK(logits.size() == model.vocab_size());
    const std::vector<int32_t> tokens = session.tokens();
    CHECK(tokens.size() == session.size());
    CHECK(tokens.size() >= 2);

    session.truncate(1);
    CHECK(session.size() == 1);
    CHECK(session.tokens() == std::vector<int32_t>(tokens.begin(), tokens.begin() + 1));
    session.append_tokens(std::vector<int32_t>(tokens.begin() + 1, tokens.end()));
    CHECK(session.tokens() == tokens);
    CHECK(session.logits() == logits); // the same history gives the same logits

    session.reset();
    CHECK(session.size() == 0);
    CHECK(session.tokens().empty());
    CHECK(model.max_context() > 0);
}

void test_kv_memory_and_priority(phi3::Model &model) {
    const phi3::KvUsage unlimited = model.kv_usage();
    CHECK(unlimited.block_tokens > 0);
    CHECK(unlimited.block_bytes > 0);
    CHECK(unlimited.max_blocks == 0);

    phi3::ModelOptions options;
    options.kv_memory = 2 * unlimited.block_bytes;
    phi3::Model small = phi3::Model::demo(options);
    CHECK(small.kv_usage().max_blocks == 2);

    phi3::SessionOptions so;
    so.priority = 3;
    phi3::Session session = small.session(so);
    CHECK(session.priority() == 3);
    session.set_priority(-1);
    CHECK(session.priority() == -1);
    std::vector<int32_t> tokens(unlimited.block_tokens * 2, 5);
    session.append_tokens(tokens);
    CHECK(small.kv_usage().blocks_in_use == 2);
    const std::vector<int32_t> before = session.tokens();
    CHECK_STATUS(PHI3_ERR_OUT_OF_MEMORY, session.append_tokens({6}));
    CHECK(session.tokens() == before);
    phi3::Session fork = session.fork(); // copy-on-write: no new blocks
    CHECK(fork.priority() == -1);
    CHECK(small.kv_usage().blocks_in_use == 2);

    options.kv_memory = 1;
    CHECK_STATUS(PHI3_ERR_INVALID_ARGUMENT, phi3::Model::demo(options));

    // A prompt of several prefill chunks; a chunk above 65536 tokens is refused.
    phi3::ModelOptions chunked;
    chunked.device = "cpu";
    chunked.prefill_chunk = 5;
    phi3::Model by_fives = phi3::Model::demo(chunked);
    phi3::Session s = by_fives.session();
    s.append_tokens({3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14});
    CHECK(s.tokens().size() == 12);
    chunked.prefill_chunk = 65537;
    CHECK_STATUS(PHI3_ERR_INVALID_ARGUMENT, phi3::Model::demo(chunked));
}
