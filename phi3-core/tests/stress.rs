//! Concurrency stress: many threads, many sessions on shared models, random operations; then
//! every thread's log is replayed on one thread and every outcome must be identical.
//!
//! Each worker thread owns [`SLOTS`] session slots on a model it shares with the other threads
//! (the demo model, whose LongRoPE threshold of 64 tokens ordinary chats cross; two more threads
//! use the `gqa-longrope-bf16` fixture, threshold 16, token input only). It runs operations drawn
//! from its own seeded generator until the time budget is spent: `append_text`, `append_tokens`,
//! `append_message`, `generate` (greedy and seeded sampling, stop strings, stop ids, a callback
//! that stops, a cancel fired from another thread after a random delay), `logits`, `fork`,
//! `truncate`, `reset`, `save`, `load`, new sessions and drops, including calls that must fail
//! (context full, bad token ids, truncating past the end, a missing file). It logs each
//! operation with what it observed: the tokens and text produced, the finish reason or error
//! kind and message, and the touched session's tokens, cache state and last logits (hashed).
//! `save` also records a hash of the file without its RNG words (sessions made by
//! `Model::session` draw their RNG from entropy, so only the rest is reproducible).
//!
//! The replay runs each log on the main thread and demands the same outcomes, bit for bit (the
//! CPU backend is deterministic for a given sequence of forward passes; it is *not* invariant to
//! how a session's tokens are grouped into passes, so the replay must make the same passes). The
//! concurrent phase runs through the model's scheduler, which batches the passes of sessions on
//! different threads (continuous batching); the replay runs each pass alone, so the test also
//! checks that batching never changes a session's results.
//!
//! Cancellation is the one thing a replay cannot reproduce, because where it lands depends on
//! timing. A cancelled generate that produced `n` tokens replays as:
//! - `n == 0`: nothing. The session must hold exactly the tokens it held before the call.
//! - `n > 0` and the original ended with the output of its last token computed (its logits, or
//!   for greedy options only its greedy choice, for top-k options only its candidates: the
//!   cancel was seen at the top of the next step): the same generate, cancelled from its own callback after
//!   token `n`, which takes exactly that path.
//! - otherwise (the cancel was seen before token `n`'s forward pass): the same generate limited
//!   to `max_tokens = n`, which stops at the same place.
//!
//! The produced tokens, text and session tokens must then be equal. Where the cancel landed can
//! still leave the hidden cache differently filled (a prefill stopped between chunks, a cache
//! emptied for a LongRoPE switch before the cancel was seen), or filled with other bits: a
//! generate whose sampler needs the logits that a greedy pass did not keep recomputes the last
//! position in a one-row pass, whose rows take the decode path and round differently from the
//! prefill that computed it first, and a cancel after that pass leaves those bits in the cache.
//! When the cache state differs (the whole session file is compared), the
//! replay checks that everything else in the session file (tokens, chat messages, pending
//! assistant prompt, max context) is equal and that the snapshot's next logits equal its own up
//! to rounding (the cancel left a consistent cache), then continues from the snapshot the worker
//! saved right after that call, so later operations are again compared bit for bit. The number
//! of such resynchronisations is printed.
//!
//! Environment: `PHI3_STRESS_SECS` (default 20): the whole test's budget; 30% goes to the
//! concurrent phase, the replay takes about twice as long. `PHI3_STRESS_THREADS` (default 8) demo
//! threads; `PHI3_STRESS_SEED` (default 1) the base seed. A thread that does not finish within
//! a minute of the deadline fails the test as a hang.
//!
//! Not run under ThreadSanitizer: with the stable toolchain std cannot be rebuilt instrumented
//! (`-Zbuild-std` needs `rust-src`), so synchronisation inside std's futex-based Mutex, Condvar
//! and Once (rayon's `LockLatch`, `OnceLock`, thread join) is invisible to it, and it reports
//! hundreds of races per second here, the same kinds it reports for a race-free single-caller
//! rayon program.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use phi3_core::{
    demo, Device, ErrorKind, FinishReason, GenerateOptions, LoadOptions, Model, Session,
    SessionOptions,
};

