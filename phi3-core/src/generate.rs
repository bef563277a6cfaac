//! Generation options and results, stop rules, streaming text and cancellation.
//!
//! The loop itself lives in `stream.rs` (`TokenStream`, driven by `Session::generate`); this file
//! holds what it works with:
//! - [`GenerateOptions`]: sampling settings (see `sampler.rs`), limits and stop rules;
//! - `StopText`: holds back streamed text that may be the start of a stop string, so a stop
//!   string never reaches the host, and cuts the text where one completes;
//! - [`CancelToken`]: a flag another thread sets; checked between forward passes;
//! - [`GenerationResult`], [`FinishReason`], [`GenerationStats`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sampler::SamplerOptions;

/// How to generate. `Default` is greedy, 256 tokens, the model's stop tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate (the stop token, when one ends generation, is not counted).
    pub max_tokens: usize,
    /// 0 = greedy; otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches top_p (1.0 = off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0.0 = off).
    pub min_p: f32,
    /// HF repetition penalty over the whole session history (1.0 = off).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token generated so far (0.0 = off).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every token generated so far (0.0 = off).
    pub frequency_penalty: f32,
    /// Added to the logits of the given token ids.
    pub logit_bias: Vec<(u32, f32)>,
    /// Same seed and input, same output. None: a fresh random seed.
    pub seed: Option<u64>,
    /// Generation ends when the text contains one of these; the stop string is not returned.
    pub stop: Vec<String>,
    /// Generation ends at these tokens. None: the model's eos ids plus `<|end|>`.
    pub stop_token_ids: Option<Vec<u32>>,
    /// Leave special tokens (e.g. `<|assistant|>`) out of the streamed text.
    pub skip_special_tokens: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            stop: Vec::new(),
            stop_token_ids: None,
            skip_special_tokens: true,
        }
    }
}

impl GenerateOptions {
    /// The sampling part of the options.
    pub fn sampler_options(&self) -> SamplerOptions {
        SamplerOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
        }
    }

    /// Check every field against a model with `vocab` token ids.
    ///
    /// Errors: `InvalidArgument` naming the first bad field: a sampling value out of range (see
    /// [`SamplerOptions::validate`]), an empty stop string, or a stop token id `>= vocab`.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        self.sampler_options().validate(vocab)?;
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return Err(Error::invalid_argument(format!("stop[{i}] is an empty string")));
        }
        if let Some(ids) = &self.stop_token_ids {
            if let Some(i) = ids.iter().position(|&t| t as usize >= vocab) {
                return Err(Error::invalid_argument(format!(
                    "stop_token_ids[{i}] = {} out of range [0, {vocab})",
                    ids[i]
                )));
            }
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// A stop token (eos, `<|end|>`, or one from `stop_token_ids`).
    Eos,
    /// The text reached one of the stop strings.
    StopString,
    /// `max_tokens` were generated, or the session's context is full.
    Length,
    /// The host's callback asked to stop.
    Callback,
    /// [`CancelToken::cancel`] was called.
    Cancelled,
}

impl FinishReason {
    /// Lower-case name, e.g. "stop_string".
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::StopString => "stop_string",
            FinishReason::Length => "length",
            FinishReason::Callback => "callback",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Timing and counts of one `generate` call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationStats {
    /// Tokens that were pending in the session (appended text or messages) and prefilled here.
    pub prompt_tokens: usize,
    /// Tokens sampled (the stop token included).
    pub generated_tokens: usize,
    /// From the call to the first sampled token (includes the prefill of pending tokens).
    pub time_to_first_token: Duration,
    /// `prompt_tokens` over the time from the call until they were prefilled (0 when none).
    pub prefill_tokens_per_s: f64,
    /// Decode steps after the first token, per second.
    pub decode_tokens_per_s: f64,
}

/// What `generate` produced.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationResult {
    /// The streamed text, without stop strings and (by default) special tokens.
    pub text: String,
    /// Tokens sampled, the stop token included; all of them are in the session.
    pub tokens: Vec<u32>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Token counts and speeds of this call.
    pub stats: GenerationStats,
}

