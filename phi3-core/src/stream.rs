//! `TokenStream`: generation as an iterator, one sampled token per `next()`.
//!
//! `Session::stream` returns it and `Session::generate` drives it with a callback, so both share
//! one loop. Each step samples a token from the session's current logits, adds it to the history,
//! turns it into text (UTF-8-safe detokenizer, then the stop-string filter) and, unless generation
//! ends there, runs the forward pass that produces the next logits. The token that ends a
//! generation joins the history without a forward pass (it runs with the next input), so
//! stopping costs nothing.
//!
//! Not here: sampling math (`sampler.rs`), stop-string matching (`generate.rs`).

use std::time::{Duration, Instant};

use crate::backend::OutputKind;
use crate::chat::ChatMessage;
use crate::detok::IncrementalDecoder;
use crate::error::{Error, ErrorKind, Result};
use crate::generate::{FinishReason, GenerateOptions, GenerationResult, GenerationStats, StopText};
use crate::model::GenerationGuard;
use crate::sampler::SamplerOptions;
use crate::session::Session;

/// One item of a [`TokenStream`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamChunk {
    /// Text completed by this step (may be empty while bytes or a possible stop string are held).
    pub text: String,
    /// The sampled token; `None` for the final chunk that delivers held-back text.
    pub token: Option<u32>,
}

/// A generation in progress. Iterate to get [`StreamChunk`]s; the iterator ends when generation
/// finishes (see [`TokenStream::finish_reason`]). Errors end the stream after being yielded once:
/// a backend error from the forward pass after a token (the token stays in the session, its
/// forward pass pending), `Internal` when no token can be sampled, or `TokenOutOfRange` when the
/// sampled id is one the tokenizer cannot decode (a gap in its ids). Cancellation is not an item
/// error: it ends the stream with [`FinishReason::Cancelled`]. A stream that is cancelled or
/// fails before sampling its first token takes back the assistant prompt it added and records no
/// reply, so the session holds what it held before (wherever the cancel landed).
/// Dropping it early leaves the session valid, holding every token sampled so far.
pub struct TokenStream<'s> {
    session: &'s mut Session,
    options: GenerateOptions,
    sampling: SamplerOptions,
    /// What each step needs of the model: the logits, or only the greedy choice.
    output: OutputKind,
    stop_ids: Vec<u32>,
    limit: usize,
    detok: IncrementalDecoder,
    stop_text: StopText,
    text: String,
    generated: Vec<u32>,
    started: Instant,
    prompt_tokens: usize,
    prefill_time: Duration,
    first_token_at: Option<Duration>,
    finish: Option<FinishReason>,
    /// True once the final (token-less) chunk was produced or the stream failed.
    done: bool,
    /// Kind and message of an error a step returned (so `into_result` reports it too).
    failed: Option<(ErrorKind, String)>,
    /// Session length before `start` added the assistant prompt.
    before_prompt: usize,
    /// Tells the model's scheduler this session is generating (so its steps join batches).
    _generating: GenerationGuard,
}

impl<'s> TokenStream<'s> {
    /// Validate options, prefill pending tokens, and get ready to sample.
    pub(crate) fn start(session: &'s mut Session, options: &GenerateOptions) -> Result<Self> {
        let started = Instant::now();
        session.cancel_token().reset();
        let model = session.model().clone();
        options.validate(model.config().vocab_size)?;
        let tokenizer = model.tokenizer()?.clone();
        if session.is_empty() {
            return Err(Error::invalid_argument("generate needs a prompt: the session is empty"));
        }
        let stop_ids = options.stop_token_ids.clone().unwrap_or_else(|| model.default_stop_ids());
        if let Some(seed) = options.seed {
            session.reseed(seed);
        }
        let before_prompt = session.len();
        let generating = model.generation_guard();
        session.add_generation_prompt()?;
        let prompt_tokens = session.pending();
        let sampling = options.sampler_options();
        let limit = model.emittable_vocab();
        let output = Session::output_for(&sampling, limit, model.config().vocab_size);
        if let Err(e) = session.sync_for(output) {
            // The assistant prompt was this call's addition: take it back. (Pending tokens from
            // earlier appends stay pending, as the host appended them.)
            session.undo_generation_prompt(before_prompt);
            return Err(e);
        }
        let detok = IncrementalDecoder::with_prefix(
            tokenizer,
            options.skip_special_tokens,
            session.tokens(),
        );
        Ok(TokenStream {
            options: options.clone(),
            sampling,
            output,
            stop_ids,
            limit,
            detok,
            stop_text: StopText::new(&options.stop),
            text: String::new(),
            generated: Vec::new(),
            prompt_tokens,
            prefill_time: started.elapsed(),
            started,
            first_token_at: None,
            finish: None,
            done: false,
            failed: None,
            before_prompt,
            session,
            _generating: generating,
        })
    }

    /// Why generation ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// End the generation now with `reason` (e.g. a host callback asked to stop); the next
    /// `next()` delivers any held-back text and then the stream ends.
    pub fn stop(&mut self, reason: FinishReason) {
        self.finish.get_or_insert(reason);
    }