/// Session slots per worker thread.
const SLOTS: usize = 4;
/// Save/load file names per worker thread.
const FILES: usize = 3;
/// How long past the deadline a worker may take before the test calls it a hang.
const HANG_LIMIT: Duration = Duration::from_secs(60);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// SplitMix64: the worker's operation generator (independent of the library's RNG).
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        phi3_core::sampler::splitmix64(&mut self.0)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn in_range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A model the workers share and what it supports.
#[derive(Clone)]
struct Subject {
    name: &'static str,
    model: Model,
    /// Has a tokenizer: text, chat and generate work.
    text: bool,
    /// `max_context` choices for new sessions (`None`: the model's maximum).
    contexts: &'static [Option<usize>],
}

#[derive(Clone, Debug)]
enum Op {
    New {
        slot: usize,
        max_context: Option<usize>,
    },
    Drop {
        slot: usize,
    },
    AppendText {
        slot: usize,
        text: String,
    },
    AppendTokens {
        slot: usize,
        tokens: Vec<u32>,
    },
    AppendMessage {
        slot: usize,
        role: &'static str,
        content: String,
    },
    Generate {
        slot: usize,
        options: GenerateOptions,
        stop_after: Option<usize>,
        cancel_us: Option<u64>,
    },
    Logits {
        slot: usize,
    },
    Fork {
        src: usize,
        dst: usize,
    },
    Truncate {
        slot: usize,
        n: usize,
    },
    Reset {
        slot: usize,
    },
    Save {
        slot: usize,
        file: usize,
    },
    Load {
        slot: usize,
        file: usize,
    },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::New { .. } => "new",
            Op::Drop { .. } => "drop",
            Op::AppendText { .. } => "append_text",
            Op::AppendTokens { .. } => "append_tokens",
            Op::AppendMessage { .. } => "append_message",
            Op::Generate { cancel_us: Some(_), .. } => "generate+cancel",
            Op::Generate { .. } => "generate",
            Op::Logits { .. } => "logits",
            Op::Fork { .. } => "fork",
            Op::Truncate { .. } => "truncate",
            Op::Reset { .. } => "reset",
            Op::Save { .. } => "save",
            Op::Load { .. } => "load",
        }
    }

    /// The slot whose session the operation changes or reads.
    fn slot(&self) -> usize {
        match *self {
            Op::New { slot, .. }
            | Op::Drop { slot }
            | Op::AppendText { slot, .. }
            | Op::AppendTokens { slot, .. }
            | Op::AppendMessage { slot, .. }
            | Op::Generate { slot, .. }
            | Op::Logits { slot }
            | Op::Truncate { slot, .. }
            | Op::Reset { slot }
            | Op::Save { slot, .. }
            | Op::Load { slot, .. } => slot,
            Op::Fork { dst, .. } => dst,
        }
    }
}

/// What a session shows: its tokens (hashed), max context, cache state and last logits (hashed).
#[derive(Clone, Debug, PartialEq, Eq)]
struct View {
    len: usize,
    tokens: u64,
    max_context: usize,
    /// `Session::kv_state`: (cached tokens, long LongRoPE factors).
    kv: (usize, bool),
    logits: Option<u64>,
    /// `Session::has_last_output`: the last token's output is held (logits, or a greedy step's
    /// token only).
    output: bool,
}

type Failure = (ErrorKind, String);

