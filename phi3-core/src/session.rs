//! `Session`: one conversation's token history and KV cache on a shared [`Model`].
//!
//! Text and chat messages are appended lazily: they are tokenized, checked and added to the
//! history, and the forward pass over them runs at the next call that needs logits (`generate`,
//! `logits`, `append_tokens`), in chunks of [`PREFILL_CHUNK`] tokens that can be cancelled. So
//! the KV cache may lag the history (`kv.len() <= tokens.len()`); the pending tokens are
//! `tokens[kv.len()..]`.
//!
//! Every call is transactional: on error the session holds the tokens it held before (a failed
//! prefill of already-accepted pending tokens leaves them pending).
//!
//! When the history crosses LongRoPE's `original_max_position_embeddings` (either way, e.g. after
//! a truncate), the cache is emptied and the whole history recomputed in the new regime, which is
//! what makes the logits equal HF's full forward of the whole sequence (see `kv_cache.rs`).

use std::ops::ControlFlow;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use crate::backend::{OutputKind, SeqOutput};
use crate::chat::ChatMessage;
use crate::error::{Error, ErrorKind, Result};
use crate::generate::{CancelToken, FinishReason, GenerateOptions, GenerationResult};
use crate::kv_cache::SeqKv;
use crate::model::Model;
use crate::sampler::{self, Rng, SamplerOptions};
use crate::scheduler::Job;
use crate::session_file::{self, GreedyChoice, SavedCandidates, SessionState};
use crate::stream::TokenStream;

/// Tokens per forward pass when running a long input, unless the model was loaded with another
/// `LoadOptions::prefill_chunk`.
pub const PREFILL_CHUNK: usize = 512;

/// Options for a new session.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    /// Most tokens the session may hold (default and upper bound: the model's max context).
    pub max_context: Option<usize>,
    /// When more sessions' passes are waiting than one batch takes, higher priority runs first
    /// (default 0). Only the order of waiting work changes: results are the same.
    pub priority: i32,
}

/// What a session holds for its last token once the model has run over it: what the forward
/// pass was asked for (`OutputKind`). Any change to the tokens resets it to `None`.
#[derive(Clone, Debug, Default)]
enum LastOutput {
    /// Not computed (pending tokens, or dropped by a rewind).
    #[default]
    None,
    /// The logits, `[vocab]`.
    Logits(Vec<f32>),
    /// Only the greedy choice among the first `limit` ids (a plain greedy generation step,
    /// chosen where the logits were computed: on the GPU, one id comes back instead of them).
    Greedy { limit: usize, token: Option<u32> },
    /// Only the `count` largest logits among the first `limit` ids (a top-k sampling step, or a
    /// greedy one with penalties: `sampler::candidate_count`; on the GPU they come back instead
    /// of all the logits).
    Candidates { limit: usize, count: usize, entries: Vec<(u32, f32)> },
}

/// A conversation: tokens, their KV cache, and the logits after the last token.
pub struct Session {
    model: Model,
    tokens: Vec<u32>,
    /// Blocks in the model's KV pool, given back when the session is dropped.
    kv: SeqKv,
    max_context: usize,
    priority: i32,
    /// Unique in the process; the scheduler tells sessions apart by it.
    id: u64,
    /// What the last forward pass left for the last token (`None` until computed).
    last: LastOutput,
    /// Messages appended with `append_message` (and replies generated after them), to render
    /// the chat template incrementally.
    messages: Vec<ChatMessage>,
    /// The last message awaits a reply: `generate` adds the assistant prompt first.
    needs_generation_prompt: bool,
    cancel: CancelToken,
    rng: Rng,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("len", &self.tokens.len())
            .field("cached", &self.kv.len())
            .field("max_context", &self.max_context)
            .finish_non_exhaustive()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Give the KV blocks back to the model's pool (shared ones stay with their forks).
        self.model.truncate_kv(&mut self.kv, 0);
        self.model.session_ended(self.id);
    }
}

