//! The quality of a model's next-token predictions on a text: per-position log-probabilities,
//! perplexity, and the comparison of two models on the same tokens (e.g. quantized weights
//! against native ones, [`crate::LoadOptions::weights`]) by perplexity, top-1 agreement and
//! KL divergence. Also the built-in held-out text, [`HELD_TEXT`].
//!
//! **Windowing** (as llama.cpp's `perplexity` without its half-window trick): the tokens are cut
//! into non-overlapping windows of at most [`EvalOptions::window`] tokens (default: the model's
//! max context). Each window starts with an empty session and is fed one token at a time; the
//! logits after `tokens[..=j]` of the window score `tokens[j + 1]`. So the first token of each
//! window only conditions and is not scored (a window of `w` tokens scores `w - 1`; a last
//! window of one token scores nothing and is dropped), and no prediction sees text from an
//! earlier window. The text is not otherwise changed: no BOS is inserted at window starts.
//!
//! **Logits.** The public [`Session`] API returns the logits of the last appended token only,
//! so every position costs one decode step (one GEMV pass over the weights). Each position's
//! logits are the ones a generation would see after that prefix, including LongRoPE's regime
//! for the prefix's length (the session recomputes the window once when it crosses
//! `original_max_position_embeddings`, see `session.rs`); they equal HF's forward of the
//! prefix. Scores use the whole logits row (`config.vocab_size`, padding ids included), as HF's
//! cross-entropy loss does.
//!
//! **Math**, in f64 from f32 logits: `log p = x - (m + ln Σ exp(x - m))` with `m = max x`, so
//! large logits do not overflow; perplexity `exp(Σ -log p(target) / n)`; top-1 agreement: the
//! fraction of scored positions where both models' argmax (lowest id among ties) are equal;
//! `KL(ref ‖ cand) = Σ p_ref (log p_ref - log p_cand)` in nats, averaged over positions.
//!
//! Not here: generation, sampling, batching, or any change to the models.

use std::ops::ControlFlow;
use std::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::model::Model;
use crate::session::{Session, SessionOptions};

/// A held-out English text of about 5 KB (original prose written for phi3-rs, no third-party
/// material), for perplexity measurements. Not to be used as calibration data.
pub const HELD_TEXT: &str = include_str!("eval/held.txt");

/// How to evaluate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvalOptions {
    /// Most tokens per window (see the module docs); at least 2. Default and upper bound: the
    /// smallest max context of the models evaluated ([`Model::max_context`]).
    pub window: Option<usize>,
}

/// The perplexity of one model over a token sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Perplexity {
    /// Tokens scored (all but the first of each window).
    pub tokens: usize,
    /// Windows the sequence was cut into (those that score at least one token).
    pub windows: usize,
    /// Sum over scored tokens of `-ln p(token | its window's prefix)`, in nats.
    pub nll: f64,
    /// Seconds spent in this model's forward passes.
    pub seconds: f64,
}

impl Perplexity {
    /// Mean negative log-likelihood per scored token, in nats (the cross-entropy).
    pub fn mean_nll(&self) -> f64 {
        self.nll / self.tokens as f64
    }

    /// `exp(mean_nll)`: the vocabulary size for a model that predicts uniformly, 1 for a perfect
    /// one.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// Two models on the same tokens: a `reference` (e.g. native weights) and a `candidate` (e.g.
/// int4). All statistics are over the same scored positions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Comparison {
    /// The reference model's perplexity.
    pub reference: Perplexity,
    /// The candidate model's perplexity.
    pub candidate: Perplexity,
    /// Scored positions where both models' most likely next token is the same.
    pub top1_matches: usize,
    /// Sum over scored positions of `KL(reference ‖ candidate)`, in nats.
    pub kl_sum: f64,
    /// The largest `KL(reference ‖ candidate)` at one position, in nats.
    pub kl_max: f64,
}

impl Comparison {
    /// Fraction of scored positions where the two models' argmax predictions agree, in [0, 1].
    pub fn top1_agreement(&self) -> f64 {
        self.top1_matches as f64 / self.reference.tokens as f64
    }