/// What one operation returned.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Res {
    Done,
    Failed(Failure),
    /// `append_tokens` or `logits`: the logits' hash.
    Logits(u64),
    /// `save`: hash of the file without its RNG state.
    Saved(u64),
    /// `generate`: the streamed tokens and text, then how the call ended.
    Generated {
        tokens: Vec<u32>,
        text: String,
        end: Result<FinishReason, Failure>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Outcome {
    res: Res,
    /// The touched slot afterwards (None: empty).
    view: Option<View>,
}

/// One logged operation.
struct Entry {
    op: Op,
    outcome: Outcome,
    /// For a cancelled generate: the session saved right after it.
    snapshot: Option<PathBuf>,
}

/// How a generate is cancelled.
#[derive(Clone, Copy, Debug)]
enum Cancel {
    /// Not at all.
    No,
    /// From another thread after this delay (the concurrent run).
    After(Duration),
    /// From the callback, after this many tokens (replay).
    AtToken(usize),
    /// Not cancelled; generate at most this many tokens (replay).
    Limit(usize),
    /// Skip the call (replay of a cancel before any token).
    Skip,
}

fn hash<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

fn hash_f32(values: &[f32]) -> u64 {
    let mut h = DefaultHasher::new();
    values.iter().for_each(|x| x.to_bits().hash(&mut h));
    h.finish()
}

fn view(slot: &Option<Session>) -> Option<View> {
    slot.as_ref().map(|s| View {
        len: s.len(),
        tokens: hash(s.tokens()),
        max_context: s.max_context(),
        kv: s.kv_state(),
        logits: s.last_logits().map(hash_f32),
        output: s.has_last_output(),
    })
}

fn failure(e: phi3_core::Error, dir: &Path) -> Failure {
    // Paths differ between the run and the replay.
    (e.kind(), e.to_string().replace(&dir.display().to_string(), "<dir>"))
}

fn file(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("f{index}.phi3"))
}

/// The session file's JSON header (without the RNG state) and body (without the checksum).
fn file_parts(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let (mut header, rest) = common::session_header(&bytes);
    header.as_object_mut().unwrap().remove("rng_state");
    (header, rest[..rest.len() - 32].to_vec())
}

/// Run `op` on `slots`. Panics on a broken invariant that needs no replay to see (streamed text
/// differs from the result, tokens missing from the session).
fn run_op(
    op: &Op,
    slots: &mut [Option<Session>],
    subject: &Subject,
    dir: &Path,
    cancel: Cancel,
) -> Outcome {
    let model = &subject.model;
    let fail = |e| Res::Failed(failure(e, dir));
    let unit = |r: phi3_core::Result<()>| r.map_or_else(fail, |()| Res::Done);
    let res = match op {
        Op::New { slot, max_context } => {
            match model.session(SessionOptions { max_context: *max_context, ..Default::default() })
            {
                Ok(s) => {
                    slots[*slot] = Some(s);
                    Res::Done
                }
                Err(e) => fail(e),
            }
        }
        Op::Drop { slot } => {
            slots[*slot] = None;
            Res::Done
        }
        Op::AppendText { slot, text } => unit(session(slots, *slot).append_text(text)),
        Op::AppendTokens { slot, tokens } => session(slots, *slot)
            .append_tokens(tokens)
            .map_or_else(fail, |l| Res::Logits(hash_f32(&l))),
        Op::AppendMessage { slot, role, content } => {
            unit(session(slots, *slot).append_message(role, content))
        }
        Op::Generate { slot, options, stop_after, .. } => {
            generate(session(slots, *slot), options, *stop_after, cancel, dir)
        }
        Op::Logits { slot } => {
            session(slots, *slot).logits().map_or_else(fail, |l| Res::Logits(hash_f32(l)))
        }
        Op::Fork { src, dst } => match session(slots, *src).fork() {
            Ok(f) => {
                slots[*dst] = Some(f);
                Res::Done
            }
            Err(e) => fail(e),
        },
        Op::Truncate { slot, n } => unit(session(slots, *slot).truncate(*n)),
        Op::Reset { slot } => {
            session(slots, *slot).reset();
            Res::Done
        }
        Op::Save { slot, file: f } => {
            let path = file(dir, *f);
            match session(slots, *slot).save(&path) {
                Ok(()) => {
                    let (header, body) = file_parts(&path);
                    Res::Saved(hash(&(header.to_string(), body)))
                }
                Err(e) => fail(e),
            }
        }
        Op::Load { slot, file: f } => match Session::load(model, file(dir, *f)) {
            Ok(s) => {
                slots[*slot] = Some(s);
                Res::Done
            }
            Err(e) => fail(e),
        },
    };
    Outcome { res, view: view(&slots[op.slot()]) }
}

