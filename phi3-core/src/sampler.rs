//! Token selection from logits: greedy, temperature, top-k, top-p, min-p, repetition / presence /
//! frequency penalties, logit bias, and a seedable random generator. Pure functions of the logits;
//! no model state.
//!
//! HF reference (transformers 5.24): the processor classes in `generation/logits_process.py`
//! (`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper`,
//! `TopPLogitsWarper`, `MinPLogitsWarper`), applied in the order `_get_logits_processor` in
//! `generation/utils.py` builds them for `do_sample=True`, then `softmax` and `torch.multinomial`
//! as in `_sample`. With temperature 0 we do what HF's `do_sample=False` does: argmax of the
//! logits after the (non-warper) repetition penalty.
//!
//! The pipeline, in order:
//! 1. NaN logits and ids `>= limit` (ids the tokenizer cannot decode, e.g. Phi-3's padding rows)
//!    become -inf, so nothing later can choose them. HF has no such step.
//! 2. Repetition penalty (HF): each distinct id in `penalty_history` (the whole sequence, prompt
//!    included, as HF's `input_ids`) has its logit divided by the penalty if positive (or zero),
//!    multiplied by it if negative.
//! 3. Our extras, which have no HF processor, placed right after the repetition penalty (the
//!    other processor that rewrites logits from the history): frequency then presence penalty over
//!    `generated` (OpenAI / vLLM semantics: `x -= frequency * count; x -= presence` when
//!    `count > 0`), then `logit_bias` added.
//! 4. Temperature (HF): `x / t`, in f32 (torch divides, it does not multiply by `1 / t`).
//! 5. Top-k (HF): remove every logit strictly below the k-th largest. Ties with the k-th value all
//!    survive, so more than k ids can remain.
//! 6. Top-p (HF, `min_tokens_to_keep = 1`): sort ascending, float32 softmax, cumulative sum
//!    (accumulated in f64, each partial sum rounded to f32, as torch's CPU `cumsum`), remove the
//!    ids whose cumulative sum is `<= f32(1 - top_p)` (computed in f64, as Python does), always
//!    keeping the largest. The boundary is inclusive: a prefix summing to exactly `1 - top_p` is
//!    removed. HF sorts with torch's unstable sort, so when the cut falls inside a group of equal
//!    logits it does not define which of them survive; we keep the lower ids (they rank higher, as
//!    greedy's tie rule).
//! 7. Min-p (HF): float32 softmax; remove ids whose probability is strictly below
//!    `min_p * max_probability` (relative to the most likely token, after the filters above).
//! 8. Softmax of what is left (exp and sum in f64; the result rounded to f32).
//!
//! HF adds no processor for temperature 1, top-k 0, top-p 1 or min-p 0; those are no-ops here too.
//!
//! Sampling is inverse-CDF with exactly one [`Rng::next_f64`] draw per token: the first id whose
//! running probability sum exceeds `u * total`. The same seed, logits and options always give the
//! same tokens. `tests/sampler_parity.rs` checks [`probabilities`] against HF's own processors
//! (fixtures from `tests/oracle/make_sampler_fixtures.py`).
//!
//! A top-k draw depends only on the row's largest logits: [`candidate_count`] says how many,
//! [`top_candidates`] is the rule a backend selects them by (CUDA does it on the device, so a
//! step copies back about k pairs instead of the vocabulary), and [`sample_candidates`] draws
//! from them exactly as [`sample`] draws from the whole row, or declines when they cannot decide.

use std::cell::Cell;
use std::cmp::Ordering;

mod exp;

use crate::error::{Error, Result};

/// Sampling settings. The defaults switch everything off and select greedily.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerOptions {
    /// Softmax temperature; 0 selects greedily (HF `do_sample=False`).
    pub temperature: f32,
    /// Keep only the `top_k` largest logits (ties with the k-th included); 0 = off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely ids whose mass reaches `top_p`;
    /// 1.0 = off.
    pub top_p: f32,
    /// Drop ids less likely than `min_p` times the most likely one; 0.0 = off.
    pub min_p: f32,
    /// HF repetition penalty over the whole history (prompt included); 1.0 = off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every id present in the generated tokens; 0.0 = off.
    pub presence_penalty: f32,
    /// Subtracted `count` times from the logit of every id generated `count` times; 0.0 = off.
    pub frequency_penalty: f32,
    /// `(id, bias)`: bias added to that id's logit. A repeated id gets the sum of its biases.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        SamplerOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplerOptions {
    /// Check every field for a model with `vocab` token ids. Errors: `InvalidArgument` naming
    /// the first bad field and its value (a NaN or out-of-range number, a `logit_bias` id
    /// `>= vocab`).
    pub fn validate(&self, vocab: usize) -> Result<()> {
        fn bad(field: &str, value: f32, rule: &str) -> Error {
            Error::invalid_argument(format!("{field} = {value}: {rule}"))
        }
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(bad("temperature", t, "must be a finite number >= 0 (0 = greedy)"));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(bad("top_p", p, "must be in (0, 1] (1 = off)"));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return Err(bad("min_p", m, "must be in [0, 1] (0 = off)"));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(bad("repetition_penalty", r, "must be a finite number > 0 (1 = off)"));
        }
        if !self.presence_penalty.is_finite() {
            return Err(bad("presence_penalty", self.presence_penalty, "must be finite (0 = off)"));
        }
        if !self.frequency_penalty.is_finite() {
            return Err(bad(
                "frequency_penalty",
                self.frequency_penalty,
                "must be finite (0 = off)",
            ));
        }
        for (i, &(id, bias)) in self.logit_bias.iter().enumerate() {
            if id as usize >= vocab {
                return Err(Error::invalid_argument(format!(
                    "logit_bias[{i}]: token id {id} out of range [0, {vocab})"
                )));
            }
            if !bias.is_finite() {
                return Err(Error::invalid_argument(format!(
                    "logit_bias[{i}]: bias {bias} for token id {id} must be finite"
                )));
            }
        }
        Ok(())
    }
}

/// A small deterministic random generator: xoshiro256** (Blackman and Vigna), seeded through
/// SplitMix64 as its authors recommend. Its whole state is four `u64`s ([`Rng::state`]), so a
/// saved session continues the exact same random sequence after [`Rng::from_state`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

/// One SplitMix64 step: advances `x` and returns the next output. The one copy of the
/// generator in the project: the sampler's seeding, dummy weights and test inputs all use it.
pub fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator whose sequence depends only on `seed`.
    pub fn seeded(seed: u64) -> Rng {
        let mut x = seed;
        // SplitMix64 never yields four zero words in a row, so the state is valid for xoshiro.
        let s = [splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x)];
        Rng { s }
    }

    /// A generator seeded from this process's hash randomness (std's `RandomState`, which the OS
    /// seeds), the clock, a per-process counter and a stack address: different on every call
    /// without an extra crate. Not for cryptography.
    pub fn from_entropy() -> Rng {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.write_u128(nanos);
        h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        let local = 0u8;
        h.write_usize(&local as *const u8 as usize);
        Rng::seeded(h.finish())
    }

    /// The full state, for saving; [`Rng::from_state`] restores it.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// Restore a generator saved with [`Rng::state`]. An all-zero state is invalid (xoshiro
    /// would return 0 forever) and gives InvalidArgument; [`Rng::state`] never returns one.
    pub fn from_state(state: [u64; 4]) -> Result<Rng> {
        if state == [0; 4] {
            return Err(Error::invalid_argument(
                "rng state is all zeros (not a saved xoshiro256** state)",
            ));
        }
        Ok(Rng { s: state })
    }

    /// The next 64 random bits (xoshiro256**).
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform number in [0, 1): the top 53 bits of [`Rng::next_u64`], so every value is a
    /// multiple of 2^-53 and 1.0 is never returned.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The id of the largest logit among the first `limit` ids (ids past it cannot be decoded by the