    /// Mean `KL(reference ‖ candidate)` per scored position, in nats.
    pub fn mean_kl(&self) -> f64 {
        self.kl_sum / self.reference.tokens as f64
    }

    /// Candidate perplexity over reference perplexity (1 = no loss).
    pub fn perplexity_ratio(&self) -> f64 {
        self.candidate.perplexity() / self.reference.perplexity()
    }
}

/// `log softmax(logits)` in f64, stable for large logits (the maximum is subtracted first).
///
/// Errors: `InvalidArgument` for an empty row or a non-finite logit (naming its index).
pub fn log_softmax(logits: &[f32]) -> Result<Vec<f64>> {
    if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
        return Err(Error::invalid_argument(format!("logits[{i}] = {} is not finite", logits[i])));
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if max == f64::NEG_INFINITY {
        return Err(Error::invalid_argument("logits is empty"));
    }
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    // sum >= 1 (the maximum contributes exp(0)), so the log is finite.
    let log_z = max + sum.ln();
    Ok(logits.iter().map(|&x| x as f64 - log_z).collect())
}

/// `KL(p ‖ q) = Σ p (log p - log q)` in nats, from two rows of log-probabilities of equal
/// length (e.g. from [`log_softmax`]). Terms with `p = 0` contribute 0.
pub fn kl_divergence(log_p: &[f64], log_q: &[f64]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| {
            let p = lp.exp();
            if p == 0.0 {
                0.0
            } else {
                p * (lp - lq)
            }
        })
        .sum()
}

/// For each position of `tokens`, `ln p(tokens[i] | the window's tokens before i)`; `None` for
/// the first token of each window (see the module docs for the windowing).
///
/// Errors: see [`compare`]; those that concern two models do not apply.
pub fn token_logprobs(
    model: &Model,
    tokens: &[u32],
    options: &EvalOptions,
) -> Result<Vec<Option<f64>>> {
    let mut out = vec![None; tokens.len()];
    walk(
        &[model],
        tokens,
        options,
        |pos, rows| out[pos] = Some(rows[0][tokens[pos] as usize]),
        |_, _| ControlFlow::Continue(()),
    )?;
    Ok(out)
}

/// The perplexity of `model` on `tokens` (see the module docs for the windowing).
///
/// Errors: see [`compare`]; those that concern two models do not apply.
pub fn perplexity(model: &Model, tokens: &[u32], options: &EvalOptions) -> Result<Perplexity> {
    perplexity_with_progress(model, tokens, options, |_, _| ControlFlow::Continue(()))
}