fn session(slots: &mut [Option<Session>], slot: usize) -> &mut Session {
    slots[slot].as_mut().expect("operations are drawn for occupied slots only")
}

fn generate(
    s: &mut Session,
    options: &GenerateOptions,
    stop_after: Option<usize>,
    cancel: Cancel,
    dir: &Path,
) -> Res {
    let mut options = options.clone();
    match cancel {
        Cancel::Skip => {
            return Res::Generated {
                tokens: Vec::new(),
                text: String::new(),
                end: Err((ErrorKind::Cancelled, "skipped".into())),
            }
        }
        Cancel::Limit(n) => options.max_tokens = n,
        _ => {}
    }
    let before = s.tokens().to_vec();
    let token = s.cancel_token();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut call = |s: &mut Session| {
        s.generate(&options, |piece, t| {
            text.push_str(piece);
            tokens.extend(t);
            if matches!(cancel, Cancel::AtToken(n) if t.is_some() && tokens.len() == n) {
                token.cancel();
            }
            match stop_after {
                Some(n) if t.is_some() && tokens.len() == n => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        })
    };
    let result = match cancel {
        Cancel::After(delay) => {
            let token = s.cancel_token();
            std::thread::scope(|scope| {
                scope.spawn(move || {
                    std::thread::sleep(delay);
                    token.cancel();
                });
                // The scope joins the canceller: its cancel lands before the next operation.
                call(s)
            })
        }
        _ => call(s),
    };
    let end = match result {
        Ok(r) => {
            // The stop token is in the result (and the session) but not streamed.
            let streamed = match r.finish_reason {
                FinishReason::Eos => &r.tokens[..r.tokens.len() - 1],
                _ => &r.tokens[..],
            };
            assert_eq!(streamed, tokens, "result tokens differ from the streamed ones");
            assert_eq!(r.text, text, "result text differs from the streamed chunks");
            tokens = r.tokens;
            Ok(r.finish_reason)
        }
        Err(e) => Err(failure(e, dir)),
    };
    // Every produced token is in the session, right after what was there (plus any assistant
    // prompt the call added).
    if !tokens.is_empty() {
        let all = s.tokens();
        assert!(all.len() >= before.len() + tokens.len());
        assert_eq!(
            &all[all.len() - tokens.len()..],
            &tokens[..],
            "generated tokens not in the session"
        );
        assert_eq!(&all[..before.len()], &before[..], "generate changed the earlier history");
    }
    Res::Generated { tokens, text, end }
}

const WORDS: &[&str] = &[
    "the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "rained", "story", "time", "world",
    "hello", "water", "under", "bridge", "quietly", "running", "tomorrow", "café", "naïve", "😀",
    "日本", "x", "?", "!", "1234", "  ", "\n",
];

fn words(r: &mut Rand, n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(r.pick::<&str>(WORDS));
    }
    s
}

fn random_options(r: &mut Rand, vocab: usize) -> GenerateOptions {
    let mut o = GenerateOptions {
        max_tokens: if r.chance(0.03) { 0 } else { 1 + r.below(16) },
        skip_special_tokens: r.chance(0.8),
        ..Default::default()
    };
    if r.chance(0.5) {
        o.temperature = r.in_range(0.3, 1.5);
        o.seed = Some(r.next());
        if r.chance(0.3) {
            o.top_k = 1 + r.below(40);
        }
        if r.chance(0.3) {
            o.top_p = r.in_range(0.5, 1.0);
        }
        if r.chance(0.2) {
            o.min_p = r.in_range(0.0, 0.2);
        }
    }
    if r.chance(0.2) {
        o.repetition_penalty = r.in_range(0.8, 1.5);
    }
    if r.chance(0.1) {
        o.presence_penalty = r.in_range(-1.0, 1.0);
        o.frequency_penalty = r.in_range(-1.0, 1.0);
    }
    if r.chance(0.1) {
        o.logit_bias = vec![(r.below(vocab) as u32, r.in_range(-5.0, 5.0))];
    }
    if r.chance(0.15) {
        o.stop = vec![r.pick(&["e", "th", "the", " ", "ing", "😀"]).to_string()];
    }
    o.stop_token_ids = match r.below(10) {
        0..=4 => None,
        5..=8 => Some(vec![]),
        _ => Some(vec![r.below(vocab) as u32]),
    };
    o
}