/// tokenizer, e.g. Phi-3's padding rows 32011..32064). Ties go to the lowest id, as torch.argmax.
/// NaN logits are never chosen. Returns None when no logit in range is a number.
pub fn greedy(logits: &[f32], limit: usize) -> Option<u32> {
    let x = &logits[..limit.min(logits.len())];
    // Two passes that vectorise: the largest number (`f32::max` passes over NaN), then the first
    // id holding it (`==` also takes -0.0 for 0.0, as a `>` scan keeps the first of them).
    let max = x.iter().copied().fold(f32::NAN, f32::max);
    if max.is_nan() {
        return None;
    }
    x.iter().position(|&v| v == max).map(|i| i as u32)
}

/// Whether [`sample`] with `opts` takes the argmax of the raw logits: temperature 0 and nothing
/// that rewrites logits (penalties, bias). Its token is then [`greedy_choice`]'s, which a backend
/// can compute where the logits are (`backend::OutputKind::Greedy`).
pub fn is_plain_greedy(opts: &SamplerOptions) -> bool {
    opts.temperature == 0.0
        && opts.repetition_penalty == 1.0
        && opts.presence_penalty == 0.0
        && opts.frequency_penalty == 0.0
        && opts.logit_bias.is_empty()
}

/// The token [`sample`] returns for plain greedy options ([`is_plain_greedy`]): [`greedy`] over
/// the first `limit` ids, None when no logit there is above -inf (NaN never chosen; ties to the
/// lowest id).
pub fn greedy_choice(logits: &[f32], limit: usize) -> Option<u32> {
    greedy_finite(&logits[..limit.min(logits.len())]).map(|i| i as u32)
}

/// The final probability distribution over the ids of `logits` after every processor (see the
/// module docs for the order). Ids `>= limit`, NaN logits and filtered ids get probability 0.
/// With temperature 0 it is one-hot on the greedy choice, the token [`sample`] returns. When no
/// token is possible (every logit in range NaN or -inf) it is all zeros.
///
/// `penalty_history` feeds the repetition penalty (HF: the whole sequence, prompt included);
/// `generated` feeds the presence and frequency penalties (the tokens of this generate call).
/// Ids in either that are outside `logits` are ignored, as HF does.
pub fn probabilities(
    logits: &[f32],
    penalty_history: &[u32],
    generated: &[u32],
    opts: &SamplerOptions,
    limit: usize,
) -> Vec<f32> {
    with_scratch(|s| {
        processed_logits(logits, penalty_history, generated, opts, limit, s);
        if opts.temperature == 0.0 {
            let mut p = vec![0.0; s.logits.len()];
            if let Some(i) = greedy_finite(&s.logits) {
                p[i] = 1.0;
            }
            return p;
        }
        softmax(&s.logits, &mut s.probs);
        s.probs.iter().map(|&p| p as f32).collect()
    })
}

/// Choose the next token: greedy over the processed logits when the temperature is 0 (penalties
/// and bias still apply), otherwise one draw from [`probabilities`]' distribution by inverse CDF,
/// taking exactly one [`Rng::next_f64`]. Never returns an id `>= limit` or one whose logit is NaN.
/// Options are assumed valid ([`SamplerOptions::validate`]); invalid ones give some token or an
/// error, never a panic. Errors (Internal) only when no token is possible (every logit in range
/// NaN or -inf).
pub fn sample(
    logits: &[f32],
    penalty_history: &[u32],
    generated: &[u32],
    opts: &SamplerOptions,
    limit: usize,
    rng: &mut Rng,
) -> Result<u32> {
    let none = || {
        Error::internal(format!(
            "no token can be sampled: all {} logits in range are NaN or -inf after processing",
            limit.min(logits.len())
        ))
    };
    if is_plain_greedy(opts) {
        // Nothing rewrites the logits: the argmax of the raw ones, without a processed copy.
        return greedy_choice(logits, limit).ok_or_else(none);
    }
    with_scratch(|s| {
        processed_logits(logits, penalty_history, generated, opts, limit, s);
        if opts.temperature == 0.0 {
            return greedy_finite(&s.logits).map(|i| i as u32).ok_or_else(none);
        }
        draw(s, rng).map(|i| i as u32).ok_or_else(none)
    })
}

/// Most candidates one row may ask for ([`candidate_count`]): 8 KiB to copy back per row.
pub const MAX_CANDIDATES: usize = 1024;

/// Candidates asked for beyond top-k's `k`, so that the one just below the k-th can show that
/// nothing left out could have survived (see [`sample_candidates`]).
const CANDIDATE_MARGIN: usize = 64;

/// How many of a row's largest logits decide a token with `opts` over a vocabulary of `vocab`
/// ids, so that a backend can hand back just those ([`top_candidates`];
/// `backend::OutputKind::Candidates`). `Some` when
/// - penalties and bias can only lower a logit (repetition penalty >= 1, presence and frequency
///   penalties >= 0, every bias <= 0), so an id left out ends at most at its raw logit over the
///   temperature, and
/// - the temperature is 0 with some penalty or bias (greedy over the processed logits: 1 + a
///   margin; plain greedy needs only `OutputKind::Greedy`), or above 0 with top-k on below
///   `vocab` (the k-th largest processed logit then bounds every survivor: k + a margin, at most
///   [`MAX_CANDIDATES`]).
///
/// None otherwise: the token needs every logit.
pub fn candidate_count(opts: &SamplerOptions, vocab: usize) -> Option<usize> {
    let only_lowering = opts.repetition_penalty >= 1.0
        && opts.presence_penalty >= 0.0
        && opts.frequency_penalty >= 0.0
        && opts.logit_bias.iter().all(|&(_, bias)| bias <= 0.0);
    if !only_lowering {
        return None;
    }
    if opts.temperature == 0.0 {
        return (!is_plain_greedy(opts)).then_some(1 + CANDIDATE_MARGIN);
    }
    let count = opts.top_k.checked_add(CANDIDATE_MARGIN)?;
    let eligible =
        opts.temperature > 0.0 && opts.top_k > 0 && opts.top_k < vocab && count <= MAX_CANDIDATES;
    eligible.then_some(count)
}