/// [`perplexity`], calling `on_progress(done, total)` after each scored position (`total`
/// scored positions in all); returning `ControlFlow::Break` stops it with `Cancelled`.
///
/// Errors: those of [`perplexity`], and `Cancelled`.
pub fn perplexity_with_progress(
    model: &Model,
    tokens: &[u32],
    options: &EvalOptions,
    on_progress: impl FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<Perplexity> {
    let mut nll = 0.0;
    let visit = |pos: usize, rows: &[Vec<f64>]| nll -= rows[0][tokens[pos] as usize];
    let walked = walk(&[model], tokens, options, visit, on_progress)?;
    Ok(Perplexity {
        tokens: walked.scored,
        windows: walked.windows,
        nll,
        seconds: walked.seconds[0],
    })
}

/// Compare `candidate` to `reference` on `tokens`: both perplexities, top-1 agreement and mean
/// KL(reference ‖ candidate). The two run in lockstep, position by position, so no logits are
/// stored; both models are held in memory.
///
/// Errors: `InvalidArgument` for fewer than 2 tokens, a window below 2 tokens (also a model
/// max context below 2), or models with different vocabulary sizes; `TokenOutOfRange` naming
/// the first id outside the vocabulary; the models' own errors (backend, out of memory).
pub fn compare(
    reference: &Model,
    candidate: &Model,
    tokens: &[u32],
    options: &EvalOptions,
) -> Result<Comparison> {
    compare_with_progress(reference, candidate, tokens, options, |_, _| ControlFlow::Continue(()))
}

/// [`compare`], calling `on_progress(done, total)` after each scored position (`total` scored
/// positions in all); returning `ControlFlow::Break` stops the evaluation with `Cancelled`.
///
/// Errors: those of [`compare`], and `Cancelled`.
pub fn compare_with_progress(
    reference: &Model,
    candidate: &Model,
    tokens: &[u32],
    options: &EvalOptions,
    on_progress: impl FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<Comparison> {
    let (mut nll_ref, mut nll_cand) = (0.0, 0.0);
    let (mut top1_matches, mut kl_sum, mut kl_max) = (0, 0.0, 0.0f64);
    let walked = walk(
        &[reference, candidate],
        tokens,
        options,
        |pos, rows| {
            let target = tokens[pos] as usize;
            nll_ref -= rows[0][target];
            nll_cand -= rows[1][target];
            if argmax(&rows[0]) == argmax(&rows[1]) {
                top1_matches += 1;
            }
            let kl = kl_divergence(&rows[0], &rows[1]);
            kl_sum += kl;
            kl_max = kl_max.max(kl);
        },
        on_progress,
    )?;
    let stats =
        |nll, seconds| Perplexity { tokens: walked.scored, windows: walked.windows, nll, seconds };
    Ok(Comparison {
        reference: stats(nll_ref, walked.seconds[0]),
        candidate: stats(nll_cand, walked.seconds[1]),
        top1_matches,
        kl_sum,
        kl_max,
    })
}

/// What [`walk`] did.
struct Walked {
    scored: usize,
    windows: usize,
    /// Seconds in each model's forward passes.
    seconds: Vec<f64>,
}

/// Feed `tokens` window by window to one session per model, calling `visit(pos, rows)` for every
/// scored position with each model's log-probabilities for `tokens[pos]`'s slot (`rows[m]` is
/// model `m`'s `[vocab]` row), then `on_progress(done, total)`.
fn walk(
    models: &[&Model],
    tokens: &[u32],
    options: &EvalOptions,
    mut visit: impl FnMut(usize, &[Vec<f64>]),
    mut on_progress: impl FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<Walked> {
    let window = check(models, tokens, options)?;
    let vocab = models[0].config().vocab_size;
    let mut sessions = models
        .iter()
        .map(|m| m.session(SessionOptions { max_context: Some(window), ..Default::default() }))
        .collect::<Result<Vec<Session>>>()?;
    let total = tokens.chunks(window).map(|w| w.len() - 1).sum::<usize>();
    let mut walked = Walked { scored: 0, windows: 0, seconds: vec![0.0; models.len()] };
    let mut rows = vec![Vec::new(); models.len()];
    for (w, chunk) in tokens.chunks(window).enumerate() {
        if chunk.len() < 2 {
            continue;
        }
        walked.windows += 1;
        for session in &mut sessions {
            session.reset();
        }
        for (j, &token) in chunk[..chunk.len() - 1].iter().enumerate() {
            for ((session, row), seconds) in
                sessions.iter_mut().zip(&mut rows).zip(&mut walked.seconds)
            {
                let started = Instant::now();
                let logits = session.append_tokens(&[token])?;
                *seconds += started.elapsed().as_secs_f64();
                if logits.len() != vocab {
                    return Err(Error::internal(format!(
                        "{} logits for a vocabulary of {vocab}",
                        logits.len()
                    )));
                }
                // The model's own output: a non-finite logit is its fault, not the caller's.
                *row = log_softmax(&logits).map_err(|e| {
                    let position = w * window + j;
                    Error::internal(format!("after tokens[{position}]: {}", e.message()))
                })?;
            }
            visit(w * window + j + 1, &rows);
            walked.scored += 1;
            if on_progress(walked.scored, total).is_break() {
                return Err(Error::new(
                    ErrorKind::Cancelled,
                    format!("evaluation stopped after {} of {total} positions", walked.scored),
                ));
            }
        }
    }
    Ok(walked)
}

/// Validate the input of [`walk`]; returns the window size.
fn check(models: &[&Model], tokens: &[u32], options: &EvalOptions) -> Result<usize> {
    let vocab = models[0].config().vocab_size;
    if let Some(m) = models.iter().find(|m| m.config().vocab_size != vocab) {
        return Err(Error::invalid_argument(format!(
            "the models have different vocabularies ({vocab} and {} tokens)",
            m.config().vocab_size
        )));
    }
    if tokens.len() < 2 {
        return Err(Error::invalid_argument(format!(
            "{} tokens to evaluate: need at least 2 (the first only conditions)",
            tokens.len()
        )));
    }
    if let Some(i) = tokens.iter().position(|&t| t as usize >= vocab) {
        return Err(Error::token_out_of_range(i, tokens[i] as i64, vocab));
    }
    let max_context = models.iter().map(|m| m.max_context()).min().unwrap_or(0);
    let window = options.window.unwrap_or(max_context).min(max_context);
    if window < 2 {
        return Err(Error::invalid_argument(format!(
            "a window of {window} tokens scores nothing: need at least 2 (window option {:?}, \
             model max context {max_context})",
            options.window
        )));
    }
    Ok(window)
}

/// Index of the largest value, the lowest among ties.
fn argmax(row: &[f64]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &x)| if x > row[best] { i } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_is_stable_for_large_logits() {
        // exp(1e30) overflows; subtracting the maximum first keeps every term finite.
        let lp = log_softmax(&[1e30, 1e30 - 1e24, -1e30]).unwrap();
        assert_eq!(lp[0], 0.0);
        assert!(lp[1] < -1e23 && lp[2].is_finite() && lp[2] < -1e29, "{lp:?}");
        // Shifting all logits by a constant changes nothing.
        let a = log_softmax(&[3.0, 1.0, -2.0, 0.5]).unwrap();
        let b = log_softmax(&[3.0e4 + 3.0, 3.0e4 + 1.0, 3.0e4 - 2.0, 3.0e4 + 0.5]).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
        let total: f64 = a.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        // Two equal logits among very negative ones: log(1/2) each.
        let c = log_softmax(&[50.0, 50.0, -1e4]).unwrap();
        assert!((c[0] - 0.5f64.ln()).abs() < 1e-12 && c[2] < -1e4 + 60.0);
    }

    #[test]
    fn log_softmax_rejects_bad_rows() {
        assert_eq!(log_softmax(&[]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let e = log_softmax(&[0.0, f32::NAN]).unwrap_err();
        assert!(e.to_string().contains("logits[1]"), "{e}");
        assert!(log_softmax(&[f32::INFINITY, 0.0]).is_err());
    }

    #[test]
    fn uniform_prediction_has_perplexity_equal_to_the_vocabulary() {
        let vocab = 32064;
        let lp = log_softmax(&vec![7.25; vocab]).unwrap();
        let nll: f64 = (0..100).map(|i| -lp[(i * 37) % vocab]).sum();
        let p = Perplexity { tokens: 100, windows: 1, nll, seconds: 0.0 };
        assert!((p.perplexity() - vocab as f64).abs() < 1e-6 * vocab as f64, "{}", p.perplexity());
    }

    #[test]
    fn kl_is_zero_for_equal_rows_and_matches_a_hand_computation() {
        let p = log_softmax(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(kl_divergence(&p, &p), 0.0);
        // p = (1/2, 1/2, 0+), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3).
        let p = [0.5f64.ln(), 0.5f64.ln()];
        let q = [0.25f64.ln(), 0.75f64.ln()];
        let expected = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl_divergence(&p, &q) - expected).abs() < 1e-15);
        assert_eq!(kl_divergence(&[f64::NEG_INFINITY, 0.0], &[-1.0, -0.5]), 0.5);
    }

    #[test]
    fn argmax_takes_the_lowest_index_among_ties() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }
}