/// Draw the next operation for a worker whose sessions are `slots`.
fn draw(r: &mut Rand, slots: &[Option<Session>], subject: &Subject) -> Op {
    let vocab = subject.model.config().vocab_size;
    let slot = r.below(SLOTS);
    let Some(s) = &slots[slot] else {
        return if r.chance(0.8) {
            Op::New { slot, max_context: *r.pick(subject.contexts) }
        } else {
            Op::Load { slot, file: r.below(FILES) }
        };
    };
    let len = s.len();
    // Keep sessions short enough that operations stay fast.
    if len > 700 && r.chance(0.5) {
        return Op::Truncate { slot, n: r.below(300) };
    }
    loop {
        // Mostly fill an empty session (calls on one are errors, a few of which are kept).
        let roll = if len == 0 && r.chance(0.8) { r.below(36) } else { r.below(100) };
        let op = match roll {
            0..=13 if subject.text => {
                let n = if r.chance(0.03) { 200 + r.below(500) } else { 1 + r.below(12) };
                Op::AppendText { slot, text: words(r, n) }
            }
            14..=25 if subject.text => {
                let role = *r.pick(&["user", "user", "assistant", "system"]);
                let n = if r.chance(0.03) { 200 + r.below(400) } else { 1 + r.below(10) };
                Op::AppendMessage { slot, role, content: words(r, n) }
            }
            26..=35 => {
                let n = if r.chance(0.02) { 0 } else { 1 + r.below(8) };
                let mut tokens: Vec<u32> = (0..n).map(|_| r.below(vocab) as u32).collect();
                if n > 0 && r.chance(0.03) {
                    tokens[r.below(n)] = vocab as u32; // out of range
                }
                Op::AppendTokens { slot, tokens }
            }
            36..=62 if subject.text || r.chance(0.05) => {
                let options = random_options(r, vocab);
                let (stop_after, cancel_us) = match r.below(10) {
                    0 => (Some(1 + r.below(6)), None),
                    1 | 2 => (None, Some(r.next() % [300, 3_000, 10_000, 30_000][r.below(4)])),
                    _ => (None, None),
                };
                Op::Generate { slot, options, stop_after, cancel_us }
            }
            63..=69 => Op::Logits { slot },
            70..=75 => Op::Fork { src: slot, dst: r.below(SLOTS) },
            76..=84 => {
                Op::Truncate { slot, n: if r.chance(0.05) { len + 1 } else { r.below(len + 1) } }
            }
            85..=86 => Op::Reset { slot },
            87..=91 => Op::Save { slot, file: r.below(FILES) },
            92..=95 => Op::Load { slot, file: r.below(FILES) },
            96..=97 => Op::Drop { slot },
            98..=99 => Op::New { slot, max_context: *r.pick(subject.contexts) },
            _ => continue,
        };
        return op;
    }
}

/// One worker's run: operations until `deadline`, logged.
fn worker(subject: &Subject, seed: u64, dir: &Path, deadline: Instant) -> Vec<Entry> {
    let mut r = Rand(seed);
    let mut slots: Vec<Option<Session>> = (0..SLOTS).map(|_| None).collect();
    let mut log = Vec::new();
    while Instant::now() < deadline {
        let op = draw(&mut r, &slots, subject);
        let cancel = match op {
            Op::Generate { cancel_us: Some(us), .. } => Cancel::After(Duration::from_micros(us)),
            _ => Cancel::No,
        };
        let outcome = run_op(&op, &mut slots, subject, dir, cancel);
        let cancelled =
            matches!(&outcome.res, Res::Generated { end: Err((ErrorKind::Cancelled, _)), .. });
        let snapshot = cancelled.then(|| {
            let path = dir.join(format!("snapshot-{}.phi3", log.len()));
            slots[op.slot()].as_ref().unwrap().save(&path).unwrap();
            path
        });
        log.push(Entry { op, outcome, snapshot });
    }
    log
}