/// The `count` largest logits among the first `limit` ids that are above -inf (NaN never taken),
/// as `(id, logit)` in ascending id order. Ranked by [`f32::total_cmp`] (so 0.0 above -0.0), ties
/// to the lower id: the set is defined for any input, and a device computes the same one
/// (`kernels/top_candidates.cu`). Fewer than `count` when fewer ids are above -inf.
pub fn top_candidates(logits: &[f32], limit: usize, count: usize) -> Vec<(u32, f32)> {
    let x = &logits[..limit.min(logits.len())];
    if count == 0 {
        return Vec::new();
    }
    // Each id's ordered bits, 0 for what is never taken (every other value maps above 0).
    let keys: Vec<u32> =
        x.iter().map(|&v| if v > f32::NEG_INFINITY { ordered_bits(v) } else { 0 }).collect();
    // The count-th largest key (0 when fewer ids are live: all of them are taken). Selecting
    // among plain integers is several times faster than among (key, id) pairs.
    let mut sorted = keys.clone();
    let threshold = if count < sorted.len() {
        *sorted.select_nth_unstable_by(count - 1, |a, b| b.cmp(a)).1
    } else {
        0
    };
    // Every id above it, and as many equal to it as fit, the lower ids first.
    let above = keys.iter().filter(|&&k| k > threshold).count();
    let mut ties = if threshold == 0 { 0 } else { count - above };
    let mut out = Vec::with_capacity(count);
    for (i, &k) in keys.iter().enumerate() {
        if k > threshold || (k == threshold && ties > 0) {
            ties -= usize::from(k == threshold);
            out.push((i as u32, x[i]));
        }
    }
    out
}

/// Whether `candidates` could be [`top_candidates`]' answer for `count` below `limit`: at most
/// `count` of them, ids strictly ascending and below `limit`, logits above -inf (not NaN).
/// Err names the first thing wrong. One rule for the device's answer, the sampler's input and a
/// session file's record.
pub fn check_candidates(
    candidates: &[(u32, f32)],
    limit: usize,
    count: usize,
) -> std::result::Result<(), String> {
    if candidates.len() > count {
        return Err(format!("{} of them for {count} asked", candidates.len()));
    }
    if let Some(w) = candidates.windows(2).find(|w| w[0].0 >= w[1].0) {
        return Err(format!("id {} before id {} (ascending and once each)", w[0].0, w[1].0));
    }
    if let Some(&(id, _)) = candidates.iter().find(|&&(id, _)| id as usize >= limit) {
        return Err(format!("id {id} is outside 0..{limit}"));
    }
    if let Some(&(id, v)) = candidates.iter().find(|&&(_, v)| v.is_nan() || v == f32::NEG_INFINITY)
    {
        return Err(format!("id {id} has logit {v}"));
    }
    Ok(())
}

/// [`sample`]'s token for options that [`candidate_count`] accepts, from only the row's
/// `count = candidate_count(..)` largest logits as [`top_candidates`] gives them (`candidates`,
/// ascending ids below `limit`; `penalty_history` and `generated` as for [`sample`]). The same
/// token and the same use of `rng` as [`sample`] over the whole row: every step of the module
/// docs gives the same bits on this subset, because the ids left out would be removed by top-k
/// (or lose to the greedy choice) and add only zeros to the sums.
///
/// That holds when the subset provably holds every survivor: it holds all ids above -inf (fewer
/// than `count` came back), or the smallest candidate's raw logit over the temperature, which
/// bounds every id left out (their rewrites only lower them), is strictly below the k-th largest
/// processed logit (with temperature 0: below the greedy choice's). Otherwise (ties, rounding or
/// penalties across the k-th) Ok(None), with `rng` untouched: the caller samples from the whole
/// row. Errors: Internal for candidates that break the contract, or when no token is possible.
pub fn sample_candidates(
    candidates: &[(u32, f32)],
    count: usize,
    penalty_history: &[u32],
    generated: &[u32],
    opts: &SamplerOptions,
    limit: usize,
    rng: &mut Rng,
) -> Result<Option<u32>> {
    let greedy = opts.temperature == 0.0;
    if !(greedy || opts.top_k > 0) {
        return Err(Error::internal("sampling candidates without top-k or temperature 0"));
    }
    check_candidates(candidates, limit, count)
        .map_err(|e| Error::internal(format!("sampling candidates: {e}")))?;
    let none = || {
        Error::internal(format!(
            "no token can be sampled: all {} candidate logits are -inf after processing, and no \
             other logit is above -inf",
            candidates.len()
        ))
    };
    let t = opts.temperature;
    let scale = |v: f32| if t != 1.0 && t != 0.0 { v / t } else { v };
    // Every id left out had a raw logit at most this (the smallest candidate's), and ends at
    // most at it over the temperature. None: nothing was left out but -inf.
    let bound = if candidates.len() < count {
        None
    } else {
        candidates.iter().map(|&(_, v)| v).min_by(f32::total_cmp).map(scale)
    };
    with_scratch(|s| {
        // Step 1 is done (ids below the limit, no NaN); steps 2-4.
        let x = &mut s.logits;
        x.clear();
        x.extend(candidates.iter().map(|&(_, v)| v));
        let index_of = |id: u32| candidates.binary_search_by_key(&id, |&(c, _)| c).ok();
        let id_at = |i: usize| candidates[i].0 as usize;
        rewrite_logits(x, id_at, index_of, limit, penalty_history, generated, opts, &mut s.seen);
        if greedy {
            sanitize(x);
            return match greedy_finite(x) {
                Some(i) if bound.is_none_or(|b| x[i] > b) => Ok(Some(candidates[i].0)),
                None if bound.is_none() => Err(none()),
                _ => Ok(None),
            };
        }
        divide_by_temperature(x, t);
        // Step 5, with the proof that nothing left out survives it.
        if x.len() >= opts.top_k {
            let kth = kth_largest(x, opts.top_k, &mut s.values);
            if bound.is_some_and(|b| b >= kth) {
                return Ok(None);
            }
            remove_below(x, kth);
        } else if bound.is_some() {
            return Ok(None);
        }
        probability_filters(opts, s);
        draw(s, rng).map(|i| Some(candidates[i].0)).ok_or_else(none)
    })
}

/// Step 8 and the draw: the softmax of `s.logits` and the index it picks with one
/// [`Rng::next_f64`]; None when nothing is above -inf (no draw taken then).
fn draw(s: &mut Scratch, rng: &mut Rng) -> Option<usize> {
    let p = &mut s.probs;
    softmax(&s.logits, p);
    let total: f64 = p.iter().sum();
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    // Scale the draw by the actual total rather than assuming the probabilities sum to exactly
    // 1, so rounding can never push the target past the last id.
    let target = rng.next_f64() * total;
    let mut cum = 0.0;
    let mut last = None;
    for (i, &pi) in p.iter().enumerate() {
        if pi > 0.0 {
            cum += pi;
            last = Some(i);
            if cum > target {
                return Some(i);
            }
        }
    }
    last
}

/// Vocabulary-sized buffers one sampling call works in. Each thread keeps its own between calls:
/// allocating them afresh (about 1.4 MB for Phi-3 with top-p) cost more than the arithmetic,
/// because the allocator hands such blocks back to the kernel and every call faulted the pages in
/// again (docs/PERF.md).
#[derive(Default)]
struct Scratch {
    /// The processed logits (steps 1-7).
    logits: Vec<f32>,
    /// A softmax's output.
    probs: Vec<f64>,
    /// Top-k's copy to select in; top-p's values in sorted order.
    values: Vec<f32>,
    /// Ids seen in the repetition penalty's history.
    seen: Vec<bool>,
    /// Top-p's radix sort: (ordered bits, id) pairs and the buffer each pass scatters into.
    pairs: Vec<(u32, u32)>,
    spare: Vec<(u32, u32)>,
}

thread_local! {
    static SCRATCH: Cell<Scratch> = const {
        Cell::new(Scratch {
            logits: Vec::new(),
            probs: Vec::new(),
            values: Vec::new(),
            seen: Vec::new(),
            pairs: Vec::new(),
            spare: Vec::new(),
        })
    };
}