/// A new session's id, unique in the process (the scheduler tells sessions apart by it).
fn next_session_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Session {
    pub(crate) fn new(model: Model, options: SessionOptions) -> Result<Session> {
        let max_context = match options.max_context {
            Some(0) => return Err(Error::invalid_argument("max_context must be > 0")),
            Some(n) => n.min(model.max_context()),
            None => model.max_context(),
        };
        Ok(Session {
            model,
            tokens: Vec::new(),
            kv: SeqKv::new(),
            max_context,
            priority: options.priority,
            id: next_session_id(),
            last: LastOutput::None,
            messages: Vec::new(),
            needs_generation_prompt: false,
            cancel: CancelToken::new(),
            rng: Rng::from_entropy(),
        })
    }

    /// The model this session runs on.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Append `tokens` and run the model over everything pending; returns the logits of the last
    /// position (`[vocab]`). Costs one forward pass per 512 tokens.
    ///
    /// Errors (session unchanged): `InvalidArgument` for an empty input, `TokenOutOfRange`
    /// naming the first bad id, `ContextFull` past the session's max context, `Cancelled`,
    /// backend errors.
    pub fn append_tokens(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.append_and_sync(tokens, OutputKind::Logits)?;
        Ok(self.synced_logits()?.to_vec())
    }

    /// Append `tokens`, run the model over everything pending, and return only the greedy
    /// choice after the last one: the id [`Session::generate`] would pick with greedy options
    /// (the largest logit among the ids the tokenizer can emit, ties to the lowest id; `None`
    /// when none of them is above -inf). For hosts that run their own greedy loop: on CUDA the
    /// choice is made on the device and one id is copied back instead of the logits. A later
    /// [`Session::logits`] runs the last token again to get them.
    ///
    /// Errors (session unchanged): those of [`Session::append_tokens`].
    pub fn append_tokens_greedy(&mut self, tokens: &[u32]) -> Result<Option<u32>> {
        let limit = self.model.emittable_vocab();
        self.append_and_sync(tokens, OutputKind::Greedy { limit })?;
        match self.last {
            LastOutput::Greedy { token, .. } => Ok(token),
            LastOutput::Logits(ref logits) => Ok(sampler::greedy_choice(logits, limit)),
            LastOutput::None | LastOutput::Candidates { .. } => {
                Err(Error::internal("no greedy choice after the forward pass"))
            }
        }
    }

    /// Add `tokens` and run the model over everything pending for `wanted`; on error the session
    /// is as it was.
    fn append_and_sync(&mut self, tokens: &[u32], wanted: OutputKind) -> Result<()> {
        self.cancel.reset();
        let old_len = self.tokens.len();
        let old_last = self.last.clone();
        self.push_tokens(tokens)?;
        if let Err(e) = self.sync_for(wanted) {
            self.tokens.truncate(old_len);
            self.model.truncate_kv(&mut self.kv, old_len);
            // The old last token's output is still right only if its cache entry is.
            if self.kv.len() == old_len {
                self.last = old_last;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Tokenize `text` and add it to the history (the forward pass runs later). A BOS token is
    /// added when the session is empty and the tokenizer adds one, as HF `tokenizer(text)` does.
    ///
    /// Errors (session unchanged): `Unsupported` without a tokenizer, `InvalidArgument` when
    /// `text` encodes to no tokens, `ContextFull` past the session's max context (checked
    /// before tokenizing when the text is certainly too long, so a huge text costs no memory).
    pub fn append_text(&mut self, text: &str) -> Result<()> {
        let tokenizer = self.model.tokenizer()?;
        self.check_text_fits(tokenizer, text)?;
        let ids = tokenizer.encode(text, self.tokens.is_empty())?;
        self.push_tokens(&ids)?;
        self.needs_generation_prompt = false;
        Ok(())
    }

    /// Add a chat message (role "system", "user" or "assistant") formatted by the model's chat
    /// template. The forward pass runs later. The template is rendered for the whole conversation
    /// and only the new part is appended, so the tokens equal `apply_chat_template` of all
    /// messages so far; the next `generate` first adds the assistant prompt (as
    /// `add_generation_prompt=True` renders it) when the last message is not the assistant's.
    ///
    /// Errors (session unchanged): `InvalidArgument` for a role the template rejects,
    /// `ModelFormat` when rendering fails otherwise, `Unsupported` without a tokenizer or for a
    /// template whose output for a longer conversation does not extend that of the shorter one,
    /// `ContextFull` past the session's max context.
    pub fn append_message(&mut self, role: &str, content: &str) -> Result<()> {
        let message = ChatMessage::new(role, content);
        let mut all = self.messages.clone();
        all.push(message);
        let ids = self.template_delta(&self.messages, false, &all, false)?;
        if !ids.is_empty() {
            self.push_tokens(&ids)?;
        }
        self.needs_generation_prompt = all.last().is_some_and(|m| m.role != "assistant");
        self.messages = all;
        Ok(())
    }

    /// Logits after the last token (`[vocab]`), running the model over pending tokens first
    /// (one forward pass per [`PREFILL_CHUNK`] of them; the whole history when its length
    /// crossed LongRoPE's threshold since the cache was filled).
    /// Errors: `InvalidArgument` on an empty session; `Cancelled` or a backend error during the
    /// prefill, after which the tokens not yet run stay pending.
    pub fn logits(&mut self) -> Result<&[f32]> {
        self.cancel.reset();
        self.sync()?;
        self.synced_logits()
    }

    /// Generate until a stop token, a stop string, `max_tokens`, a full context, the callback
    /// (returning `ControlFlow::Break`) or cancellation. Pending tokens are prefilled first.
    ///
    /// `on_token(text, Some(token))` is called once per sampled token (not for the stop token) on
    /// this thread, with the text that token completed (possibly empty: bytes of a character
    /// split across tokens, or text that may start a stop string, are held back until decided);
    /// a last `on_token(text, None)` delivers held-back text when generation ends. The
    /// concatenated texts equal `GenerationResult::text`.
    /// Every sampled token stays in the session, also when generation is cancelled (the
    /// session stays usable); a call that ends before sampling any token (cancelled or failed)
    /// leaves the session's tokens and chat history as they were. Errors: `InvalidArgument`
    /// for bad options or an empty session, `Cancelled` (tokens of completed steps are kept),
    /// `Unsupported` without a tokenizer, `ContextFull` when the chat's assistant prompt does
    /// not fit, the chat template's errors (see [`Session::append_message`]), backend errors
    /// during the prefill, and the stream's item errors (see [`TokenStream`]).
    ///
    /// A panic in `on_token` is not caught: it ends the generation and propagates out of
    /// `generate` with its original payload, after the session has been left exactly as if
    /// `on_token` had returned `ControlFlow::Break` at that call (every sampled token kept, a
    /// chat reply recorded), so a caller that catches it (`std::panic::catch_unwind`) can go on
    /// using the session. `on_token` is not called again after it panicked, so held-back text is
    /// not delivered. (With `panic = "abort"` the process ends instead.)
    pub fn generate(
        &mut self,
        options: &GenerateOptions,
        mut on_token: impl FnMut(&str, Option<u32>) -> ControlFlow<()>,
    ) -> Result<GenerationResult> {
        let mut stream = self.stream(options)?;
        while let Some(chunk) = stream.next() {
            let chunk = chunk?;
            // Caught only to finish the stream as a Break would, then resumed unchanged.
            let flow = panic::catch_unwind(AssertUnwindSafe(|| on_token(&chunk.text, chunk.token)));
            match flow {
                Ok(ControlFlow::Continue(())) => {}
                Ok(ControlFlow::Break(())) => stream.stop(FinishReason::Callback),
                Err(payload) => {
                    stream.stop(FinishReason::Callback);
                    // After `stop` the stream only flushes and records the reply: no model work,
                    // no error, no further callback.
                    let _ = stream.into_result();
                    panic::resume_unwind(payload);
                }
            }
        }
        stream.into_result()
    }

    /// Generation as an iterator of [`crate::StreamChunk`]s (the same steps as [`Session::generate`]):
    /// pending tokens are prefilled here, then each `next()` samples one token. Errors: those
    /// [`Session::generate`] reports before its first token.
    pub fn stream(&mut self, options: &GenerateOptions) -> Result<TokenStream<'_>> {
        TokenStream::start(self, options)
    }

    /// A handle that cancels this session's running call from another thread.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Number of tokens in the session.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when the session holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token history.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// This session's scheduling priority (see [`SessionOptions::priority`]).
    pub fn priority(&self) -> i32 {
        self.priority
    }

    /// Change the scheduling priority of this session's later passes.
    pub fn set_priority(&mut self, priority: i32) {
        self.priority = priority;
    }

    /// The most tokens this session may hold.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Logits after the last token if they are already computed (no pending tokens, and the
    /// last pass was not a greedy generation step that brought back only its token).
    pub fn last_logits(&self) -> Option<&[f32]> {
        match &self.last {
            LastOutput::Logits(logits) => Some(logits),
            _ => None,
        }
    }

    /// Keep the first `n_tokens` tokens (a rewind). Cheap: no KV data moves (whole blocks past
    /// the kept tokens go back to the model's pool); the next call that
    /// needs logits reruns the last kept token (or the whole history when the rewind crosses
    /// LongRoPE's threshold). When tokens are dropped, the chat messages recorded for the
    /// template are forgotten.
    /// Errors with `InvalidArgument` when `n_tokens` exceeds the session's length.
    pub fn truncate(&mut self, n_tokens: usize) -> Result<()> {
        if n_tokens > self.tokens.len() {
            return Err(Error::invalid_argument(format!(
                "truncate to {n_tokens} tokens: the session holds only {}",
                self.tokens.len()
            )));
        }
        if n_tokens < self.tokens.len() {
            self.tokens.truncate(n_tokens);
            self.model.truncate_kv(&mut self.kv, n_tokens);
            self.last = LastOutput::None;
            self.messages.clear();
            self.needs_generation_prompt = false;
        }
        Ok(())
    }

    /// Forget everything (the KV blocks go back to the model's pool).
    pub fn reset(&mut self) {
        self.tokens.clear();
        self.model.truncate_kv(&mut self.kv, 0);
        self.last = LastOutput::None;
        self.messages.clear();
        self.needs_generation_prompt = false;
    }

    /// An independent copy: same tokens, cache, priority and random state; later changes to
    /// either do not affect the other. Cheap: the two share the KV cache's blocks until one of
    /// them writes into a shared block, which it then copies (at most one block per pass), so a
    /// long prompt forked into many conversations is cached once.
    /// Errors: none today (the `Result` leaves room for backends that copy).
    pub fn fork(&self) -> Result<Session> {
        Ok(Session {
            model: self.model.clone(),
            tokens: self.tokens.clone(),
            kv: self.model.fork_kv(&self.kv),
            max_context: self.max_context,
            priority: self.priority,
            id: next_session_id(),
            last: self.last.clone(),
            messages: self.messages.clone(),
            needs_generation_prompt: self.needs_generation_prompt,
            cancel: CancelToken::new(),
            rng: self.rng.clone(),
        })
    }

    /// Write the session (tokens, KV cache, logits, LongRoPE state, RNG state, chat messages) to
    /// `path` in phi3's versioned session format. The file is written beside `path` and renamed
    /// into place, so a failed save leaves any previous file intact. Costs about
    /// `n_layers * 2 * kv_dim * 4` bytes per cached token.
    ///
    /// Errors: `Io` when the file cannot be written or renamed into place, `InvalidArgument`
    /// when `path` has no file name, and the backend's errors reading the cache.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let state = SessionState {
            tokens: self.tokens.clone(),
            last_logits: self.last_logits().map(<[f32]>::to_vec).unwrap_or_default(),
            greedy: match self.last {
                LastOutput::Greedy { limit, token } => Some(GreedyChoice { limit, token }),
                _ => None,
            },
            candidates: match &self.last {
                LastOutput::Candidates { limit, count, entries } => Some(SavedCandidates {
                    limit: *limit,
                    count: *count,
                    ids: entries.iter().map(|&(id, _)| id).collect(),
                    logits: entries.iter().map(|&(_, v)| v.to_bits()).collect(),
                }),
                _ => None,
            },
            kv_tokens: self.kv.len(),
            regime: self.kv.regime(),
            kv: self.model.kv_to_host(&self.kv)?,
            max_context: self.max_context,
            rng: self.rng.clone(),
            messages: self.messages.clone(),
            needs_generation_prompt: self.needs_generation_prompt,
        };
        session_file::save(&self.model, &state, path.as_ref())
    }

    /// Read a session saved by [`Session::save`] from the same model; it continues exactly as
    /// the original would have. Reads the whole file and allocates its KV cache.
    ///
    /// Errors: `Io` when the file cannot be read; `ModelFormat` for a truncated, corrupted or
    /// inconsistent file, including sizes that do not fit this model (e.g. a max context above
    /// [`Model::max_context`]); `Unsupported` for another format version; `InvalidArgument` when
    /// it was saved from a different model or holds an invalid RNG state; `TokenOutOfRange` for
    /// a token outside the vocabulary; `OutOfMemory` when the cache cannot be allocated.
    pub fn load(model: &Model, path: impl AsRef<Path>) -> Result<Session> {
        let state = session_file::load(model, path.as_ref())?;
        let kv = model.kv_from_host(state.kv_tokens, state.regime, &state.kv)?;
        Ok(Session {
            model: model.clone(),
            tokens: state.tokens,
            kv,
            max_context: state.max_context,
            priority: 0,
            id: next_session_id(),
            last: match (state.greedy, state.candidates) {
                (Some(GreedyChoice { limit, token }), _) => LastOutput::Greedy { limit, token },
                (None, Some(c)) => {
                    LastOutput::Candidates { limit: c.limit, count: c.count, entries: c.entries() }
                }
                (None, None) if state.last_logits.is_empty() => LastOutput::None,
                (None, None) => LastOutput::Logits(state.last_logits),
            },
            needs_generation_prompt: state.needs_generation_prompt,
            messages: state.messages,
            cancel: CancelToken::new(),
            rng: state.rng,
        })
    }

    /// Debug view: whether the model's output for the last token is held (its logits, or a
    /// greedy generation step's token), so that the next step needs no pass over it.
    #[doc(hidden)]
    pub fn has_last_output(&self) -> bool {
        !matches!(self.last, LastOutput::None)
    }

    /// Debug view of the cache: (cached tokens, entries computed with long LongRoPE factors).
    #[doc(hidden)]
    pub fn kv_state(&self) -> (usize, bool) {
        (self.kv.len(), self.kv.regime() == crate::rope::RopeRegime::Long)
    }

    /// Validate and add tokens to the history without running the model.
    fn push_tokens(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::invalid_argument("tokens is empty"));
        }
        self.model.check_tokens(tokens)?;
        if self.tokens.len() + tokens.len() > self.max_context {
            return Err(Error::new(
                ErrorKind::ContextFull,
                format!(
                    "appending {} tokens to a session of {} would exceed its max context of {}",
                    tokens.len(),
                    self.tokens.len(),
                    self.max_context
                ),
            ));
        }
        self.tokens.extend_from_slice(tokens);
        self.last = LastOutput::None;
        Ok(())
    }

    /// Tokens in the history that the KV cache does not hold yet.
    pub(crate) fn pending(&self) -> usize {
        self.tokens.len() - self.kv.len()
    }

    /// Restart the random generator from `seed`.
    pub(crate) fn reseed(&mut self, seed: u64) {
        self.rng = Rng::seeded(seed);
    }

    pub(crate) fn has_messages(&self) -> bool {
        !self.messages.is_empty()
    }

    pub(crate) fn push_message(&mut self, message: ChatMessage) {
        self.messages.push(message);
    }

    /// Sample the next token from the current output (`sync_for(Self::output_for(..))` must have
    /// run) and add it to the history; its forward pass runs at the next `sync`.
    pub(crate) fn sample_next(
        &mut self,
        generated: &[u32],
        sampling: &SamplerOptions,
        limit: usize,
    ) -> Result<u32> {
        let vocab = self.model.config().vocab_size;
        let token = match &self.last {
            LastOutput::Logits(logits) => {
                sampler::sample(logits, &self.tokens, generated, sampling, limit, &mut self.rng)?
            }
            // The same rule `sample` applies to plain greedy options, applied where the logits
            // were (`SeqOutput::from_logits`); no random draw, as `sample` takes none either.
            LastOutput::Greedy { limit: chosen_in, token }
                if *chosen_in == limit && sampler::is_plain_greedy(sampling) =>
            {
                token.ok_or_else(|| {
                    Error::internal(format!(
                        "no token can be sampled: all {limit} logits in range are NaN or -inf"
                    ))
                })?
            }
            LastOutput::Candidates { limit: taken_below, count, entries }
                if *taken_below == limit
                    && sampler::candidate_count(sampling, vocab) == Some(*count) =>
            {
                let (history, rng) = (&self.tokens, &mut self.rng);
                let drawn = sampler::sample_candidates(
                    entries, *count, history, generated, sampling, limit, rng,
                )?;
                match drawn {
                    Some(token) => token,
                    // Ties or rounding at the k-th logit: the candidates cannot show that no
                    // other id survives top-k (the generator is untouched). Rare; the whole row
                    // is computed again (the last token runs again, as a one-token pass: the
                    // same bits as a decode step's, within rounding of a prefill chunk's) and
                    // the logits arm above decides.
                    None => {
                        self.sync_for(OutputKind::Logits)?;
                        return self.sample_next(generated, sampling, limit);
                    }
                }
            }
            _ => return Err(Error::internal("sample_next without the output it needs")),
        };
        self.tokens.push(token);
        self.last = LastOutput::None;
        Ok(token)
    }

    /// What a generation step with `sampling` needs of the model over a vocabulary of `vocab`:
    /// only the greedy choice for plain greedy options (`sampler::is_plain_greedy`), only the
    /// largest logits when they decide the token (`sampler::candidate_count`), else all of them.
    pub(crate) fn output_for(sampling: &SamplerOptions, limit: usize, vocab: usize) -> OutputKind {
        if sampler::is_plain_greedy(sampling) {
            OutputKind::Greedy { limit }
        } else if let Some(count) = sampler::candidate_count(sampling, vocab) {
            OutputKind::Candidates { limit, count }
        } else {
            OutputKind::Logits
        }
    }

    /// The logits after the last token, which `sync` has just computed.
    fn synced_logits(&self) -> Result<&[f32]> {
        self.last_logits().ok_or_else(|| Error::internal("no logits after the forward pass"))
    }

    /// Run the model over pending tokens so that the logits are current.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.sync_for(OutputKind::Logits)
    }

    /// Run the model over pending tokens so that `wanted` of the last token is current (logits
    /// also serve a greedy step). On error the cache keeps what completed (in a consistent
    /// regime) and the tokens stay pending.
    pub(crate) fn sync_for(&mut self, wanted: OutputKind) -> Result<()> {
        if self.tokens.is_empty() {
            return Err(Error::invalid_argument("the session is empty"));
        }
        let current = match (&self.last, wanted) {
            (LastOutput::None, _) => false,
            (LastOutput::Logits(_), _) => true,
            (LastOutput::Greedy { limit, .. }, OutputKind::Greedy { limit: wanted }) => {
                *limit == wanted
            }
            (
                LastOutput::Candidates { limit, count, .. },
                OutputKind::Candidates { limit: wanted_limit, count: wanted_count },
            ) => *limit == wanted_limit && *count == wanted_count,
            (LastOutput::Greedy { .. } | LastOutput::Candidates { .. }, _) => false,
        };
        if current && self.kv.len() == self.tokens.len() {
            return Ok(());
        }
        // Whatever is held is not what is wanted, and the cache may shrink below: drop it, so
        // that a pass that fails leaves no output of a token the cache no longer holds.
        self.last = LastOutput::None;
        let regime = self.model.regime_for_len(self.tokens.len());
        if self.kv.len() > 0 && self.kv.regime() != regime {
            self.model.truncate_kv(&mut self.kv, 0);
        }
        if self.kv.len() == self.tokens.len() {
            // The output was dropped (truncate) or is not what is wanted (a greedy step's token
            // when logits are asked for): recompute the last position.
            self.model.truncate_kv(&mut self.kv, self.tokens.len() - 1);
        }
        while self.kv.len() < self.tokens.len() {
            if self.cancel.is_cancelled() {
                return Err(Error::new(ErrorKind::Cancelled, "cancelled during prefill"));
            }
            let start = self.kv.len();
            let end = (start + self.model.prefill_chunk()).min(self.tokens.len());
            let last_chunk = end == self.tokens.len();
            // Earlier chunks' outputs are dropped: the cheapest is the greedy choice.
            let output = if last_chunk { wanted } else { OutputKind::Greedy { limit: 0 } };
            let job = Job {
                tokens: self.tokens[start..end].to_vec(),
                kv: std::mem::take(&mut self.kv),
                regime,
                priority: self.priority,
                session: self.id,
                cancel: self.cancel.clone(),
                output,
            };
            let done = self.model.run_job(job);
            self.kv = done.kv;
            let result = done.result?;
            if last_chunk {
                self.last = match (result, wanted) {
                    (SeqOutput::Logits(logits), _) => LastOutput::Logits(logits),
                    (SeqOutput::Greedy(token), OutputKind::Greedy { limit }) => {
                        LastOutput::Greedy { limit, token }
                    }
                    (SeqOutput::Candidates(entries), OutputKind::Candidates { limit, count }) => {
                        LastOutput::Candidates { limit, count, entries }
                    }
                    (SeqOutput::Greedy(_) | SeqOutput::Candidates(_), _) => {
                        return Err(Error::internal("a pass returned another output than asked"))
                    }
                };
            }
        }
        Ok(())
    }

    /// Tokens that rendering `after` adds to the rendering of `before` (each with its own
    /// `add_generation_prompt`).
    fn template_delta(
        &self,
        before: &[ChatMessage],
        before_prompt: bool,
        after: &[ChatMessage],
        after_prompt: bool,
    ) -> Result<Vec<u32>> {
        let tokenizer = self.model.tokenizer()?;
        let template = self.model.chat_template();
        let (bos, eos) = (tokenizer.bos_token().unwrap_or(""), tokenizer.eos_token().unwrap_or(""));
        let before = if before.is_empty() && !before_prompt {
            String::new()
        } else {
            template.render(before, before_prompt, bos, eos)?
        };
        let after = template.render(after, after_prompt, bos, eos)?;
        let Some(delta) = after.strip_prefix(&before) else {
            return Err(Error::unsupported(
                "the chat template's output for a longer conversation does not extend that of the \
                 shorter one, so messages cannot be appended one at a time",
            ));
        };
        // A session that already holds tokens must not get a second BOS from the template.
        let delta =
            if self.tokens.is_empty() { delta } else { delta.strip_prefix(bos).unwrap_or(delta) };
        if delta.is_empty() {
            return Ok(Vec::new());
        }
        self.check_text_fits(tokenizer, delta)?;
        tokenizer.encode(delta, false)
    }

    /// `ContextFull` when `text` certainly encodes to more tokens than the session has room
    /// for, found without tokenizing it: the tokenizer needs about 200 bytes of memory per byte
    /// of text, so a text of many megabytes would otherwise cost seconds and gigabytes before
    /// being rejected.
    fn check_text_fits(&self, tokenizer: &crate::tokenizer::Tokenizer, text: &str) -> Result<()> {
        let room = self.max_context.saturating_sub(self.tokens.len());
        let needed = tokenizer.min_tokens(text);
        if needed > room {
            return Err(Error::new(
                ErrorKind::ContextFull,
                format!(
                    "a text of {} bytes needs at least {needed} tokens; a session of {} has {room} \
                     left of its max context of {}",
                    text.len(),
                    self.tokens.len(),
                    self.max_context
                ),
            ));
        }
        Ok(())
    }

    /// Remove an assistant prompt added by `add_generation_prompt` when the generation that
    /// added it failed before sampling: back to `len` tokens, the prompt still owed.
    pub(crate) fn undo_generation_prompt(&mut self, len: usize) {
        if self.tokens.len() > len {
            self.tokens.truncate(len);
            self.model.truncate_kv(&mut self.kv, len);
            self.last = LastOutput::None;
            self.needs_generation_prompt = true;
        }
    }

    /// Before generating a chat reply: append the assistant prompt if the template has one.
    pub(crate) fn add_generation_prompt(&mut self) -> Result<()> {
        if !self.needs_generation_prompt {
            return Ok(());
        }
        let ids = self.template_delta(&self.messages, false, &self.messages, true)?;
        if !ids.is_empty() {
            self.push_tokens(&ids)?;
        }
        self.needs_generation_prompt = false;
        Ok(())
    }
}
