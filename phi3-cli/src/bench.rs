//! `phi3 bench`: load time, prefill and decode speed.
//!
//! The prompt is a fixed sequence of token ids (3, 4, ... cycling below min(vocab, 1000)), so runs
//! are comparable without a tokenizer. Prefill is one `Session::append_tokens_greedy` of the
//! whole prompt on a fresh session; decode is `--gen-tokens` single-token steps of it, each
//! feeding back the greedy choice (on CUDA only the chosen id comes back, not the logits). With
//! `--repeat N` the median of N runs is reported (each phase separately).
//!
//! `--sessions N` (N > 1) measures continuous batching: one session alone first (prefill, then
//! decode: the batch-1 time per output token), then N sessions on N threads, each with its own
//! prompt of `--prompt-tokens` tokens (session i's cycle starts i x 101 ids further on, so no two
//! share a prefix): all prefilled at once (the wall time until every one has its first token's
//! logits), then all decoding `--gen-tokens` tokens at once. Decoding goes through
//! `Session::generate` (greedy, no stop tokens, so exactly that many tokens), or, for a model
//! without a tokenizer (dummy weights from a config.json alone), through one-token
//! `append_tokens_greedy` steps as above. The engine decides how the concurrent steps are batched;
//! this file only drives sessions from threads. Reported: total decode tok/s (tokens of all
//! sessions / wall time of the concurrent decode), the mean per-session time per output token,
//! its ratio to the batch-1 time, and the mean sequences per forward pass of each phase (from
//! the scheduler's counts: N when every decode step batched all sessions).

use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock};
use std::thread;
use std::time::Instant;

use anyhow::{bail, Result};
use phi3_core::sampler::greedy;
use phi3_core::{
    CancelToken, DummyWeights, ErrorKind, GenerateOptions, Model, SchedulerStats, Session,
    SessionOptions,
};

use crate::cli::BenchArgs;
use crate::interrupt::{Interrupt, EXIT_INTERRUPTED};
use crate::load::load_model;

/// Seed of `--dummy-weights`: fixed, so every run benchmarks the same weights.
const DUMMY_SEED: u64 = 0;