#[derive(Default)]
struct Tally {
    ops: BTreeMap<&'static str, usize>,
    cancels_landed: usize,
    cancels_before_first_token: usize,
    resyncs: usize,
    errors: BTreeMap<String, usize>,
}

/// Replay `log` on this thread; panic at the first outcome that differs.
fn replay(worker_name: &str, subject: &Subject, log: &[Entry], tally: &mut Tally) {
    let dir = tempfile::tempdir().unwrap();
    let mut slots: Vec<Option<Session>> = (0..SLOTS).map(|_| None).collect();
    for (i, entry) in log.iter().enumerate() {
        let (op, want) = (&entry.op, &entry.outcome);
        *tally.ops.entry(op.name()).or_default() += 1;
        if let Res::Failed((kind, _)) | Res::Generated { end: Err((kind, _)), .. } = &want.res {
            *tally.errors.entry(format!("{} {}", op.name(), kind.name())).or_default() += 1;
        }
        let context = || format!("{worker_name}: operation {i}: {op:?}");
        let Res::Generated {
            tokens: want_tokens,
            text: want_text,
            end: Err((ErrorKind::Cancelled, _)),
        } = &want.res
        else {
            let got = run_op(op, &mut slots, subject, dir.path(), Cancel::No);
            assert_eq!(got, *want, "{}: the replay differs", context());
            continue;
        };
        tally.cancels_landed += 1;
        let want_view = want.view.as_ref().unwrap();
        let n = want_tokens.len();
        let plan = if n == 0 {
            tally.cancels_before_first_token += 1;
            Cancel::Skip
        } else if want_view.output {
            Cancel::AtToken(n)
        } else {
            Cancel::Limit(n)
        };
        let got = run_op(op, &mut slots, subject, dir.path(), plan);
        let Res::Generated { tokens, text, .. } = &got.res else { unreachable!() };
        assert_eq!(
            (tokens, text),
            (want_tokens, want_text),
            "{}: cancelled run ({plan:?})",
            context()
        );
        let got_view = got.view.as_ref().unwrap();
        assert_eq!(
            (got_view.len, got_view.tokens, got_view.max_context),
            (want_view.len, want_view.tokens, want_view.max_context),
            "{}: session tokens after a cancel ({plan:?}){}",
            context(),
            if n == 0 {
                ": a cancel before any token must leave the session as it was"
            } else {
                ""
            }
        );
        // The whole session file, not only the view: the cache can differ in its bits alone
        // (the last position recomputed before the cancel was seen).
        let snapshot = entry.snapshot.as_ref().unwrap();
        let mine = dir.path().join("mine.phi3");
        slots[op.slot()].as_ref().unwrap().save(&mine).unwrap();
        if got_view != want_view || file_parts(&mine) != file_parts(snapshot) {
            // The cancel left the cache filled differently: all else must match; then continue
            // from the worker's snapshot.
            let strip = |path: &Path| {
                let (mut header, _) = file_parts(path);
                for key in ["kv_tokens", "long_rope", "has_logits", "greedy", "candidates"] {
                    header.as_object_mut().unwrap().remove(key);
                }
                header
            };
            assert_eq!(
                strip(&mine),
                strip(snapshot),
                "{}: session state after a cancel",
                context()
            );
            let loaded = Session::load(&subject.model, snapshot).unwrap();
            // The snapshot's cache holds what a cache computed in other passes holds (equal up to
            // rounding): the cancel left it consistent.
            if !loaded.is_empty() {
                let theirs = loaded.fork().unwrap().logits().unwrap().to_vec();
                let mut own = slots[op.slot()].as_ref().unwrap().fork().unwrap();
                assert_close(own.logits().unwrap(), &theirs, &context());
            }
            slots[op.slot()] = Some(loaded);
            assert_eq!(
                view(&slots[op.slot()]).as_ref(),
                Some(want_view),
                "{}: snapshot",
                context()
            );
            tally.resyncs += 1;
        }
    }
}

