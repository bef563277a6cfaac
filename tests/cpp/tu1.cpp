// Generation tests: streaming, stopping from the callback, exceptions through the trampoline,
// cancellation, option defaults, tokenizer round trip.

#include "phi3.hpp"
#include "tests.hpp"

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

/// A user exception type that is not derived from std::exception.
struct NotStd {
    int code;
};

/// A user exception type derived from std::exception, with a payload.
struct CallbackError : std::runtime_error {
    explicit CallbackError(int v) : std::runtime_error("callback failed"), value(v) {}
    int value;
};

phi3::Session chat_session(phi3::Model &model) {
    phi3::Session session = model.session();
    session.append_message("user", "Hello");
    return session;
}

} // namespace

void test_generate_streams(phi3::Model &model) {
    phi3::Session session = chat_session(model);
    phi3::GenerateOptions options;
    options.max_tokens = 16;
    std::string streamed;
    int calls = 0;
    std::vector<int32_t> seen;
    phi3::GenerateResult r = session.generate(options, [&](std::string_view text, int32_t token) {
        streamed.append(text);
        ++calls;
        if (token >= 0) {
            seen.push_back(token);
        }
        return true;
    });
    CHECK(calls > 0);
    CHECK(!streamed.empty());
    CHECK(streamed == r.text);
    CHECK(seen == r.tokens);
    CHECK(!r.tokens.empty());
    CHECK(r.generated_tokens >= r.tokens.size());
    CHECK(r.generated_tokens <= options.max_tokens);
    CHECK(r.prompt_tokens > 0);
    CHECK(session.size() >= r.prompt_tokens + r.tokens.size());

    // Greedy is deterministic: a fresh session gives the same text, also without a callback.
    phi3::Session again = chat_session(model);
    phi3::GenerateResult r2 = again.generate(options);
    CHECK(r2.text == r.text);
    CHECK(r2.tokens == r.tokens);
}

void test_callback_stops(phi3::Model &model) {
    phi3::Session session = chat_session(model);
    phi3::GenerateOptions options;
    options.max_tokens = 32;
    int tokens = 0;
    phi3::GenerateResult r = session.generate(options, [&](std::string_view, int32_t token) {
        if (token >= 0) {
            ++tokens;
        }
        return tokens < 2;
    });
    CHECK(r.finish_reason == phi3::FinishReason::Callback);
    CHECK(tokens == 2);
    CHECK(r.tokens.size() == 2);
}

void test_callback_exception(phi3::Model &model) {
    phi3::Session session = chat_session(model);
    phi3::GenerateOptions options;
    options.max_tokens = 32;

    options.stop_token_ids = std::vector<int32_t>{}; // run to max_tokens: the throw must happen

    // A std::exception-derived type comes back as that type with its payload.
    int calls_after_throw = 0;
    std::vector<int32_t> seen;
    bool thrown = false;
    const CallbackError *thrown_address = nullptr;
    try {
        session.generate(options, [&](std::string_view, int32_t token) -> bool {
            if (thrown) {
                ++calls_after_throw;
            }
            if (token >= 0) {
                seen.push_back(token);
                if (seen.size() == 3) {
                    thrown = true;
                    throw CallbackError(42);
                }
            }
            return true;
        });
        CHECK(!"generate did not rethrow");
    } catch (const CallbackError &e) {
        CHECK(e.value == 42);
        CHECK(std::strcmp(e.what(), "callback failed") == 0);
        thrown_address = &e;
    }
    CHECK(thrown);
    CHECK(thrown_address != nullptr);
    CHECK(calls_after_throw == 0); // the trampoline stops calling the user after a throw

    // The session holds exactly the tokens generated before the throw (after the prompt) ...
    phi3::Session reference = chat_session(model);
    const phi3::GenerateResult full = reference.generate(options);
    const size_t prompt = reference.size() - full.tokens.size();
    const std::vector<int32_t> history = session.tokens();
    CHECK(history.size() == prompt + 3);
    CHECK(std::vector<int32_t>(history.begin() + prompt, history.end()) == seen);
    CHECK(std::vector<int32_t>(full.tokens.begin(), full.tokens.begin() + 3) == seen);

    // ... and is still usable: it generates again, continuing after them.
    const size_t len = session.size();
    phi3::GenerateOptions more;
    more.max_tokens = 4;
    more.stop_token_ids = std::vector<int32_t>{};
    phi3::GenerateResult r = session.generate(more);
    CHECK(r.tokens.size() == 4);
    CHECK(session.size() == len + 4);

    // Any type, not only std::exception.
    try {
        session.generate(more, [](std::string_view, int32_t) -> bool { throw NotStd{7}; });
        CHECK(!"generate did not rethrow");
    } catch (const NotStd &e) {
        CHECK(e.code == 7);
    }
    CHECK(session.generate(more).generated_tokens > 0);
}