/// Timings of one run.
#[derive(Clone, Copy, Debug)]
struct Run {
    prefill_s: f64,
    decode_s: f64,
}

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    let dummy = args.dummy_weights.map(|d| DummyWeights { dtype: d.into(), seed: DUMMY_SEED });
    let loaded = load_model(&args.model, dummy)?;
    let model = &loaded.model;
    if args.cuda_graphs && !model.set_cuda_graphs(true) {
        eprintln!("--cuda-graphs: the model runs on the CPU, which has no graphs");
    }
    let prompt_tokens = to_usize(args.prompt_tokens);
    let gen_tokens = to_usize(args.gen_tokens);
    let total = prompt_tokens.saturating_add(gen_tokens);
    if total > model.max_context() {
        bail!(
            "--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} = {total} tokens exceed the \
             model's max context of {}",
            model.max_context()
        );
    }
    if args.sessions > 1 {
        return run_sessions(args, &loaded, prompt_tokens, gen_tokens);
    }
    let prompt = bench_prompt(model.config().vocab_size, prompt_tokens);

    let mut runs = Vec::new();
    for _ in 0..args.repeat {
        match one_run(model, &prompt, gen_tokens) {
            Ok(run) => runs.push(run),
            Err(e) if e.kind() == ErrorKind::Cancelled => {
                eprintln!("[benchmark stopped]");
                return Ok(ExitCode::from(EXIT_INTERRUPTED));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let prefill_s = median(runs.iter().map(|r| r.prefill_s).collect());
    let decode_s = median(runs.iter().map(|r| r.decode_s).collect());
    let report = Report {
        model: loaded.name.clone(),
        device: model.device_name(),
        threads: rayon::current_num_threads(),
        prompt_tokens,
        gen_tokens,
        load_s: loaded.load_s,
        prefill_s,
        decode_s,
        parameter_count: model.config().parameter_count(),
        weight_format: model.weight_format().to_string(),
        bytes_per_decode_token: bytes_per_decode_token(model),
        stats: model.device_stats(),
    };
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    Ok(ExitCode::SUCCESS)
}

/// `n` token ids cycling through 3..min(vocab, 1000) (below 3 sit the usual special tokens).
fn bench_prompt(vocab: usize, n: usize) -> Vec<u32> {
    session_prompt(vocab, n, 0)
}

/// Session `index`'s prompt of `--sessions`: the cycle of [`bench_prompt`] started
/// `index * 101` ids further on (bench/compare_hf.py builds the same ids for transformers).
fn session_prompt(vocab: usize, n: usize, index: usize) -> Vec<u32> {
    let hi = vocab.min(1000);
    let lo = if hi > 3 { 3 } else { 0 };
    let offset = index.wrapping_mul(101);
    (0..n).map(|i| (lo + offset.wrapping_add(i) % (hi - lo)) as u32).collect()
}

fn one_run(model: &Model, prompt: &[u32], gen_tokens: usize) -> phi3_core::Result<Run> {
    let mut session = model.session(SessionOptions::default())?;
    let _interrupt = Interrupt::guard(session.cancel_token());
    let started = Instant::now();
    let mut token = session.append_tokens_greedy(prompt)?;
    let prefill_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 0..gen_tokens {
        // Random weights can give NaN logits; any valid id times the step just as well.
        token = session.append_tokens_greedy(&[token.unwrap_or(prompt[0])])?;
    }
    Ok(Run { prefill_s, decode_s: started.elapsed().as_secs_f64() })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => 0.0,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

fn per_second(count: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// `report` (a JSON object) with the keys both reports share: the model's size and format and
/// what the device holds.
fn with_model_fields(
    mut report: serde_json::Value,
    parameter_count: u64,
    weight_format: &str,
    bytes_per_decode_token: u64,
    stats: &phi3_core::DeviceStats,
) -> serde_json::Value {
    let cuda = stats.cuda.as_ref();
    let fields = serde_json::json!({
        "parameter_count": parameter_count,
        "weight_format": weight_format,
        "bytes_per_decode_token": bytes_per_decode_token,
        "weight_bytes_on_device": stats.weight_bytes,
        "kv_bytes_per_token": stats.kv_bytes_per_token,
        "kv_dtype": stats.kv_dtype,
        "device_free_bytes": cuda.and_then(|c| c.free_memory),
        "device_total_bytes": cuda.map(|c| c.total_memory),
        "kernels": cuda.map(|c| c.kernels.to_string()),
        "kernel_launches": cuda.map(|c| c.kernel_launches),
        "cuda_graphs": cuda.map(|c| serde_json::json!({
            "captures": c.graphs.captures,
            "replays": c.graphs.replays,
            "fallbacks": c.graphs.fallbacks,
            "last_failure": c.graphs.last_failure,
            "cached": c.graphs.cached,
            "pool_reserved_bytes": c.graphs.pool_reserved,
            "pool_used_high_bytes": c.graphs.pool_used_high,
        })),
    });
    if let (Some(out), serde_json::Value::Object(fields)) = (report.as_object_mut(), fields) {
        out.extend(fields);
    }
    report
}

/// Weight bytes a decode step reads (see `Report::bytes_per_decode_token`).
fn bytes_per_decode_token(model: &phi3_core::Model) -> u64 {
    let c = model.config();
    let total = model.device_stats().weight_bytes;
    match model.weight_dtypes() {
        [dtype] if !c.tie_word_embeddings => {
            total.saturating_sub((c.vocab_size * c.hidden_size * dtype.size()) as u64)
        }
        _ => total,
    }
}

/// The numbers `bench` reports.
struct Report {
    model: String,
    device: String,
    threads: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    load_s: f64,
    prefill_s: f64,
    decode_s: f64,
    parameter_count: u64,
    /// How the projections are stored ("native", "int8", "int4-g128", ...).
    weight_format: String,
    /// Weight bytes one decode step reads: all weights but the embedding table (one row of it
    /// is read) unless it is also the output matrix.
    bytes_per_decode_token: u64,
    /// Device, memory use and (CUDA) kernel status, taken after the runs.
    stats: phi3_core::DeviceStats,
}

impl Report {
    fn prefill_tokens_per_s(&self) -> f64 {
        per_second(self.prompt_tokens, self.prefill_s)
    }

    fn decode_tokens_per_s(&self) -> f64 {
        per_second(self.gen_tokens, self.decode_s)
    }

    /// Effective weight bandwidth of decoding: weight bytes read per token x tokens/s, in GB/s.
    fn decode_gb_per_s(&self) -> f64 {
        self.bytes_per_decode_token as f64 * self.decode_tokens_per_s() / 1e9
    }

    fn json(&self) -> serde_json::Value {
        let v = serde_json::json!({
            "model": self.model,
            "device": self.device,
            "threads": self.threads,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "load_s": self.load_s,
            "prefill_s": self.prefill_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s(),
            "decode_s": self.decode_s,
            "decode_tokens_per_s": self.decode_tokens_per_s(),
            "decode_weight_gb_per_s": self.decode_gb_per_s(),
        });
        with_model_fields(
            v,
            self.parameter_count,
            &self.weight_format,
            self.bytes_per_decode_token,
            &self.stats,
        )
    }

    /// A header row and a value row, aligned.
    fn table(&self) -> String {
        let ms_per_token = if self.gen_tokens > 0 {
            format!("{:.2}", self.decode_s * 1000.0 / self.gen_tokens as f64)
        } else {
            "-".into()
        };
        let cells = [
            ("model", self.model.clone()),
            ("device", self.device.clone()),
            ("threads", self.threads.to_string()),
            ("load s", format!("{:.3}", self.load_s)),
            ("prompt", self.prompt_tokens.to_string()),
            ("prefill tok/s", format!("{:.1}", self.prefill_tokens_per_s())),
            ("gen", self.gen_tokens.to_string()),
            ("decode tok/s", format!("{:.1}", self.decode_tokens_per_s())),
            ("ms/token", ms_per_token),
            ("GB/s", format!("{:.1}", self.decode_gb_per_s())),
            ("format", self.weight_format.clone()),
            ("weights", crate::info::binary(self.stats.weight_bytes as f64)),
            ("kv/token", kv_cell(&self.stats)),
        ];
        aligned(&cells, &self.stats)
    }
}

/// A header row and a value row of `cells`, aligned, then the CUDA kernel status when there is one.
fn aligned(cells: &[(&str, String)], stats: &phi3_core::DeviceStats) -> String {
    let widths: Vec<usize> = cells.iter().map(|(h, v)| h.len().max(v.len())).collect();
    let row = |f: &dyn Fn(&(&str, String)) -> String| {
        let parts: Vec<String> =
            cells.iter().zip(&widths).map(|(c, &w)| format!("{:<w$}", f(c))).collect();
        parts.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = row(&|(h, _)| h.to_string()) + &row(&|(_, v)| v.clone());
    if let Some(cuda) = &stats.cuda {
        out += &format!("kernels: {}\n", cuda.kernels);
        let g = &cuda.graphs;
        if g.captures + g.replays + g.fallbacks > 0 {
            out += &format!(
                "cuda graphs: {} captured, {} replayed, {} fell back{}; {} kept, graph pool {}\n",
                g.captures,
                g.replays,
                g.fallbacks,
                g.last_failure.as_ref().map(|f| format!(" (last: {f})")).unwrap_or_default(),
                g.cached,
                graph_pool(g)
            );
        }
    }
    out
}

/// The `kv/token` cell: bytes per token of one session's cache, and their type.
fn kv_cell(stats: &phi3_core::DeviceStats) -> String {
    format!("{} {}", crate::info::binary(stats.kv_bytes_per_token as f64), stats.kv_dtype)
}

// ---- --sessions N: concurrent sessions ----

/// How the sessions decode: `generate` needs a tokenizer (its stream detokenizes); a model
/// loaded from a config.json alone decodes by one-token `append_tokens_greedy` steps instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeApi {
    Generate,
    AppendTokens,
}

impl DecodeApi {
    pub fn for_model(model: &Model) -> DecodeApi {
        if model.tokenizer().is_ok() {
            DecodeApi::Generate
        } else {
            DecodeApi::AppendTokens
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DecodeApi::Generate => "generate",
            DecodeApi::AppendTokens => "append_tokens_greedy",
        }
    }
}

/// Timings of one `--sessions N` run (all times in seconds).
#[derive(Clone, Copy, Debug)]
pub struct SessionsRun {
    pub sessions: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// One session alone: prefill of its prompt.
    pub single_prefill_s: f64,
    /// One session alone: its `gen_tokens` decode steps.
    pub single_decode_s: f64,
    /// Wall time from starting all N prefills at once until the last one finished.
    pub prefill_all_s: f64,
    /// Wall time from starting all N decodes at once until the last one finished.
    pub decode_all_s: f64,
    /// Tokens decoded across all sessions (`sessions * gen_tokens`).
    pub generated: usize,
    /// Mean over the sessions of (its decode time / its tokens).
    pub tpot_s: f64,
    /// Sequences per forward pass during the concurrent prefill (the scheduler's counts).
    pub prefill_mean_batch: f64,
    /// Sequences per forward pass during the concurrent decode: N when every step batched all
    /// sessions.
    pub decode_mean_batch: f64,
}

impl SessionsRun {
    /// Prompt tokens of all sessions over `prefill_all_s`.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        per_second(self.sessions * self.prompt_tokens, self.prefill_all_s)
    }

    /// Tokens of all sessions over the wall time of the concurrent decode.
    pub fn decode_tokens_per_s(&self) -> f64 {
        per_second(self.generated, self.decode_all_s)
    }

    /// Time per output token of one session alone.
    pub fn single_tpot_s(&self) -> f64 {
        self.single_decode_s / self.gen_tokens.max(1) as f64
    }

    /// Time per output token at N sessions over that of one session alone.
    pub fn tpot_ratio(&self) -> f64 {
        let single = self.single_tpot_s();
        if single > 0.0 {
            self.tpot_s / single
        } else {
            0.0
        }
    }

    /// The median of each field over `runs` (each field on its own, as `--repeat` does).
    fn median(runs: &[SessionsRun]) -> SessionsRun {
        let m = |f: fn(&SessionsRun) -> f64| median(runs.iter().map(f).collect());
        SessionsRun {
            single_prefill_s: m(|r| r.single_prefill_s),
            single_decode_s: m(|r| r.single_decode_s),
            prefill_all_s: m(|r| r.prefill_all_s),
            decode_all_s: m(|r| r.decode_all_s),
            tpot_s: m(|r| r.tpot_s),
            prefill_mean_batch: m(|r| r.prefill_mean_batch),
            decode_mean_batch: m(|r| r.decode_mean_batch),
            ..runs[0]
        }
    }
}

fn run_sessions(
    args: &BenchArgs,
    loaded: &crate::load::Loaded,
    prompt_tokens: usize,
    gen_tokens: usize,
) -> Result<ExitCode> {
    if gen_tokens == 0 {
        bail!("--sessions {} needs --gen-tokens of at least 1", args.sessions);
    }
    let sessions = to_usize(args.sessions);
    let model = &loaded.model;
    if DecodeApi::for_model(model) == DecodeApi::AppendTokens {
        eprintln!(
            "note: this model has no tokenizer, so the sessions decode by one-token \
             append_tokens_greedy steps instead of generate"
        );
    }
    // Ctrl-C sets `stop`; the decode loops check it at every token.
    let stop = CancelToken::new();
    let _interrupt = Interrupt::guard(stop.clone());
    let mut runs = Vec::new();
    for _ in 0..args.repeat {
        match sessions_run(model, sessions, prompt_tokens, gen_tokens, &stop)? {
            Some(run) => runs.push(run),
            None => {
                eprintln!("[benchmark stopped]");
                return Ok(ExitCode::from(EXIT_INTERRUPTED));
            }
        }
    }
    let report =
        SessionsReport::new(model, &loaded.name, loaded.load_s, SessionsRun::median(&runs));
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    Ok(ExitCode::SUCCESS)
}

/// One `--sessions` measurement on `model` (see the module docs). `None` when `stop` was set.
/// Errors: a session call's error (e.g. out of memory for N caches), or a thread that could
/// not be started.
pub fn sessions_run(
    model: &Model,
    sessions: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    stop: &CancelToken,
) -> Result<Option<SessionsRun>> {
    let api = DecodeApi::for_model(model);
    let vocab = model.config().vocab_size;
    let prompts: Vec<Vec<u32>> =
        (0..sessions).map(|i| session_prompt(vocab, prompt_tokens, i)).collect();

    // Batch 1 first: the same prompt as session 0, alone.
    let (single_prefill_s, single_decode_s) = {
        let mut session = model.session(SessionOptions::default())?;
        let started = Instant::now();
        session.append_tokens(&prompts[0])?;
        let prefill_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        decode(&mut session, api, gen_tokens, stop)?;
        (prefill_s, started.elapsed().as_secs_f64())
    };
    if stop.is_cancelled() {
        return Ok(None);
    }

    let mut all = (0..sessions)
        .map(|_| model.session(SessionOptions::default()))
        .collect::<phi3_core::Result<Vec<Session>>>()?;
    let counts = model.scheduler_stats();
    let (prefill_all_s, prefilled) = concurrently(&mut all, |i, session| {
        if stop.is_cancelled() {
            return Ok(());
        }
        session.append_tokens(&prompts[i]).map(drop)
    })?;
    prefilled.into_iter().collect::<phi3_core::Result<()>>()?;
    if stop.is_cancelled() {
        return Ok(None);
    }
    let prefill_mean_batch = mean_batch(&counts, &model.scheduler_stats());
    let counts = model.scheduler_stats();
    let (decode_all_s, decoded) = concurrently(&mut all, |_, session| {
        let started = Instant::now();
        let n = decode(session, api, gen_tokens, stop)?;
        Ok((n, started.elapsed().as_secs_f64()))
    })?;
    let decode_mean_batch = mean_batch(&counts, &model.scheduler_stats());
    let decoded = decoded.into_iter().collect::<phi3_core::Result<Vec<(usize, f64)>>>()?;
    if stop.is_cancelled() {
        return Ok(None);
    }
    let generated = decoded.iter().map(|&(n, _)| n).sum();
    let tpot_s = decoded.iter().map(|&(n, s)| s / n.max(1) as f64).sum::<f64>() / sessions as f64;
    Ok(Some(SessionsRun {
        sessions,
        prompt_tokens,
        gen_tokens,
        single_prefill_s,
        single_decode_s,
        prefill_all_s,
        decode_all_s,
        generated,
        tpot_s,
        prefill_mean_batch,
        decode_mean_batch,
    }))
}

/// Sequences per forward pass between two snapshots of the scheduler's counts (0 when none ran).
fn mean_batch(before: &SchedulerStats, after: &SchedulerStats) -> f64 {
    let steps = after.steps.saturating_sub(before.steps);
    let sequences = after.sequences.saturating_sub(before.sequences);
    if steps > 0 {
        sequences as f64 / steps as f64
    } else {
        0.0
    }
}

/// Decode `gen_tokens` tokens after the session's prompt (already prefilled); returns how many
/// were decoded: all of them, unless `stop` was set.
fn decode(
    session: &mut Session,
    api: DecodeApi,
    gen_tokens: usize,
    stop: &CancelToken,
) -> phi3_core::Result<usize> {
    match api {
        DecodeApi::Generate => {
            // No stop tokens: exactly `gen_tokens` (the context was checked to hold them).
            let options = GenerateOptions {
                max_tokens: gen_tokens,
                stop_token_ids: Some(Vec::new()),
                ..GenerateOptions::default()
            };
            let result = session.generate(&options, |_, _| {
                if stop.is_cancelled() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
            Ok(result.tokens.len())
        }
        DecodeApi::AppendTokens => {
            let limit = session.model().emittable_vocab();
            let fallback = session.tokens().first().copied().unwrap_or(0);
            let mut token = session.last_logits().and_then(|logits| greedy(logits, limit));
            for done in 0..gen_tokens {
                if stop.is_cancelled() {
                    return Ok(done);
                }
                // Random weights can give NaN logits; any valid id times the step just as well.
                token = session.append_tokens_greedy(&[token.unwrap_or(fallback)])?;
            }
            Ok(gen_tokens)
        }
    }
}

/// Run `work(i, &mut sessions[i])` on one thread per session, all released at the same moment;
/// returns the wall time from that moment until the last one finished, and their results in
/// session order. A panic in `work` is resumed here.
fn concurrently<T: Send>(
    sessions: &mut [Session],
    work: impl Fn(usize, &mut Session) -> T + Sync,
) -> Result<(f64, Vec<T>)> {
    // The threads wait on a read lock that is write-locked until every thread exists; a thread
    // that could not start releases the others with `abort` set, so nothing waits forever.
    let gate = RwLock::new(());
    let abort = AtomicBool::new(false);
    thread::scope(|scope| {
        let closed = gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut handles = Vec::with_capacity(sessions.len());
        let mut spawn_error = None;
        for (i, session) in sessions.iter_mut().enumerate() {
            let (gate, abort, work) = (&gate, &abort, &work);
            let spawned = thread::Builder::new().name(format!("session-{i}")).spawn_scoped(
                scope,
                move || {
                    drop(gate.read().unwrap_or_else(PoisonError::into_inner));
                    (!abort.load(Ordering::SeqCst)).then(|| work(i, session))
                },
            );
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    abort.store(true, Ordering::SeqCst);
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        let started = Instant::now();
        drop(closed);
        let results: Vec<Option<T>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|payload| std::panic::resume_unwind(payload)))
            .collect();
        let seconds = started.elapsed().as_secs_f64();
        if let Some(e) = spawn_error {
            bail!("cannot start a thread per session: {e}");
        }
        Ok((seconds, results.into_iter().flatten().collect()))
    })
}

/// The numbers `bench --sessions N` reports.
pub struct SessionsReport {
    model: String,
    device: String,
    threads: usize,
    load_s: f64,
    decode_api: DecodeApi,
    run: SessionsRun,
    parameter_count: u64,
    weight_format: String,
    bytes_per_decode_token: u64,
    stats: phi3_core::DeviceStats,
}

impl SessionsReport {
    /// `name` as the report's model; `load_s` the load time.
    pub fn new(model: &Model, name: &str, load_s: f64, run: SessionsRun) -> SessionsReport {
        SessionsReport {
            model: name.to_string(),
            device: model.device_name(),
            threads: rayon::current_num_threads(),
            load_s,
            decode_api: DecodeApi::for_model(model),
            run,
            parameter_count: model.config().parameter_count(),
            weight_format: model.weight_format().to_string(),
            bytes_per_decode_token: bytes_per_decode_token(model),
            stats: model.device_stats(),
        }
    }

    /// The keys of the one-session `--json` (with the N-session figures: `prefill_*` and
    /// `decode_*` are totals over all sessions) plus the one-session figures as `single_*`.
    pub fn json(&self) -> serde_json::Value {
        let r = &self.run;
        let v = serde_json::json!({
            "model": self.model,
            "device": self.device,
            "threads": self.threads,
            "sessions": r.sessions,
            "decode_api": self.decode_api.as_str(),
            "prompt_tokens": r.prompt_tokens,
            "gen_tokens": r.gen_tokens,
            "load_s": self.load_s,
            "prefill_s": r.prefill_all_s,
            "prefill_tokens_per_s": r.prefill_tokens_per_s(),
            "decode_s": r.decode_all_s,
            "decode_tokens_per_s": r.decode_tokens_per_s(),
            "generated_tokens": r.generated,
            "tpot_ms": r.tpot_s * 1000.0,
            "single_prefill_s": r.single_prefill_s,
            "single_prefill_tokens_per_s": per_second(r.prompt_tokens, r.single_prefill_s),
            "single_decode_s": r.single_decode_s,
            "single_decode_tokens_per_s": per_second(r.gen_tokens, r.single_decode_s),
            "single_tpot_ms": r.single_tpot_s() * 1000.0,
            "tpot_ratio": r.tpot_ratio(),
            "prefill_mean_batch": r.prefill_mean_batch,
            "decode_mean_batch": r.decode_mean_batch,
        });
        with_model_fields(
            v,
            self.parameter_count,
            &self.weight_format,
            self.bytes_per_decode_token,
            &self.stats,
        )
    }

    /// A header row and a value row, aligned, as the one-session table.
    pub fn table(&self) -> String {
        let r = &self.run;
        let cells = [
            ("model", self.model.clone()),
            ("device", self.device.clone()),
            ("threads", self.threads.to_string()),
            ("load s", format!("{:.3}", self.load_s)),
            ("sessions", r.sessions.to_string()),
            ("prompt", r.prompt_tokens.to_string()),
            ("prefill tok/s", format!("{:.1}", r.prefill_tokens_per_s())),
            ("prefill s (all)", format!("{:.3}", r.prefill_all_s)),
            ("gen", r.gen_tokens.to_string()),
            ("decode tok/s (total)", format!("{:.1}", r.decode_tokens_per_s())),
            ("ms/token", format!("{:.2}", r.tpot_s * 1000.0)),
            ("ms/token (1 session)", format!("{:.2}", r.single_tpot_s() * 1000.0)),
            ("ratio", format!("{:.2}", r.tpot_ratio())),
            ("batch", format!("{:.1}", r.decode_mean_batch)),
            ("via", self.decode_api.as_str().to_string()),
            ("format", self.weight_format.clone()),
            ("weights", crate::info::binary(self.stats.weight_bytes as f64)),
            ("kv/token", kv_cell(&self.stats)),
        ];
        aligned(&cells, &self.stats)
    }
}

/// The graph pool's memory as the driver reports it.
pub(crate) fn graph_pool(g: &phi3_core::backend::cuda::GraphStats) -> String {
    let mib =
        |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
    format!("{} reserved, {} used at most", mib(g.pool_reserved), mib(g.pool_used_high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_cycles_below_the_vocab() {
        assert_eq!(bench_prompt(6, 7), [3, 4, 5, 3, 4, 5, 3]);
        assert!(bench_prompt(32064, 2000).iter().all(|&t| (3..1000).contains(&t)));
        assert_eq!(bench_prompt(2, 3), [0, 1, 0]);
    }

    #[test]
    fn session_prompts_differ_and_the_first_is_the_bench_prompt() {
        assert_eq!(session_prompt(32064, 50, 0), bench_prompt(32064, 50));
        let a = session_prompt(32064, 50, 1);
        assert_eq!(a[0], 3 + 101);
        assert_ne!(a, session_prompt(32064, 50, 2));
        assert!(session_prompt(300, 500, 7).iter().all(|&t| (3..300).contains(&t)));
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
