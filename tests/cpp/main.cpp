// The C++ wrapper test program: runs every test against the built-in demo model and prints one
// line per test, then "C++: N passed, M failed". Exit status 1 when any test failed.

#include "phi3.hpp"
#include "tests.hpp"

#include <cstdio>
#include <exception>

namespace {

struct Test {
    const char *name;
    void (*run)(phi3::Model &);
};

const Test tests[] = {
    {"generate_streams", test_generate_streams},
    {"callback_stops", test_callback_stops},
    {"callback_exception", test_callback_exception},
    {"callback_exception_edges", test_callback_exception_edges},
    {"cancel", test_cancel},
    {"threads_busy_and_cancel", test_threads_busy_and_cancel},
    {"generate_options_defaults", test_generate_options_defaults},
    {"tokenize_roundtrip", test_tokenize_roundtrip},
    {"errors", test_errors},
    {"move_semantics", test_move_semantics},
    {"model_outlives_handle", test_model_outlives_handle},
    {"fork_save_load", test_fork_save_load},
    {"logits_tokens_truncate", test_logits_tokens_truncate},
    {"kv_memory_and_priority", test_kv_memory_and_priority},
};

} // namespace

int main() {
    int passed = 0;
    int failed = 0;
    try {
        phi3::Model model = phi3::Model::demo();
        for (const Test &t : tests) {
            try {
                t.run(model);
                std::printf("ok     %s\n", t.name);
                ++passed;
            } catch (const phi3::Error &e) {
                std::printf("FAILED %s: phi3::Error %s: %s\n", t.name, e.status_name(), e.what());
                ++failed;
            } catch (const std::exception &e) {
                std::printf("FAILED %s: %s\n", t.name, e.what());
                ++failed;
            } catch (...) {
                std::printf("FAILED %s: unknown exception\n", t.name);
                ++failed;
            }
            std::fflush(stdout);
        }
    } catch (const std::exception &e) {
        std::printf("FAILED loading the demo model: %s\n", e.what());
        ++failed;
    }
    std::printf("C++: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