void test_callback_exception_edges(phi3::Model &model) {
    phi3::GenerateOptions options;
    options.max_tokens = 8;
    options.stop_token_ids = std::vector<int32_t>{};

    // A phi3::Error thrown inside the callback (here: BUSY from calling into the generating
    // session) comes back as itself, and the session is left usable.
    phi3::Session session = chat_session(model);
    try {
        session.generate(options, [&](std::string_view, int32_t) -> bool {
            session.append_text("re-entrant");
            return true;
        });
        CHECK(!"generate did not rethrow");
    } catch (const phi3::Error &e) {
        CHECK(e.status() == PHI3_ERR_BUSY);
    }
    const size_t len = session.size();
    session.append_text(" more");
    CHECK(session.size() > len);
    CHECK(session.generate(options).tokens.size() == 8);

    // A throw from the final call (token -1, held-back text) is rethrown too, after every token
    // stayed. A stop string of the reply's last character plus an unlikely byte holds that
    // character back until the end.
    phi3::Session a = chat_session(model);
    phi3::Session b = a.fork();
    const phi3::GenerateResult free_run = a.generate(options);
    CHECK(!free_run.text.empty());
    size_t last = free_run.text.size() - 1;
    while (last > 0 && (static_cast<unsigned char>(free_run.text[last]) & 0xC0) == 0x80) {
        --last; // the start of the last UTF-8 character
    }
    phi3::GenerateOptions held = options;
    held.stop = {free_run.text.substr(last) + "\x01"};
    std::vector<int32_t> tokens;
    bool final_call = false;
    try {
        b.generate(held, [&](std::string_view text, int32_t token) -> bool {
            if (token >= 0) {
                tokens.push_back(token);
                return true;
            }
            final_call = true;
            CHECK(text == free_run.text.substr(last));
            throw NotStd{-1};
        });
        CHECK(!"generate did not rethrow");
    } catch (const NotStd &e) {
        CHECK(e.code == -1);
    }
    CHECK(final_call);
    CHECK(tokens == free_run.tokens);
    CHECK(b.tokens() == a.tokens());
    CHECK(b.generate(options).tokens == a.generate(options).tokens); // and goes on as `a` does
}

void test_cancel(phi3::Model &model) {
    phi3::Session session = chat_session(model);
    phi3::GenerateOptions options;
    options.max_tokens = 32;
    int tokens = 0;
    // Cancellation is allowed from any thread at any time, so also from the callback.
    phi3::GenerateResult r = session.generate(options, [&](std::string_view, int32_t token) {
        if (token >= 0 && ++tokens == 2) {
            session.cancel();
        }
        return true;
    });
    CHECK(r.finish_reason == phi3::FinishReason::Cancelled);
    CHECK(tokens >= 2 && tokens < 32);
    // Usable after cancellation.
    phi3::GenerateOptions more;
    more.max_tokens = 3;
    CHECK(session.generate(more).finish_reason != phi3::FinishReason::Cancelled);
}

void test_threads_busy_and_cancel(phi3::Model &model) {
    phi3::Session session = chat_session(model);
    std::atomic<bool> started{false};
    std::atomic<bool> done{false};
    phi3_status seen = PHI3_OK;
    std::string seen_message;
    std::thread other([&] {
        while (!started.load()) {
            std::this_thread::yield();
        }
        // A second call while generate runs on the main thread: BUSY, never UB.
        try {
            session.append_text("more");
        } catch (const phi3::Error &e) {
            seen = e.status();
            seen_message = e.what();
        }
        session.cancel(); // from another thread
        done.store(true);
    });
    phi3::GenerateOptions options;
    options.max_tokens = 200;
    phi3::GenerateResult r;
    try {
        r = session.generate(options, [&](std::string_view, int32_t) {
            started.store(true);
            const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
            while (!done.load() && std::chrono::steady_clock::now() < deadline) {
                std::this_thread::yield();
            }
            return true;
        });
    } catch (...) {
        started.store(true);
        other.join();
        throw;
    }
    other.join();
    CHECK(seen == PHI3_ERR_BUSY);
    CHECK(!seen_message.empty());
    CHECK(r.finish_reason == phi3::FinishReason::Cancelled);
    CHECK(r.tokens.size() < 200);
    // Usable afterwards, and the BUSY call appended nothing.
    const size_t len = session.size();
    session.append_text("more");
    CHECK(session.size() > len);
}

void test_generate_options_defaults(phi3::Model &) {
    phi3_generate_options c;
    std::memset(&c, 0xAB, sizeof c);
    phi3_generate_options_init(&c);
    const phi3::GenerateOptions cpp;
    CHECK(c.struct_size == sizeof(phi3_generate_options));
    CHECK(c.max_tokens == cpp.max_tokens);
    CHECK(c.temperature == cpp.temperature);
    CHECK(c.top_k == cpp.top_k);
    CHECK(c.top_p == cpp.top_p);
    CHECK(c.min_p == cpp.min_p);
    CHECK(c.repetition_penalty == cpp.repetition_penalty);
    CHECK(c.presence_penalty == cpp.presence_penalty);
    CHECK(c.frequency_penalty == cpp.frequency_penalty);
    CHECK(c.has_seed == 0 && !cpp.seed.has_value());
    CHECK(c.stop == nullptr && c.n_stop == 0 && cpp.stop.empty());
    CHECK(c.stop_token_ids == nullptr && !cpp.stop_token_ids.has_value());

    phi3_model_options m;
    phi3_model_options_init(&m);
    const phi3::ModelOptions mcpp;
    CHECK(m.struct_size == sizeof(phi3_model_options));
    CHECK(m.max_context == mcpp.max_context);
    CHECK(m.device == nullptr || mcpp.device == m.device);
    CHECK(phi3::abi_version() == PHI3_ABI_VERSION);
    CHECK(!phi3::version().empty());
}

void test_tokenize_roundtrip(phi3::Model &model) {
    const std::string text = "Hello world, the river is green";
    std::vector<int32_t> ids = model.tokenize(text, false);
    CHECK(!ids.empty());
    CHECK(model.detokenize(ids) == text);
    std::vector<int32_t> with_bos = model.tokenize(text, true);
    CHECK(with_bos.size() == ids.size() + 1);
    CHECK(model.tokenize("", false).empty());
    CHECK(model.detokenize({}).empty());
    // A long text needs a bigger buffer than any first guess: the size query handles it.
    std::string long_text;
    for (int i = 0; i < 200; ++i) {
        long_text += "the moon and the sun ";
    }
    std::vector<int32_t> many = model.tokenize(long_text, false);
    CHECK(many.size() >= 200);
    CHECK(model.detokenize(many) == long_text);
}