/// Run `f` with this thread's scratch buffers. Taken out of the thread-local for the call and put
/// back after, so nothing can panic here: a call while they are out, or while the thread exits,
/// gets fresh empty buffers.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut scratch = SCRATCH.try_with(Cell::take).unwrap_or_default();
    let result = f(&mut scratch);
    // Ignored error: the thread is exiting and the buffers are simply dropped.
    let _ = SCRATCH.try_with(|cell| cell.set(scratch));
    result
}

/// Greedy over processed logits, where removed ids are -inf: None when nothing is above -inf.
fn greedy_finite(x: &[f32]) -> Option<usize> {
    let i = greedy(x, x.len())? as usize;
    (x[i] > f32::NEG_INFINITY).then_some(i)
}

/// Steps 1-7 of the module docs into `s.logits`: the logits with every removed id at -inf. With
/// temperature 0, only steps 1-3 (HF's greedy search runs no warpers).
fn processed_logits(
    logits: &[f32],
    penalty_history: &[u32],
    generated: &[u32],
    opts: &SamplerOptions,
    limit: usize,
    s: &mut Scratch,
) {
    let n = logits.len();
    let limit = limit.min(n);
    let x = &mut s.logits;
    x.clear();
    x.extend(logits.iter().enumerate().map(|(i, &v)| {
        if i < limit && !v.is_nan() {
            v
        } else {
            f32::NEG_INFINITY
        }
    }));

    let whole_row = |id: u32| ((id as usize) < n).then_some(id as usize);
    rewrite_logits(x, |i| i, whole_row, n, penalty_history, generated, opts, &mut s.seen);

    if opts.temperature == 0.0 {
        sanitize(x);
        return;
    }
    divide_by_temperature(x, opts.temperature);
    if opts.top_k > 0 && opts.top_k < n {
        let kth = kth_largest(x, opts.top_k, &mut s.values);
        remove_below(x, kth);
    }
    probability_filters(opts, s);
}

/// Step 4: `x / t` in f32 (torch divides, it does not multiply by `1 / t`; nothing for 1), then
/// NaN to -inf: a NaN here (from options that validate() rejects) must not reach the filters.
fn divide_by_temperature(x: &mut [f32], t: f32) {
    if t != 1.0 {
        x.iter_mut().for_each(|v| *v /= t);
    }
    sanitize(x);
}

/// Top-k's threshold: the `k`-th largest of `x` (`1 <= k <= x.len()`) in total order, selected
/// in `scratch`.
fn kth_largest(x: &[f32], k: usize, scratch: &mut Vec<f32>) -> f32 {
    scratch.clear();
    scratch.extend_from_slice(x);
    *scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
}

/// Top-k's cut: everything strictly below `kth` goes; ties with it stay (HF).
fn remove_below(x: &mut [f32], kth: f32) {
    x.iter_mut().filter(|v| **v < kth).for_each(|v| *v = f32::NEG_INFINITY);
}

/// Steps 2-3 of the module docs on `x`, where `x[i]` is the logit of id `id_at(i)` and
/// `index_of(id)` is the entry of `id` (None when `x` has none): the whole row, or a row's
/// candidates. `seen` is scratch for the repetition penalty's ids below `ids_below`.
#[allow(clippy::too_many_arguments)] // the two views of a row, its history and the scratch
fn rewrite_logits(
    x: &mut [f32],
    id_at: impl Fn(usize) -> usize,
    index_of: impl Fn(u32) -> Option<usize>,
    ids_below: usize,
    penalty_history: &[u32],
    generated: &[u32],
    opts: &SamplerOptions,
    seen: &mut Vec<bool>,
) {
    if opts.repetition_penalty != 1.0 {
        // HF gathers the logit of every id in the history once (duplicates write the same value).
        seen.clear();
        seen.resize(ids_below, false);
        for &id in penalty_history {
            if let Some(s) = seen.get_mut(id as usize) {
                *s = true;
            }
        }
        let r = opts.repetition_penalty;
        for (i, v) in x.iter_mut().enumerate() {
            if seen.get(id_at(i)).copied().unwrap_or(false) {
                *v = if *v < 0.0 { *v * r } else { *v / r };
            }
        }
    }

    if opts.presence_penalty != 0.0 || opts.frequency_penalty != 0.0 {
        let mut ids: Vec<u32> = generated.to_vec();
        ids.sort_unstable();
        for run in ids.chunk_by(|a, b| a == b) {
            if let Some(v) = index_of(run[0]).and_then(|i| x.get_mut(i)) {
                *v -= opts.frequency_penalty * run.len() as f32;
                *v -= opts.presence_penalty;
            }
        }
    }

    for &(id, bias) in &opts.logit_bias {
        if let Some(v) = index_of(id).and_then(|i| x.get_mut(i)) {
            *v += bias;
        }
    }
}