/// Logits of the same tokens computed in different forward passes: equal up to rounding.
fn assert_close(a: &[f32], b: &[f32], context: &str) {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(a.len() == b.len() && diff <= 1e-3 * scale, "{context}: logits differ by {diff}");
}

fn fixture(name: &str) -> Option<Model> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
    dir.is_dir().then(|| {
        Model::load(dir, &LoadOptions { device: Device::Cpu, ..Default::default() }).unwrap()
    })
}

#[test]
fn concurrent_sessions_match_a_single_threaded_replay() {
    let budget = Duration::from_secs_f64(env_or("PHI3_STRESS_SECS", 20.0));
    let n_demo: usize = env_or("PHI3_STRESS_THREADS", 8);
    let base_seed: u64 = env_or("PHI3_STRESS_SEED", 1);
    let cpu = LoadOptions { device: Device::Cpu, ..Default::default() };
    let demo = Subject {
        name: "demo",
        model: demo::demo_model(&cpu).unwrap(),
        text: true,
        contexts: &[Some(40), Some(70), Some(130), Some(300), None],
    };
    let mut subjects = vec![demo; n_demo];
    if let Some(model) = fixture("gqa-longrope-bf16") {
        let s = Subject {
            name: "gqa-longrope-bf16",
            model,
            text: false,
            contexts: &[Some(12), Some(20), Some(40), None],
        };
        subjects.extend([s.clone(), s]);
    }

    let started = Instant::now();
    // The replay, on one thread, takes about twice as long as the concurrent phase.
    let deadline = started + budget.mul_f64(0.3);
    let dirs: Vec<_> = subjects.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let (done_tx, done_rx) = mpsc::channel();
    let handles: Vec<_> = subjects
        .iter()
        .zip(&dirs)
        .enumerate()
        .map(|(t, (subject, dir))| {
            let (subject, dir, done) = (subject.clone(), dir.path().to_path_buf(), done_tx.clone());
            let seed = base_seed.wrapping_mul(1_000_003).wrapping_add(t as u64);
            std::thread::spawn(move || {
                let log = worker(&subject, seed, &dir, deadline);
                let _ = done.send(t);
                log
            })
        })
        .collect();
    drop(done_tx);
    for _ in 0..handles.len() {
        match done_rx
            .recv_timeout((deadline + HANG_LIMIT).saturating_duration_since(Instant::now()))
        {
            Ok(_) => {}
            // A worker that panicked dropped its sender: its join below reports the panic.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("a worker did not finish within {HANG_LIMIT:?} of the deadline: hang or deadlock")
            }
        }
    }
    let logs: Vec<Vec<Entry>> = handles
        .into_iter()
        .enumerate()
        .map(|(t, h)| {
            h.join().unwrap_or_else(|e| {
                std::panic::resume_unwind(Box::new(format!("worker {t} panicked: {e:?}")))
            })
        })
        .collect();
    let concurrent = started.elapsed();
    // The workers' passes went through the demo model's scheduler, which batched those that
    // were queued together; the replay below, one pass at a time, must still match them.
    let batching = subjects[0].model.scheduler_stats();
    println!(
        "stress: the demo model ran {} passes for {} sequences (largest batch {}, {} mixing \
         prefill and decode)",
        batching.steps, batching.sequences, batching.max_batch, batching.mixed_steps
    );
    assert!(n_demo < 2 || batching.max_batch >= 2, "no pass batched two sessions: {batching:?}");

    let replay_started = Instant::now();
    let mut tally = Tally::default();
    for (t, (log, subject)) in logs.iter().zip(&subjects).enumerate() {
        replay(&format!("worker {t} ({})", subject.name), subject, log, &mut tally);
    }
    let total: usize = logs.iter().map(Vec::len).sum();
    println!(
        "stress: {} threads ({n_demo} on the demo model, {} on gqa-longrope-bf16) x {SLOTS} \
         sessions: {total} operations in {:.1} s concurrently, replayed identically in {:.1} s \
         (seed {base_seed})",
        subjects.len(),
        subjects.len() - n_demo,
        concurrent.as_secs_f64(),
        replay_started.elapsed().as_secs_f64()
    );
    println!("stress: operations {:?}", tally.ops);
    println!("stress: error outcomes {:?}", tally.errors);
    println!(
        "stress: {} cancels landed ({} before the first token), {} resynchronised from a snapshot",
        tally.cancels_landed, tally.cancels_before_first_token, tally.resyncs
    );
    assert!(total > 0);
}

