// phi3.hpp: a header-only C++17 RAII wrapper over the phi3 C API (include/phi3.h).
//
// Ownership: phi3::Model and phi3::Session own one C handle each, are move-only, and free it
// exactly once (a moved-from object holds no handle; its destructor does nothing). A Session keeps
// its model alive on the C side, so a Model may be destroyed before its sessions.
//
// Errors: every failing C call throws phi3::Error, which carries the phi3_status code and the
// message phi3_last_error() gave on the calling thread. A cancelled generate() is not an error:
// it returns normally with FinishReason::Cancelled (a cancelled logits() or append_tokens()
// throws Error with PHI3_ERR_CANCELLED).
//
// Callbacks: Session::generate takes any callable `bool(std::string_view text, int32_t token)`
// (or returning void: never stops). An exception thrown by it never crosses the C boundary: the
// trampoline catches it, stops generation, and generate() rethrows it (same object, same type)
// after phi3_session_generate has returned; the session stays usable.
//
// Threads: a Model may be shared by any number of threads; a Session is used by one thread at a
// time (a concurrent call throws Error with PHI3_ERR_BUSY); Session::cancel may be called from any
// thread.
//
// Everything here is inline or a template, so the header may be included by any number of
// translation units of one program. It depends only on phi3.h and the standard library.

#ifndef PHI3_HPP
#define PHI3_HPP