/// A handle that cancels a session's running `generate` (or long append) from any thread.
/// Cancellation takes effect at the next forward-pass boundary.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the operation in progress to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was asked since the last `reset`.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Clear the flag (each session call starts by doing this).
    pub(crate) fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Streamed-text filter for stop strings.
///
/// Text is pushed as the detokenizer completes it; `push` returns the part that can safely be
/// shown: everything except a suffix that is a proper prefix of some stop string. When a stop
/// string appears, the text before it is returned and the filter reports the stop.
#[derive(Debug, Default)]
pub(crate) struct StopText {
    stops: Vec<String>,
    held: String,
}

/// Result of feeding text to [`StopText`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StopChunk {
    /// Text that can be shown now.
    pub(crate) text: String,
    /// True when a stop string completed (the text ends right before it).
    pub(crate) stopped: bool,
}

impl StopText {
    pub(crate) fn new(stops: &[String]) -> Self {
        StopText { stops: stops.to_vec(), held: String::new() }
    }

    pub(crate) fn push(&mut self, text: &str) -> StopChunk {
        self.held.push_str(text);
        // The earliest complete stop string wins.
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let text = self.held[..at].to_string();
            self.held.clear();
            return StopChunk { text, stopped: true };
        }
        let keep = self.partial_suffix_len();
        let emit_to = self.held.len() - keep;
        let text = self.held[..emit_to].to_string();
        self.held.drain(..emit_to);
        StopChunk { text, stopped: false }
    }

    /// Text still held back at the end of generation (it did not become a stop string).
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop string,
    /// measured on char boundaries.
    fn partial_suffix_len(&self) -> usize {
        let held = &self.held;
        let mut best = 0;
        for stop in &self.stops {
            for (i, _) in held.char_indices() {
                let suffix = &held[i..];
                if suffix.len() < stop.len() && stop.starts_with(suffix) {
                    best = best.max(suffix.len());
                    break; // earlier i = longer suffix; the first match is the longest
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> StopText {
        StopText::new(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn stop_string_split_across_chunks_never_leaks() {
        let mut f = stops(&["<STOP>"]);
        assert_eq!(f.push("Hello <S"), StopChunk { text: "Hello ".into(), stopped: false });
        assert_eq!(f.push("TO"), StopChunk { text: "".into(), stopped: false });
        assert_eq!(f.push("P> more"), StopChunk { text: "".into(), stopped: true });
    }

    #[test]
    fn false_start_is_released() {
        let mut f = stops(&["abc"]);
        assert_eq!(f.push("xa").text, "x");
        assert_eq!(f.push("b").text, "");
        assert_eq!(f.push("d").text, "abd");
        assert_eq!(f.push("ab").text, "");
        assert_eq!(f.finish(), "ab");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_is_safe() {
        let mut f = stops(&["é!", "xyz"]);
        let c = f.push("caféxyz é!");
        assert_eq!(c, StopChunk { text: "café".into(), stopped: true });
        let mut f = stops(&["ü"]);
        assert_eq!(f.push("aé").text, "aé");
    }

    #[test]
    fn options_validate_names_the_field() {
        let o = GenerateOptions { stop: vec!["a".into(), String::new()], ..Default::default() };
        assert!(o.validate(10).unwrap_err().to_string().contains("stop[1]"));
        let o = GenerateOptions { stop_token_ids: Some(vec![1, 99]), ..Default::default() };
        assert!(o.validate(10).unwrap_err().to_string().contains("stop_token_ids[1] = 99"));
    }

    #[test]
    fn cancel_token_is_shared() {
        let a = CancelToken::new();
        let b = a.clone();
        b.cancel();
        assert!(a.is_cancelled());
        a.reset();
        assert!(!b.is_cancelled());
    }
}