/// Several threads saving different sessions to the same path at once: each save is atomic, so
/// the file that remains loads and is exactly one of them.
#[test]
fn concurrent_saves_to_one_path_leave_one_whole_file() {
    let model =
        demo::demo_model(&LoadOptions { device: Device::Cpu, ..Default::default() }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.phi3");
    let sessions: Vec<Session> = (0..6)
        .map(|i| {
            let mut s = model.session(SessionOptions::default()).unwrap();
            s.append_text(&words(&mut Rand(i), 5 + i as usize)).unwrap();
            s.logits().unwrap();
            s
        })
        .collect();
    std::thread::scope(|scope| {
        for s in &sessions {
            let path = &path;
            scope.spawn(move || {
                for _ in 0..10 {
                    s.save(path).unwrap();
                }
            });
        }
    });
    let loaded = Session::load(&model, &path).unwrap();
    assert!(sessions
        .iter()
        .any(|s| s.tokens() == loaded.tokens() && s.last_logits() == loaded.last_logits()));
    let names: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "temporary files left behind: {names:?}");
}

/// Regression (found by the stress test): a cancel that arrived after the prefill but before the
/// first token was sampled kept the assistant prompt that generate had added and recorded an
/// empty assistant reply, while a cancel during the prefill takes the prompt back; which one a
/// host got depended on timing. Either way the call samples nothing and must leave the session
/// as it was.
#[test]
fn cancel_before_the_first_token_leaves_the_session_as_it_was() {
    let model =
        demo::demo_model(&LoadOptions { device: Device::Cpu, ..Default::default() }).unwrap();
    let mut s = model.session(SessionOptions::default()).unwrap();
    s.append_message("user", "Hello there").unwrap();
    let before = s.tokens().to_vec();
    let o = GenerateOptions { max_tokens: 4, stop_token_ids: Some(vec![]), ..Default::default() };
    let cancel = s.cancel_token();
    let mut stream = s.stream(&o).unwrap(); // adds the assistant prompt and prefills
    cancel.cancel(); // lands before the first step
    let items: Vec<_> = stream.by_ref().collect();
    assert!(items.iter().all(|c| c.as_ref().is_ok_and(|c| c.token.is_none())), "{items:?}");
    assert_eq!(stream.finish_reason(), Some(FinishReason::Cancelled));
    assert_eq!(stream.into_result().unwrap_err().kind(), ErrorKind::Cancelled);
    assert_eq!(s.tokens(), &before[..], "the assistant prompt is taken back");

    // The conversation continues as if the cancelled call never happened.
    let mut fresh = model.session(SessionOptions::default()).unwrap();
    fresh.append_message("user", "Hello there").unwrap();
    let a = s.generate(&o, |_, _| ControlFlow::Continue(())).unwrap();
    let b = fresh.generate(&o, |_, _| ControlFlow::Continue(())).unwrap();
    assert_eq!((s.tokens(), &a.tokens), (fresh.tokens(), &b.tokens));
    s.append_message("user", "More").unwrap();
    fresh.append_message("user", "More").unwrap();
    assert_eq!(s.tokens(), fresh.tokens(), "no empty assistant reply was recorded");
}
