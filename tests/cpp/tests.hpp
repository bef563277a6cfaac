// Shared declarations of the C++ wrapper tests. The test bodies live in two translation units
// (tu1.cpp, tu2.cpp) that both include phi3.hpp, and main.cpp includes it a third time, so
// linking the program proves the header is ODR-safe (no non-inline definitions).

#ifndef PHI3_TESTS_HPP
#define PHI3_TESTS_HPP

#include "phi3.hpp"

#include <stdexcept>
#include <string>

/// A failed check: the harness in main.cpp reports it with the test's name.
struct CheckFailed : std::runtime_error {
    using std::runtime_error::runtime_error;
};

#define PHI3_STR2(x) #x
#define PHI3_STR(x) PHI3_STR2(x)
#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            throw CheckFailed(__FILE__ ":" PHI3_STR(__LINE__) ": CHECK(" #cond ")");   \
        }                                                                              \
    } while (0)

/// Runs `body` and checks that it throws phi3::Error with `status`.
template <class F>
void check_status(phi3_status status, F &&body, const char *where) {
    try {
        body();
    } catch (const phi3::Error &e) {
        if (e.status() != status) {
            throw CheckFailed(std::string(where) + ": expected " + phi3::status_name(status) +
                              ", got " + phi3::status_name(e.status()) + " (" + e.what() + ")");
        }
        if (std::string(e.what()).empty()) {
            throw CheckFailed(std::string(where) + ": empty error message");
        }
        return;
    }
    throw CheckFailed(std::string(where) + ": expected phi3::Error " + phi3::status_name(status));
}
#define CHECK_STATUS(status, ...) \
    check_status(status, [&] { __VA_ARGS__; }, __FILE__ ":" PHI3_STR(__LINE__))

// tu1.cpp
void test_generate_streams(phi3::Model &model);
void test_callback_stops(phi3::Model &model);
void test_callback_exception(phi3::Model &model);
void test_callback_exception_edges(phi3::Model &model);
void test_cancel(phi3::Model &model);
void test_threads_busy_and_cancel(phi3::Model &model);
void test_generate_options_defaults(phi3::Model &model);
void test_tokenize_roundtrip(phi3::Model &model);

// tu2.cpp
void test_errors(phi3::Model &model);
void test_move_semantics(phi3::Model &model);
void test_model_outlives_handle(phi3::Model &model);
void test_fork_save_load(phi3::Model &model);
void test_logits_tokens_truncate(phi3::Model &model);
void test_kv_memory_and_priority(phi3::Model &model);

#endif