    /// Run the stream to its end and return the result. A cancelled generation is an error of
    /// kind `Cancelled`; its tokens stay in the session. A step that failed (now or in an
    /// earlier `next()`) makes this an error of the same kind and message.
    pub fn into_result(mut self) -> Result<GenerationResult> {
        while !self.done {
            if let Some(Err(e)) = self.next() {
                return Err(e);
            }
        }
        if let Some((kind, message)) = self.failed.take() {
            return Err(Error::new(kind, message));
        }
        let finish = self.finish.unwrap_or(FinishReason::Length);
        if finish == FinishReason::Cancelled {
            return Err(Error::new(
                ErrorKind::Cancelled,
                format!("generation cancelled after {} tokens", self.generated.len()),
            ));
        }
        let elapsed = self.started.elapsed();
        let ttft = self.first_token_at.unwrap_or(elapsed);
        let decode_steps = self.generated.len().saturating_sub(1);
        let stats = GenerationStats {
            prompt_tokens: self.prompt_tokens,
            generated_tokens: self.generated.len(),
            time_to_first_token: ttft,
            prefill_tokens_per_s: per_second(self.prompt_tokens, self.prefill_time),
            decode_tokens_per_s: per_second(decode_steps, elapsed.saturating_sub(ttft)),
        };
        Ok(GenerationResult {
            text: std::mem::take(&mut self.text),
            tokens: std::mem::take(&mut self.generated),
            finish_reason: finish,
            stats,
        })
    }

    /// One sampling step: Ok(Some(chunk)) while generating, Ok(None) when a stop rule ended it.
    fn step(&mut self) -> Result<Option<StreamChunk>> {
        let s = &mut *self.session;
        if s.cancel_token().is_cancelled() {
            self.finish = Some(FinishReason::Cancelled);
            return Ok(None);
        }
        if self.generated.len() >= self.options.max_tokens || s.len() >= s.max_context() {
            self.finish = Some(FinishReason::Length);
            return Ok(None);
        }
        let token = s.sample_next(&self.generated, &self.sampling, self.limit)?;
        self.first_token_at.get_or_insert_with(|| self.started.elapsed());
        self.generated.push(token);
        if self.stop_ids.contains(&token) {
            self.finish = Some(FinishReason::Eos);
            return Ok(None);
        }
        let piece = self.detok.push(token)?;
        let chunk = self.stop_text.push(&piece);
        self.text.push_str(&chunk.text);
        if chunk.stopped {
            self.finish = Some(FinishReason::StopString);
        } else if s.cancel_token().is_cancelled() {
            self.finish = Some(FinishReason::Cancelled);
        } else if self.generated.len() < self.options.max_tokens {
            match s.sync_for(self.output) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Cancelled => {
                    self.finish = Some(FinishReason::Cancelled)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some(StreamChunk { text: chunk.text, token: Some(token) }))
    }

    /// Held-back text delivered when generation ends (it may still complete a stop string).
    fn tail(&mut self) -> Option<StreamChunk> {
        if self.finish == Some(FinishReason::StopString) {
            return None;
        }
        let chunk = self.stop_text.push(&self.detok.flush());
        let mut tail = chunk.text;
        if chunk.stopped {
            self.finish = Some(FinishReason::StopString);
        } else {
            tail.push_str(&self.stop_text.finish());
        }
        self.text.push_str(&tail);
        (!tail.is_empty()).then_some(StreamChunk { text: tail, token: None })
    }

    /// A call that fails or is cancelled before sampling anything leaves the session as it was,
    /// wherever the cancel landed (in the prefill, where `start` takes the prompt back, or just
    /// after it): the assistant prompt is taken back and no reply is recorded. Returns whether
    /// nothing was sampled.
    fn take_back_prompt_if_nothing_sampled(&mut self) -> bool {
        if !self.generated.is_empty() {
            return false;
        }
        self.session.undo_generation_prompt(self.before_prompt);
        true
    }

    /// Record the reply as an assistant message when the conversation is a chat.
    fn record_reply(&mut self) {
        if self.session.has_messages() {
            self.session.push_message(ChatMessage::new("assistant", self.text.clone()));
        }
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<StreamChunk>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.finish.is_none() {
            match self.step() {
                Ok(Some(chunk)) => return Some(Ok(chunk)),
                Ok(None) => {}
                Err(e) => {
                    self.done = true;
                    self.failed = Some((e.kind(), e.message().to_string()));
                    self.take_back_prompt_if_nothing_sampled();
                    return Some(Err(e));
                }
            }
        }
        self.done = true;
        if self.finish == Some(FinishReason::Cancelled)
            && self.take_back_prompt_if_nothing_sampled()
        {
            return None;
        }
        let tail = self.tail();
        self.record_reply();
        tail.map(Ok)
    }
}

fn per_second(count: usize, time: Duration) -> f64 {
    let seconds = time.as_secs_f64();
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}