/// Steps 6-7 of the module docs (top-p, min-p) on `s.logits`, whose removed ids are -inf.
fn probability_filters(opts: &SamplerOptions, s: &mut Scratch) {
    if opts.top_p < 1.0 {
        top_p_filter(opts.top_p, s);
    }

    if opts.min_p > 0.0 {
        let (x, p) = (&mut s.logits, &mut s.probs);
        softmax(x, p);
        // The f32 probabilities, as HF's f32 softmax gives them.
        let p32 = |i: usize| p[i] as f32;
        if let Some(best) = argmax_f32((0..p.len()).map(p32)) {
            let threshold = opts.min_p * p32(best);
            for (i, v) in x.iter_mut().enumerate() {
                if p32(i) < threshold && i != best {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// NaN becomes -inf (never chosen).
fn sanitize(x: &mut [f32]) {
    x.iter_mut().filter(|v| v.is_nan()).for_each(|v| *v = f32::NEG_INFINITY);
}

/// HF's TopPLogitsWarper with min_tokens_to_keep = 1 (module docs, step 6), on `s.logits`.
fn top_p_filter(top_p: f32, s: &mut Scratch) {
    // -inf entries have probability 0 and cumulative sum 0 <= 1 - top_p: HF removes them, and
    // they are removed already, so sorting only the live ones changes nothing.
    // Ascending by value; among equal values the higher id first, so it is removed first.
    let x = &mut s.logits;
    live_ascending(x, &mut s.pairs, &mut s.spare);
    let live = &s.pairs;
    if live.len() <= 1 {
        return;
    }
    let sorted = &mut s.values;
    sorted.clear();
    sorted.extend(live.iter().map(|&(_, i)| x[i as usize]));
    let p = &mut s.probs;
    softmax(sorted, p);
    // Python computes 1 - top_p in f64; torch compares the f32 tensor with that scalar cast to f32.
    let threshold = (1.0 - f64::from(top_p)) as f32;
    let mut cum = 0.0f64;
    let last = live.len() - 1;
    for (k, (&(_, i), &pk)) in live.iter().zip(p.iter()).enumerate() {
        // torch's CPU cumsum of an f32 tensor accumulates in f64 and rounds each output to f32;
        // the input is the f32 softmax.
        cum += f64::from(pk as f32);
        if k < last && (cum as f32) <= threshold {
            x[i as usize] = f32::NEG_INFINITY;
        }
    }
}

/// Into `pairs`: the ids whose value is above -inf with their values' [`ordered_bits`],
/// ascending in `total_cmp` order of the values, equal values by id descending. A stable LSD
/// radix sort (3 passes of 11 bits, scattering through `spare`) over the ids taken highest first,
/// so ties keep that order. For Phi-3's 32k ids it is several times faster than a comparison sort
/// (docs/PERF.md).
fn live_ascending(x: &[f32], pairs: &mut Vec<(u32, u32)>, spare: &mut Vec<(u32, u32)>) {
    const DIGIT: u32 = 11;
    const BUCKETS: usize = 1 << DIGIT;
    pairs.clear();
    pairs.extend(
        (0..x.len())
            .rev()
            .filter(|&i| x[i] > f32::NEG_INFINITY)
            .map(|i| (ordered_bits(x[i]), i as u32)),
    );
    spare.clear();
    spare.resize(pairs.len(), (0, 0));
    for shift in [0, DIGIT, 2 * DIGIT] {
        let digit = |key: u32| ((key >> shift) as usize) & (BUCKETS - 1);
        let mut starts = [0usize; BUCKETS];
        for &(key, _) in pairs.iter() {
            starts[digit(key)] += 1;
        }
        // All in one bucket: this pass would leave the order as it is.
        if starts.contains(&pairs.len()) {
            continue;
        }
        let mut next = 0;
        for start in starts.iter_mut() {
            (*start, next) = (next, next + *start);
        }
        for &pair in pairs.iter() {
            let d = digit(pair.0);
            spare[starts[d]] = pair;
            starts[d] += 1;
        }
        std::mem::swap(pairs, spare);
    }
}

/// `value`'s bits mapped so that their unsigned order is `value.total_cmp`'s: negative numbers
/// with all bits flipped (larger magnitude first), the others with the sign bit set.
fn ordered_bits(value: f32) -> u32 {
    let bits = value.to_bits();
    // Without a branch (logits' signs are random to a predictor): the sign bit spread over
    // the word flips every bit of a negative number; a positive one gets only its sign bit set.
    let flip = ((bits as i32) >> 31) as u32 | 0x8000_0000;
    bits ^ flip
}

/// Index of the largest value (lowest index on ties); None for an empty sequence.
fn argmax_f32(p: impl IntoIterator<Item = f32>) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, v) in p.into_iter().enumerate() {
        if best.is_none_or(|(_, b)| v.total_cmp(&b) == Ordering::Greater) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// Softmax with f64 exp and sum, into `out`. `x - max` is taken in f32, as torch does, so equal
/// logits give equal probabilities and the f32 result is within a few ulp of torch's. All -inf
/// gives all zeros; +inf logits (an f16 overflow upstream) share all the mass equally.
fn softmax(x: &[f32], out: &mut Vec<f64>) {
    out.clear();
    out.resize(x.len(), 0.0);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY || max.is_nan() {
        return;
    }
    if max == f32::INFINITY {
        let count = x.iter().filter(|&&v| v == f32::INFINITY).count() as f64;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = if v == f32::INFINITY { 1.0 / count } else { 0.0 };
        }
        return;
    }
    // Removed ids (-inf) get exactly 0.
    exp::exp_shifted(x, max, out);
    let sum: f64 = out.iter().sum();
    out.iter_mut().for_each(|v| *v /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn sampling(temperature: f32) -> SamplerOptions {
        SamplerOptions { temperature, ..SamplerOptions::default() }
    }

    /// [`processed_logits`] with fresh buffers.
    fn processed(
        logits: &[f32],
        history: &[u32],
        generated: &[u32],
        opts: &SamplerOptions,
        limit: usize,
    ) -> Vec<f32> {
        let mut scratch = Scratch::default();
        processed_logits(logits, history, generated, opts, limit, &mut scratch);
        scratch.logits
    }

    /// Buffers left by an earlier call on the thread (another size, other options) change
    /// nothing: each call gets what fresh buffers give.
    #[test]
    fn reused_buffers_change_nothing() {
        let mut rng = Rng::seeded(11);
        let big: Vec<f32> = (0..5000).map(|_| rng.next_f64() as f32 * 8.0 - 4.0).collect();
        let small = [0.5, 2.0, f32::NAN, 1.0, -1.0, 2.0];
        let heavy = SamplerOptions {
            temperature: 0.8,
            top_k: 900,
            top_p: 0.7,
            min_p: 0.01,
            repetition_penalty: 1.3,
            ..SamplerOptions::default()
        };
        let light = SamplerOptions { top_p: 0.95, repetition_penalty: 1.2, ..sampling(1.5) };
        let history = [1, 3, 4000];
        let on_fresh_thread = |logits: Vec<f32>, opts: SamplerOptions| {
            std::thread::spawn(move || probabilities(&logits, &history, &[], &opts, 6))
                .join()
                .unwrap()
        };
        let fresh = on_fresh_thread(small.to_vec(), light.clone());
        let _ = probabilities(&big, &[0, 2, 5, 4000], &[], &heavy, big.len());
        assert_eq!(probabilities(&small, &history, &[], &light, 6), fresh);
        let _ = probabilities(&big, &[0, 2, 5, 4000], &[], &heavy, big.len());
        let mut a = Rng::seeded(5);
        let mut b = Rng::seeded(5);
        let opts = light.clone();
        let fresh_token =
            std::thread::spawn(move || sample(&small, &history, &[], &opts, 6, &mut a))
                .join()
                .unwrap();
        assert_eq!(sample(&small, &history, &[], &light, 6, &mut b).ok(), fresh_token.ok());
    }

    /// `top_candidates` is the first `count` of a full sort by (value desc in total order, id).
    #[test]
    fn top_candidates_are_the_largest_by_total_order_then_id() {
        let x = [1.0, f32::NAN, 3.0, -0.0, 0.0, 3.0, f32::NEG_INFINITY, 2.0, 9.0];
        assert_eq!(top_candidates(&x, 8, 2), [(2, 3.0), (5, 3.0)]);
        assert_eq!(top_candidates(&x, 8, 1), [(2, 3.0)]);
        let ids = |c: Vec<(u32, f32)>| c.iter().map(|&(id, _)| id).collect::<Vec<_>>();
        // 0.0 ranks above -0.0; NaN, -inf and ids past the limit are never taken.
        assert_eq!(ids(top_candidates(&x, 8, 5)), [0, 2, 4, 5, 7]);
        assert_eq!(ids(top_candidates(&x, 8, 100)), [0, 2, 3, 4, 5, 7]);
        assert!(top_candidates(&x, 8, 0).is_empty());
        assert!(top_candidates(&x, 0, 3).is_empty());
        let mut rng = Rng::seeded(4);
        let y: Vec<f32> = (0..3000).map(|_| ((rng.next_f64() * 50.0) as i32) as f32).collect();
        let mut order: Vec<u32> = (0..y.len() as u32).collect();
        order.sort_by(|&a, &b| y[b as usize].total_cmp(&y[a as usize]).then(a.cmp(&b)));
        for count in [1, 7, 64, 999] {
            let mut want = order[..count].to_vec();
            want.sort_unstable();
            assert_eq!(ids(top_candidates(&y, y.len(), count)), want, "count {count}");
        }
    }

    /// From the row's candidates, `sample_candidates` gives what `sample` gives from the whole
    /// row with the same generator, or declines (None) without touching the generator; it
    /// declines only when ties, rounding or penalties reach the k-th value (or the greedy one).
    /// Options: temperatures from 0 (greedy over penalised logits) up, top-k, top-p, min-p, and
    /// penalties and biases of both signs (the raising ones must be refused by candidate_count).
    #[test]
    fn candidates_give_what_the_whole_row_gives() {
        let mut rng = Rng::seeded(21);
        let (mut decided, mut declined, mut refused) = (0, 0, 0);
        for case in 0..6000 {
            let n = 50 + (rng.next_u64() % 3000) as usize;
            let limit = n - (rng.next_u64() % 40) as usize;
            let coarse = case % 5 == 0; // few distinct values: ties at the k-th are common
            let mut logits: Vec<f32> = (0..n)
                .map(|_| {
                    let v = rng.next_f64() as f32 * 30.0 - 15.0;
                    if coarse {
                        v.round()
                    } else {
                        v
                    }
                })
                .collect();
            for _ in 0..(rng.next_u64() % 30) {
                let i = (rng.next_u64() as usize) % n;
                logits[i] = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 0.0, -0.0][i % 5];
            }
            let mut pick =
                |options: &[f32]| options[(rng.next_u64() % options.len() as u64) as usize];
            let mut opts = SamplerOptions {
                temperature: pick(&[0.0, 0.3, 0.7, 1.0, 1.3, 1e-3]),
                top_p: pick(&[1.0, 1.0, 0.6, 0.9]),
                min_p: pick(&[0.0, 0.0, 0.05, 0.2]),
                repetition_penalty: pick(&[1.0, 1.0, 1.1, 1.5, 0.9]),
                presence_penalty: pick(&[0.0, 0.0, 0.5, 0.5, -0.5]),
                frequency_penalty: pick(&[0.0, 0.0, 0.3, 0.3, -0.3]),
                ..SamplerOptions::default()
            };
            opts.top_k = 1 + (rng.next_u64() % 200) as usize;
            for _ in 0..(rng.next_u64() % 4) {
                let bias = [-2.0, -0.0, 0.0, -1.0, 1.0][(rng.next_u64() % 5) as usize];
                opts.logit_bias.push(((rng.next_u64() % n as u64) as u32, bias));
            }
            let Some(count) = candidate_count(&opts, n) else {
                let raising = opts.repetition_penalty < 1.0
                    || opts.presence_penalty < 0.0
                    || opts.frequency_penalty < 0.0
                    || opts.logit_bias.iter().any(|&(_, b)| b > 0.0);
                let plain = is_plain_greedy(&opts);
                assert!(raising || plain || opts.top_k >= n, "{opts:?}");
                refused += 1;
                continue;
            };
            // The history mostly among the largest logits, so penalties move the k-th; in a
            // sixth of the cases exactly the candidates, so that ids left out can overtake them.
            let mut by_value: Vec<u32> = (0..n as u32).collect();
            by_value.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
            let history: Vec<u32> = if case % 6 == 1 {
                top_candidates(&logits, limit, count).iter().map(|&(id, _)| id).collect()
            } else {
                (0..rng.next_u64() % 80)
                    .map(|_| by_value[(rng.next_u64() % 120) as usize % n])
                    .collect()
            };
            let generated = &history[history.len() / 2..];
            let seed = rng.next_u64();
            let (mut whole, mut part) = (Rng::seeded(seed), Rng::seeded(seed));
            let want = sample(&logits, &history, generated, &opts, limit, &mut whole);
            let candidates = top_candidates(&logits, limit, count);
            let got =
                sample_candidates(&candidates, count, &history, generated, &opts, limit, &mut part);
            match got {
                Ok(Some(token)) => {
                    decided += 1;
                    assert_eq!(Some(token), want.ok(), "case {case}: {opts:?}");
                    assert_eq!(part, whole, "case {case}: the generator moved differently");
                }
                Ok(None) => {
                    declined += 1;
                    assert_eq!(part, Rng::seeded(seed), "case {case}: declined after a draw");
                }
                Err(e) => assert!(want.is_err(), "case {case}: {e} but sample gave {want:?}"),
            }
        }
        // Most refusals are raising options (about 60%); declines come from ties (the coarse
        // fifth) and from penalised candidates (the sixth whose history is the candidates).
        assert!(decided > 1500 && declined < decided / 4, "{decided} / {declined} / {refused}");
    }

    /// Ties across the k-th value, or candidates that break the contract: declined, or Internal.
    #[test]
    fn candidates_decline_ties_and_reject_bad_input() {
        let opts = SamplerOptions { temperature: 0.5, top_k: 2, ..SamplerOptions::default() };
        let count = candidate_count(&opts, 100).unwrap();
        let mut rng = Rng::seeded(1);
        let draw = |c: &[(u32, f32)], opts: &SamplerOptions, rng: &mut Rng| {
            sample_candidates(c, count, &[], &[], opts, 100, rng)
        };
        let flat = vec![1.0f32; 100];
        let c = top_candidates(&flat, 100, count);
        assert_eq!(draw(&c, &opts, &mut rng).unwrap(), None);
        // All ids above -inf came back: decided, whatever the ties (top-2 keeps all five, as
        // top-k keeps ties with the k-th).
        let few: Vec<f32> = (0..100).map(|i| if i < 5 { 1.0 } else { f32::NEG_INFINITY }).collect();
        let c = top_candidates(&few, 100, count);
        let mut whole = rng.clone();
        let token = draw(&c, &opts, &mut rng).unwrap();
        assert_eq!(token, sample(&few, &[], &[], &opts, 100, &mut whole).ok());
        assert!(token.is_some_and(|t| t < 5));
        for bad in [vec![(3, 1.0), (2, 1.0)], vec![(100, 1.0)], vec![(1, f32::NEG_INFINITY)]] {
            assert_eq!(draw(&bad, &opts, &mut rng).unwrap_err().kind(), ErrorKind::Internal);
        }
        let off = SamplerOptions { top_k: 0, ..opts.clone() };
        assert!(draw(&[(1, 1.0)], &off, &mut rng).is_err());
        // Greedy with a penalty: the penalised maximum loses to the next. With every candidate
        // but the smallest penalised below it, the best is that smallest one, which an id left
        // out could tie: declined.
        let greedy = SamplerOptions { repetition_penalty: 4.0, ..SamplerOptions::default() };
        let count = candidate_count(&greedy, 100).unwrap();
        let row: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let c = top_candidates(&row, 100, count);
        let pick = |c: &[(u32, f32)], history: &[u32]| {
            sample_candidates(c, count, history, &[], &greedy, 100, &mut Rng::seeded(1)).unwrap()
        };
        assert_eq!(pick(&c, &[99]), Some(98));
        assert_eq!(c[0], (35, 35.0));
        assert_eq!(pick(&c, &(36..100).collect::<Vec<u32>>()), None); // 9.0 ..= 24.75 below 35
                                                                      // Options that need the whole row.
        assert_eq!(candidate_count(&SamplerOptions { top_k: 100, ..opts.clone() }, 100), None);
        assert_eq!(candidate_count(&SamplerOptions { top_k: 0, ..opts.clone() }, 100), None);
        assert_eq!(candidate_count(&SamplerOptions::default(), 100), None, "plain greedy");
        let raising = SamplerOptions { repetition_penalty: 0.9, ..opts.clone() };
        assert_eq!(candidate_count(&raising, 100), None);
        let bias = SamplerOptions { logit_bias: vec![(1, -1.0), (2, 1.0)], ..opts.clone() };
        assert_eq!(candidate_count(&bias, 100), None);
        let presence = SamplerOptions { presence_penalty: -0.1, ..opts.clone() };
        assert_eq!(candidate_count(&presence, 100), None);
        let wide = SamplerOptions { top_k: MAX_CANDIDATES, ..opts.clone() };
        assert_eq!(candidate_count(&wide, 100_000), None);
        // Lowering ones keep the candidates.
        let lowering = SamplerOptions {
            repetition_penalty: 1.2,
            presence_penalty: 0.5,
            frequency_penalty: 0.1,
            logit_bias: vec![(3, -5.0), (4, 0.0)],
            ..opts
        };
        assert_eq!(candidate_count(&lowering, 100), Some(2 + CANDIDATE_MARGIN));
    }

    /// The radix sort gives exactly the order of the comparison it replaces, special values and
    /// ties included, and leaves out -inf.
    #[test]
    fn live_ids_follow_total_cmp_then_id_descending() {
        let specials = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-45,
            -1e-45,
            f32::MAX,
            f32::MIN,
            1.5,
            -1.5,
        ];
        let mut rng = Rng::seeded(7);
        let mut x: Vec<f32> = specials.to_vec();
        // Repeats, so that ties are common.
        x.extend((0..500).map(|_| ((rng.next_f64() * 40.0) as i32 - 20) as f32 / 4.0));
        x.extend((0..500).map(|_| f32::from_bits(rng.next_u64() as u32)).filter(|v| !v.is_nan()));
        // A vocabulary's worth of values that share their high bits (one radix pass skipped).
        x.extend((0..33000).map(|_| 1.0 + rng.next_f64() as f32 / 1024.0));
        let mut by_cmp: Vec<usize> = (0..x.len()).filter(|&i| x[i] > f32::NEG_INFINITY).collect();
        by_cmp.sort_by(|&a, &b| x[a].total_cmp(&x[b]).then(b.cmp(&a)));
        // Buffers left dirty by an earlier, larger call, as the thread's scratch ones are.
        let (mut pairs, mut spare) = (vec![(7, 7); 50_000], vec![(9, 9); 3]);
        let mut ids = |x: &[f32]| {
            live_ascending(x, &mut pairs, &mut spare);
            assert!(pairs.iter().all(|&(key, id)| key == ordered_bits(x[id as usize])));
            pairs.iter().map(|&(_, id)| id as usize).collect::<Vec<_>>()
        };
        assert_eq!(ids(&x), by_cmp);
        assert_eq!(ids(&[f32::NEG_INFINITY, 2.0]), [1]);
        assert!(ids(&[]).is_empty());
    }

    /// The two-pass argmax is the first-largest scan it replaced.
    #[test]
    fn greedy_is_the_first_largest_number() {
        let scan = |x: &[f32]| {
            let mut best: Option<(usize, f32)> = None;
            for (i, &v) in x.iter().enumerate().filter(|(_, v)| !v.is_nan()) {
                if best.is_none_or(|(_, b)| v > b) {
                    best = Some((i, v));
                }
            }
            best.map(|(i, _)| i as u32)
        };
        let mut rng = Rng::seeded(3);
        for n in [0, 1, 2, 7, 100, 1000] {
            for _ in 0..20 {
                let x: Vec<f32> = (0..n)
                    .map(|_| match rng.next_u64() % 8 {
                        0 => f32::NAN,
                        1 => -0.0,
                        2 => 0.0,
                        3 => f32::NEG_INFINITY,
                        _ => (rng.next_u64() % 5) as f32,
                    })
                    .collect();
                for limit in [0, n / 2, n, n + 3] {
                    assert_eq!(greedy(&x, limit), scan(&x[..limit.min(n)]), "{x:?} limit {limit}");
                }
            }
        }
    }

    #[test]
    fn greedy_respects_limit_ties_and_nan() {
        assert_eq!(greedy(&[0.0, 2.0, 2.0, 9.0], 3), Some(1));
        assert_eq!(greedy(&[f32::NAN, -1.0], 2), Some(1));
        assert_eq!(greedy(&[f32::NAN], 1), None);
        assert_eq!(greedy(&[], 5), None);
    }

    #[test]
    fn default_options_are_off_and_valid() {
        let o = SamplerOptions::default();
        assert_eq!(o.temperature, 0.0);
        assert!(o.validate(10).is_ok());
        let logits = [1.0, 3.0, 3.0, -2.0];
        assert_eq!(probabilities(&logits, &[], &[], &o, 4), vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn xoshiro_reference_vector() {
        // The reference xoshiro256** outputs for the state [1, 2, 3, 4] (as in rand_xoshiro's tests).
        let mut r = Rng::from_state([1, 2, 3, 4]).unwrap();
        let expected: [u64; 10] = [
            11520,
            0,
            1509978240,
            1215971899390074240,
            1216172134540287360,
            607988272756665600,
            16172922978634559625,
            8476171486693032832,
            10595114339597558777,
            2904607092377533576,
        ];
        for e in expected {
            assert_eq!(r.next_u64(), e);
        }
    }

    #[test]
    fn splitmix_reference_value() {
        // SplitMix64 from state 0: first output 0xE220A8397B1DCDAF (Vigna's reference code).
        let mut x = 0;
        assert_eq!(splitmix64(&mut x), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn rng_state_round_trips_and_zero_state_is_rejected() {
        let mut a = Rng::seeded(7);
        a.next_u64();
        let mut b = Rng::from_state(a.state()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.next_u64(), b.next_u64());
        let e = Rng::from_state([0; 4]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_ne!(Rng::from_entropy(), Rng::from_entropy());
        let mut r = Rng::seeded(1);
        for _ in 0..10_000 {
            let u = r.next_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() {
        let o = SamplerOptions { repetition_penalty: 2.0, ..sampling(1.0) };
        // ids 0 (positive), 1 (negative), 2 (zero) penalised; id 3 not; 99 is outside and ignored.
        let x = processed(&[4.0, -3.0, 0.0, 1.0], &[0, 1, 1, 2, 99], &[], &o, 4);
        assert_eq!(x, vec![2.0, -6.0, 0.0, 1.0]);
    }

    #[test]
    fn presence_frequency_and_bias_by_hand() {
        let o = SamplerOptions {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logit_bias: vec![(3, 2.0), (1, -1.0), (3, 0.5)],
            ..sampling(1.0)
        };
        // id 0 generated 3 times: 1 - 3 * 0.25 - 0.5 = -0.25; id 1 once: 2 - 0.25 - 0.5 - 1 = 0.25;
        // id 2 never; id 3 biased twice: 0 + 2 + 0.5; id 9 is outside and ignored.
        let x = processed(&[1.0, 2.0, 3.0, 0.0], &[], &[0, 1, 0, 0, 9], &o, 4);
        assert_eq!(x, vec![-0.25, 0.25, 3.0, 2.5]);
        // Penalties come after the repetition penalty: (4 / 2) - 0.25 - 0.5.
        let o = SamplerOptions { repetition_penalty: 2.0, ..o };
        let x = processed(&[4.0, 2.0, 3.0, 0.0], &[0], &[0], &o, 4);
        assert_eq!(x[0], 1.25);
        // Negative penalties raise logits (OpenAI allows them).
        let o = SamplerOptions { presence_penalty: -1.0, ..sampling(1.0) };
        let x = processed(&[1.0, 2.0], &[], &[0], &o, 2);
        assert_eq!(x, vec![2.0, 2.0]);
    }

    #[test]
    fn greedy_at_temperature_zero_sees_penalties_and_bias() {
        let logits = [1.0, 3.0, 2.0, 10.0];
        let mut rng = Rng::seeded(0);
        let o = sampling(0.0);
        // id 3 is past the limit.
        assert_eq!(sample(&logits, &[], &[], &o, 3, &mut rng).unwrap(), 1);
        let o = SamplerOptions { logit_bias: vec![(2, 1.5)], ..sampling(0.0) };
        assert_eq!(sample(&logits, &[], &[], &o, 3, &mut rng).unwrap(), 2);
        let o = SamplerOptions { repetition_penalty: 2.0, ..sampling(0.0) };
        assert_eq!(sample(&logits, &[1], &[], &o, 3, &mut rng).unwrap(), 2);
        let o = SamplerOptions { frequency_penalty: 1.5, ..sampling(0.0) };
        assert_eq!(sample(&logits, &[], &[1], &o, 3, &mut rng).unwrap(), 2);
        // Greedy takes no random draw.
        assert_eq!(rng, Rng::seeded(0));
        // Ties go to the lowest id.
        assert_eq!(sample(&[5.0, 5.0], &[], &[], &sampling(0.0), 2, &mut rng).unwrap(), 0);
    }

    #[test]
    fn top_k_keeps_ties_with_the_kth() {
        let o = SamplerOptions { top_k: 2, ..sampling(1.0) };
        let x = processed(&[1.0, 5.0, 3.0, 3.0, 0.0], &[], &[], &o, 5);
        let ninf = f32::NEG_INFINITY;
        assert_eq!(x, vec![ninf, 5.0, 3.0, 3.0, ninf]);
        let o = SamplerOptions { top_k: 100, ..sampling(1.0) };
        assert_eq!(processed(&[1.0, 2.0], &[], &[], &o, 2), vec![1.0, 2.0]);
    }

    #[test]
    fn top_p_boundary_is_inclusive_and_ties_keep_lower_ids() {
        // Four equal logits: probabilities exactly 0.25, cumulative 0.25, 0.5, 0.75, 1.
        let logits = [0.0; 4];
        let p = |top_p: f32| {
            let o = SamplerOptions { top_p, ..sampling(1.0) };
            probabilities(&logits, &[], &[], &o, 4)
        };
        // 1 - 0.5 = 0.5: the two lowest-ranked (highest ids) are removed, cumsum 0.5 included.
        assert_eq!(p(0.5), vec![0.5, 0.5, 0.0, 0.0]);
        assert_eq!(p(0.75), vec![1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0]);
        assert_eq!(p(1e-6), vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(p(0.9), vec![0.25; 4]);
    }

    #[test]
    fn min_p_is_relative_to_the_top_probability() {
        // Probabilities e^0 : e^-1 : e^-3 ~ 0.71 : 0.26 : 0.035. min_p 0.3 -> threshold 0.21.
        let o = SamplerOptions { min_p: 0.3, ..sampling(1.0) };
        let p = probabilities(&[0.0, -1.0, -3.0], &[], &[], &o, 3);
        assert!(p[0] > 0.0 && p[1] > 0.0 && p[2] == 0.0);
        // min_p 1 keeps exactly the ties with the maximum.
        let o = SamplerOptions { min_p: 1.0, ..sampling(1.0) };
        let p = probabilities(&[2.0, 1.0, 2.0], &[], &[], &o, 3);
        assert_eq!(p, vec![0.5, 0.0, 0.5]);
    }

    #[test]
    fn nan_limit_and_dead_logits() {
        let mut rng = Rng::seeded(3);
        let o = SamplerOptions {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 3,
            min_p: 0.1,
            ..Default::default()
        };
        let logits = [f32::NAN, 0.0, f32::NAN, 0.5, 9.0];
        for _ in 0..200 {
            let t = sample(&logits, &[], &[], &o, 4, &mut rng).unwrap();
            assert!(t == 1 || t == 3, "{t}");
        }
        let p = probabilities(&logits, &[], &[], &o, 4);
        assert_eq!((p[0], p[2], p[4]), (0.0, 0.0, 0.0));
        // Nothing possible: an Internal error, not a panic; probabilities are all zero.
        for t in [0.0, 1.0] {
            let o = sampling(t);
            let dead = [f32::NAN, f32::NEG_INFINITY, 5.0];
            let e = sample(&dead, &[], &[], &o, 2, &mut rng).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Internal);
            assert_eq!(probabilities(&dead, &[], &[], &o, 2), vec![0.0; 3]);
            assert!(sample(&[], &[], &[], &o, 10, &mut rng).is_err());
        }
        // +inf logits share the mass.
        let p = probabilities(&[f32::INFINITY, 1.0, f32::INFINITY], &[], &[], &sampling(1.0), 3);
        assert_eq!(p, vec![0.5, 0.0, 0.5]);
    }

    #[test]
    fn invalid_options_do_not_panic() {
        let mut rng = Rng::seeded(0);
        let bad = SamplerOptions {
            temperature: f32::NAN,
            top_p: f32::NAN,
            min_p: f32::INFINITY,
            repetition_penalty: 0.0,
            ..Default::default()
        };
        let _ = sample(&[1.0, 2.0], &[0], &[1], &bad, 2, &mut rng);
        let _ = probabilities(&[1.0, 2.0], &[0], &[1], &bad, 2);
    }

    #[test]
    fn validate_names_the_field() {
        let cases: Vec<(SamplerOptions, &str)> = vec![
            (sampling(-1.0), "temperature"),
            (sampling(f32::NAN), "temperature"),
            (sampling(f32::INFINITY), "temperature"),
            (SamplerOptions { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplerOptions { top_p: 1.5, ..Default::default() }, "top_p"),
            (SamplerOptions { top_p: f32::NAN, ..Default::default() }, "top_p"),
            (SamplerOptions { min_p: -0.1, ..Default::default() }, "min_p"),
            (SamplerOptions { min_p: 1.1, ..Default::default() }, "min_p"),
            (SamplerOptions { min_p: f32::NAN, ..Default::default() }, "min_p"),
            (
                SamplerOptions { repetition_penalty: 0.0, ..Default::default() },
                "repetition_penalty",
            ),
            (
                SamplerOptions { repetition_penalty: -1.0, ..Default::default() },
                "repetition_penalty",
            ),
            (
                SamplerOptions { repetition_penalty: f32::INFINITY, ..Default::default() },
                "repetition_penalty",
            ),
            (
                SamplerOptions { presence_penalty: f32::NAN, ..Default::default() },
                "presence_penalty",
            ),
            (
                SamplerOptions { frequency_penalty: f32::NEG_INFINITY, ..Default::default() },
                "frequency_penalty",
            ),
            (
                SamplerOptions { logit_bias: vec![(1, 1.0), (10, 1.0)], ..Default::default() },
                "logit_bias[1]: token id 10",
            ),
            (
                SamplerOptions { logit_bias: vec![(2, f32::NAN)], ..Default::default() },
                "logit_bias[0]",
            ),
        ];
        for (o, field) in cases {
            let e = o.validate(10).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.message().contains(field), "{:?} -> {}", o, e.message());
        }
        let ok = SamplerOptions {
            temperature: 0.7,
            top_k: 5,
            top_p: 1.0,
            min_p: 1.0,
            repetition_penalty: 0.5,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            logit_bias: vec![(9, -100.0)],
        };
        assert!(ok.validate(10).is_ok());
    }
}