#include "phi3.h"

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace phi3 {

/// A failed phi3 call: status() is the phi3_status code, what() the library's message.
class Error : public std::runtime_error {
public:
    Error(phi3_status status, const std::string &message)
        : std::runtime_error(message), status_(status) {}

    /// The PHI3_ERR_* code.
    phi3_status status() const noexcept { return status_; }

    /// The code's static name, e.g. "PHI3_ERR_IO" (whatever phi3_status_str returns).
    const char *status_name() const noexcept { return phi3_status_str(status_); }

private:
    phi3_status status_;
};

namespace detail {

/// Throws Error for a non-OK status, with this thread's phi3_last_error() (or the code's name
/// when the library left no message).
inline void check(phi3_status status) {
    if (status == PHI3_OK) {
        return;
    }
    const char *message = phi3_last_error();
    if (message == nullptr || *message == '\0') {
        message = phi3_status_str(status);
    }
    throw Error(status, message != nullptr ? message : "phi3 error");
}

/// Runs a C call of the (out, cap, out_len) shape: asks for the size first, then fills a buffer
/// of that size, repeating while the library answers PHI3_ERR_BUFFER_TOO_SMALL. `call(ptr, cap,
/// &len)` returns a phi3_status.
/// `text` as a NUL-terminated string for a C parameter named `name`; an embedded NUL would
/// silently cut the string short, so it is PHI3_ERR_INVALID_ARGUMENT instead.
inline std::string c_string(std::string_view text, const char *name) {
    if (text.find('\0') != std::string_view::npos) {
        throw Error(PHI3_ERR_INVALID_ARGUMENT, std::string(name) + " contains a NUL byte");
    }
    return std::string(text);
}

template <class T, class Call>
std::vector<T> fill_buffer(Call &&call) {
    std::vector<T> buffer;
    size_t needed = 0;
    phi3_status status = call(static_cast<T *>(nullptr), size_t{0}, &needed);
    while (status == PHI3_ERR_BUFFER_TOO_SMALL) {
        buffer.resize(needed);
        status = call(buffer.data(), buffer.size(), &needed);
    }
    check(status);
    buffer.resize(needed < buffer.size() ? needed : buffer.size());
    return buffer;
}

} // namespace detail

/// The library's version string, e.g. "0.1.0".
inline std::string version() { return phi3_version(); }

/// The ABI version of the loaded library (compare with PHI3_ABI_VERSION of the header).
inline uint32_t abi_version() noexcept { return phi3_abi_version(); }

/// The static name of a status code.
inline std::string status_name(phi3_status status) { return phi3_status_str(status); }

/// Options for loading a model (phi3_model_options).
struct ModelOptions {
    std::string device = "auto";    ///< "auto", "cpu", "cuda", "cuda:N"
    size_t max_context = 0;         ///< 0: the model's maximum
    std::string weights = "native"; ///< "native", "int8", "int4", "int4-g32", "int4-g64", "int4-g128"
    /// Bytes of KV-cache memory for all sessions of the model together; 0: the backend's default.
    uint64_t kv_memory = 0;
    /// When the KV memory is exhausted, a pass waits for another thread's sessions to free blocks
    /// (free, truncate, reset) instead of throwing Error(PHI3_ERR_OUT_OF_MEMORY). Only for hosts
    /// that run sessions on several threads: with one thread it would wait forever.
    bool kv_wait = false;
    /// Most prompt tokens of one session per forward pass (and prefill tokens of one batched
    /// pass); 0: 512. Larger chunks keep a GPU busier on long prompts and take more memory.
    size_t prefill_chunk = 0;
};

/// Options for a new session (phi3_session_options).
struct SessionOptions {
    size_t max_context = 0; ///< 0: the model's
    int32_t priority = 0;   ///< higher runs first when more work is queued than one batch takes
};

/// How a model's KV memory and batching scheduler are used (phi3_kv_usage).
struct KvUsage {
    size_t block_tokens = 0;     ///< tokens per KV block
    uint64_t block_bytes = 0;    ///< bytes of one block
    size_t blocks_in_use = 0;    ///< held by sessions (a block shared by forks counts once)
    size_t blocks_allocated = 0; ///< allocated (in use or free for reuse)
    size_t max_blocks = 0;       ///< what the budget allows; 0: no budget
    uint64_t steps = 0;          ///< forward passes run
    uint64_t sequences = 0;      ///< sequences over all passes
    size_t max_batch = 0;        ///< most sequences in one pass
};

/// Sampling and stopping options (phi3_generate_options); the defaults equal
/// phi3_generate_options_init's.
struct GenerateOptions {
    uint32_t max_tokens = 256;
    float temperature = 0.0f; ///< 0: greedy
    uint32_t top_k = 0;       ///< 0: off
    float top_p = 1.0f;       ///< 1: off
    float min_p = 0.0f;       ///< 0: off
    float repetition_penalty = 1.0f; ///< 1: off
    float presence_penalty = 0.0f;   ///< 0: off
    float frequency_penalty = 0.0f;  ///< 0: off
    std::optional<uint64_t> seed;    ///< none: the library's default seeding
    std::vector<std::string> stop;   ///< stop strings
    /// Stop tokens. Unset: the model's eos ids and <|end|>; set and empty: none.
    std::optional<std::vector<int32_t>> stop_token_ids;
};

/// Why generation ended (PHI3_FINISH_*).
enum class FinishReason : int32_t {
    Eos = PHI3_FINISH_EOS,
    StopString = PHI3_FINISH_STOP_STRING,
    Length = PHI3_FINISH_LENGTH,
    Callback = PHI3_FINISH_CALLBACK,
    Cancelled = PHI3_FINISH_CANCELLED,
};

/// Lower-case name of a finish reason, e.g. "stop_string".
inline const char *to_string(FinishReason reason) noexcept {
    switch (reason) {
    case FinishReason::Eos:
        return "eos";
    case FinishReason::StopString:
        return "stop_string";
    case FinishReason::Length:
        return "length";
    case FinishReason::Callback:
        return "callback";
    case FinishReason::Cancelled:
        return "cancelled";
    }
    return "unknown";
}

/// The outcome of Session::generate: phi3_generate_result plus the text and token ids that the
/// callback received.
struct GenerateResult {
    FinishReason finish_reason = FinishReason::Eos;
    size_t prompt_tokens = 0;
    size_t generated_tokens = 0;
    double time_to_first_token_s = 0.0;
    double prefill_tokens_per_s = 0.0;
    double decode_tokens_per_s = 0.0;
    std::string text;            ///< every piece of text the callback was given, concatenated
    std::vector<int32_t> tokens; ///< the generated token ids, in order
};

class Session;

/// A loaded model (phi3_model). Move-only; frees its handle with phi3_model_free.
class Model {
public:
    /// An empty handle (no model).
    Model() noexcept = default;

    /// Takes ownership of `handle` (may be null).
    explicit Model(phi3_model *handle) noexcept : handle_(handle) {}

    /// Loads a model folder (config.json, safetensors, tokenizer.json).
    static Model load(const std::string &path, const ModelOptions &options = {}) {
        phi3_model_options o = to_c(options);
        phi3_model *out = nullptr;
        detail::check(phi3_model_load(detail::c_string(path, "path").c_str(), &o, &out));
        return Model(out);
    }

    /// The built-in demo model (small, random weights, no files needed).
    static Model demo(const ModelOptions &options = {}) {
        phi3_model_options o = to_c(options);
        phi3_model *out = nullptr;
        detail::check(phi3_model_load_demo(&o, &out));
        return Model(out);
    }

    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;
    Model(Model &&other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    Model &operator=(Model &&other) noexcept {
        if (this != &other) {
            reset();
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }
    ~Model() { reset(); }

    /// Frees the handle now (sessions created from it stay valid).
    void reset() noexcept {
        phi3_model_free(std::exchange(handle_, nullptr));
    }

    /// Gives up ownership: the caller frees the returned handle.
    phi3_model *release() noexcept { return std::exchange(handle_, nullptr); }

    /// The C handle (null when empty), still owned by this object.
    phi3_model *get() const noexcept { return handle_; }
    explicit operator bool() const noexcept { return handle_ != nullptr; }

    /// Length of a logits vector.
    size_t vocab_size() const noexcept { return phi3_model_vocab_size(handle_); }

    /// The model's maximum context in tokens.
    size_t max_context() const noexcept { return phi3_model_max_context(handle_); }

    /// A snapshot of the KV pool and the scheduler's counters (phi3_model_kv_usage).
    KvUsage kv_usage() const {
        phi3_kv_usage u{};
        u.struct_size = static_cast<uint32_t>(sizeof u);
        detail::check(phi3_model_kv_usage(handle_, &u));
        KvUsage out;
        out.block_tokens = u.block_tokens;
        out.block_bytes = u.block_bytes;
        out.blocks_in_use = u.blocks_in_use;
        out.blocks_allocated = u.blocks_allocated;
        out.max_blocks = u.max_blocks;
        out.steps = u.steps;
        out.sequences = u.sequences;
        out.max_batch = u.max_batch;
        return out;
    }

    /// Token ids of `text`; `add_special` adds the tokenizer's special tokens (BOS), as HF does.
    std::vector<int32_t> tokenize(std::string_view text, bool add_special = true) const {
        return detail::fill_buffer<int32_t>([&](int32_t *out, size_t cap, size_t *len) {
            return phi3_tokenize(handle_, text.data(), text.size(), add_special ? 1 : 0, out,
                                 cap, len);
        });
    }

    /// The text of `tokens`.
    std::string detokenize(const std::vector<int32_t> &tokens) const {
        std::vector<char> bytes =
            detail::fill_buffer<char>([&](char *out, size_t cap, size_t *len) {
                return phi3_detokenize(handle_, tokens.data(), tokens.size(), out, cap, len);
            });
        return std::string(bytes.data(), bytes.size());
    }

    /// A new, empty session on this model.
    Session session(const SessionOptions &options = {}) const;

private:
    static phi3_model_options to_c(const ModelOptions &options) {
        if (options.device.find('\0') != std::string::npos) {
            throw Error(PHI3_ERR_INVALID_ARGUMENT, "device contains a NUL byte");
        }
        if (options.weights.find('\0') != std::string::npos) {
            throw Error(PHI3_ERR_INVALID_ARGUMENT, "weights contains a NUL byte");
        }
        phi3_model_options o;
        phi3_model_options_init(&o);
        // Both strings live as long as `options`, i.e. the load call.
        o.device = options.device.c_str();
        o.max_context = options.max_context;
        o.weights = options.weights.c_str();
        o.kv_memory_bytes = options.kv_memory;
        o.kv_wait = options.kv_wait ? 1 : 0;
        o.prefill_chunk = options.prefill_chunk;
        return o;
    }

    phi3_model *handle_ = nullptr;
};

namespace detail {

/// What the generate trampoline needs: the user's callable, and what it saw.
template <class F>
struct GenerateState {
    F *callback;
    std::string text;
    std::vector<int32_t> tokens;
    std::exception_ptr error;
};

/// The phi3_token_callback handed to the C library. Never lets an exception escape: one thrown
/// by the user's callable (or by the bookkeeping) is stored and generation is stopped.
template <class F>
int32_t generate_trampoline(void *user_data, const char *utf8, size_t len,
                            int32_t token) noexcept {
    auto *state = static_cast<GenerateState<F> *>(user_data);
    if (state->error) {
        return 1; // already failed: do not call the user again
    }
    try {
        std::string_view piece(len != 0 ? utf8 : "", len);
        state->text.append(piece);
        if (token >= 0) {
            state->tokens.push_back(token);
        }
        using R = std::invoke_result_t<F &, std::string_view, int32_t>;
        if constexpr (std::is_void_v<R>) {
            std::invoke(*state->callback, piece, token);
            return 0;
        } else {
            return static_cast<bool>(std::invoke(*state->callback, piece, token)) ? 0 : 1;
        }
    } catch (...) {
        state->error = std::current_exception();
        return 1;
    }
}

} // namespace detail

/// A conversation: token history and KV cache (phi3_session). Move-only; frees its handle with
/// phi3_session_free.
class Session {
public:
    /// An empty handle (no session).
    Session() noexcept = default;

    /// Takes ownership of `handle` (may be null).
    explicit Session(phi3_session *handle) noexcept : handle_(handle) {}

    /// A new, empty session on `model`.
    explicit Session(const Model &model, const SessionOptions &options = {}) {
        phi3_session_options o;
        phi3_session_options_init(&o);
        o.max_context = options.max_context;
        o.priority = options.priority;
        detail::check(phi3_session_new(model.get(), &o, &handle_));
    }

    /// A session saved with save(), on `model`.
    static Session load(const Model &model, const std::string &path) {
        phi3_session *out = nullptr;
        detail::check(
            phi3_session_load(model.get(), detail::c_string(path, "path").c_str(), &out));
        return Session(out);
    }

    Session(const Session &) = delete;
    Session &operator=(const Session &) = delete;
    Session(Session &&other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    Session &operator=(Session &&other) noexcept {
        if (this != &other) {
            close();
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }
    ~Session() { close(); }

    /// Frees the handle now.
    void close() noexcept { phi3_session_free(std::exchange(handle_, nullptr)); }

    /// Gives up ownership: the caller frees the returned handle.
    phi3_session *release() noexcept { return std::exchange(handle_, nullptr); }

    /// The C handle (null when empty), still owned by this object.
    phi3_session *get() const noexcept { return handle_; }
    explicit operator bool() const noexcept { return handle_ != nullptr; }

    /// Tokenizes `text` and appends it (the forward pass runs later).
    void append_text(std::string_view text) {
        detail::check(phi3_session_append_text(handle_, text.data(), text.size()));
    }

    /// Appends token ids and runs the model over them.
    void append_tokens(const std::vector<int32_t> &tokens) {
        detail::check(phi3_session_append_tokens(handle_, tokens.data(), tokens.size()));
    }

    /// Appends a chat message ("system", "user", "assistant") through the chat template.
    void append_message(std::string_view role, std::string_view content) {
        // The C function takes NUL-terminated strings.
        const std::string r = detail::c_string(role, "role");
        const std::string c = detail::c_string(content, "content");
        detail::check(phi3_session_append_message(handle_, r.c_str(), c.c_str()));
    }

    /// Logits after the last token (vocab_size() floats), running pending tokens first.
    std::vector<float> logits() {
        return detail::fill_buffer<float>([&](float *out, size_t cap, size_t *len) {
            return phi3_session_logits(handle_, out, cap, len);
        });
    }

    /// Generates with `options`, calling `on_token(text, token)` for every piece of text (token
    /// is -1 for held-back text delivered at the end); returning false stops generation
    /// (FinishReason::Callback). An exception thrown by `on_token` stops generation and is
    /// rethrown here; the tokens generated until then stay in the session.
    template <class F>
    GenerateResult generate(const GenerateOptions &options, F &&on_token) {
        using Fn = std::remove_reference_t<F>;
        static_assert(std::is_invocable_v<Fn &, std::string_view, int32_t>,
                      "on_token must be callable as on_token(std::string_view, int32_t)");
        detail::GenerateState<Fn> state{std::addressof(on_token), {}, {}, nullptr};

        std::vector<const char *> stops;
        stops.reserve(options.stop.size());
        for (const std::string &s : options.stop) {
            if (s.find('\0') != std::string::npos) {
                throw Error(PHI3_ERR_INVALID_ARGUMENT, "a stop string contains a NUL byte");
            }
            stops.push_back(s.c_str());
        }
        phi3_generate_options o;
        phi3_generate_options_init(&o);
        o.max_tokens = options.max_tokens;
        o.temperature = options.temperature;
        o.top_k = options.top_k;
        o.top_p = options.top_p;
        o.min_p = options.min_p;
        o.repetition_penalty = options.repetition_penalty;
        o.presence_penalty = options.presence_penalty;
        o.frequency_penalty = options.frequency_penalty;
        o.has_seed = options.seed.has_value() ? 1 : 0;
        o.seed = options.seed.value_or(0);
        o.stop = stops.empty() ? nullptr : stops.data();
        o.n_stop = stops.size();
        static const int32_t no_tokens[1] = {0};
        if (options.stop_token_ids) {
            // non-NULL with n = 0 means "no stop tokens", so never pass NULL here.
            o.stop_token_ids =
                options.stop_token_ids->empty() ? no_tokens : options.stop_token_ids->data();
            o.n_stop_token_ids = options.stop_token_ids->size();
        } else {
            o.stop_token_ids = nullptr;
            o.n_stop_token_ids = 0;
        }

        phi3_generate_result r{};
        r.struct_size = static_cast<uint32_t>(sizeof r);
        const phi3_status status = phi3_session_generate(
            handle_, &o, &detail::generate_trampoline<Fn>, &state, &r);
        if (state.error) {
            std::rethrow_exception(state.error);
        }
        if (status != PHI3_ERR_CANCELLED) {
            detail::check(status);
        }

        GenerateResult result;
        result.finish_reason = status == PHI3_ERR_CANCELLED
                                   ? FinishReason::Cancelled
                                   : static_cast<FinishReason>(r.finish_reason);
        result.prompt_tokens = r.prompt_tokens;
        result.generated_tokens = r.generated_tokens;
        result.time_to_first_token_s = r.time_to_first_token_s;
        result.prefill_tokens_per_s = r.prefill_tokens_per_s;
        result.decode_tokens_per_s = r.decode_tokens_per_s;
        result.text = std::move(state.text);
        result.tokens = std::move(state.tokens);
        return result;
    }

    /// Generates without a callback (the text is in the result).
    GenerateResult generate(const GenerateOptions &options = {}) {
        return generate(options, [](std::string_view, int32_t) { return true; });
    }

    /// Stops a running generate() or prefill on this session; callable from any thread.
    void cancel() noexcept { phi3_session_cancel(handle_); }

    /// Number of tokens in the session.
    size_t size() const noexcept { return phi3_session_len(handle_); }

    /// The session's token ids.
    std::vector<int32_t> tokens() const {
        return detail::fill_buffer<int32_t>([&](int32_t *out, size_t cap, size_t *len) {
            return phi3_session_tokens(handle_, out, cap, len);
        });
    }

    /// Keeps the first `n_tokens` tokens.
    void truncate(size_t n_tokens) { detail::check(phi3_session_truncate(handle_, n_tokens)); }

    /// Removes every token.
    void reset() { detail::check(phi3_session_reset(handle_)); }

    /// The scheduling priority (see SessionOptions::priority).
    int32_t priority() const noexcept { return phi3_session_priority(handle_); }

    /// Changes the scheduling priority of later passes (throws PHI3_ERR_BUSY while another
    /// thread is inside a call on this session).
    void set_priority(int32_t priority) {
        detail::check(phi3_session_set_priority(handle_, priority));
    }

    /// An independent copy (tokens, KV cache, priority); cheap: the KV blocks are shared
    /// copy-on-write.
    Session fork() const {
        phi3_session *out = nullptr;
        detail::check(phi3_session_fork(handle_, &out));
        return Session(out);
    }

    /// Writes the session to `path` (read back with Session::load).
    void save(const std::string &path) const {
        detail::check(phi3_session_save(handle_, detail::c_string(path, "path").c_str()));
    }

private:
    phi3_session *handle_ = nullptr;
};

inline Session Model::session(const SessionOptions &options) const {
    return Session(*this, options);
}

} // namespace phi3

#endif // PHI3_HPP
