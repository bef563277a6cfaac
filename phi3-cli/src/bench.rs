//! `phi3 bench`: load time, prefill and decode speed.
//!
//! The prompt is a fixed sequence of token ids (3, 4, ... cycling below min(vocab, 1000)), so runs
//! are comparable without a tokenizer. Prefill is one `append_tokens` of the whole prompt on a
//! fresh session; decode is `--gen-tokens` single-token steps, each feeding back the greedy
//! choice. With `--repeat N` the median of N runs is reported (each phase separately).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use phi3_core::sampler::greedy;
use phi3_core::{DummyWeights, ErrorKind, Model, SessionOptions};

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
    let hi = vocab.min(1000);
    let lo = if hi > 3 { 3 } else { 0 };
    (0..n).map(|i| (lo + i % (hi - lo)) as u32).collect()
}

fn one_run(model: &Model, prompt: &[u32], gen_tokens: usize) -> phi3_core::Result<Run> {
    let mut session = model.session(SessionOptions::default())?;
    let _interrupt = Interrupt::guard(session.cancel_token());
    let limit = model.emittable_vocab();
    let started = Instant::now();
    let mut logits = session.append_tokens(prompt)?;
    let prefill_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 0..gen_tokens {
        // Random weights can give NaN logits; any valid id times the step just as well.
        let token = greedy(&logits, limit).unwrap_or(prompt[0]);
        logits = session.append_tokens(&[token])?;
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
        serde_json::json!({
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
            "parameter_count": self.parameter_count,
            "weight_format": self.weight_format,
            "bytes_per_decode_token": self.bytes_per_decode_token,
            "weight_bytes_on_device": self.stats.weight_bytes,
            "kv_bytes_per_token": self.stats.kv_bytes_per_token,
            "kv_dtype": self.stats.kv_dtype,
            "device_free_bytes": self.stats.cuda.as_ref().and_then(|c| c.free_memory),
            "device_total_bytes": self.stats.cuda.as_ref().map(|c| c.total_memory),
            "kernels": self.stats.cuda.as_ref().map(|c| c.kernels.to_string()),
        })
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
            (
                "kv/token",
                format!(
                    "{} {}",
                    crate::info::binary(self.stats.kv_bytes_per_token as f64),
                    self.stats.kv_dtype
                ),
            ),
        ];
        let widths: Vec<usize> = cells.iter().map(|(h, v)| h.len().max(v.len())).collect();
        let row = |f: &dyn Fn(&(&str, String)) -> String| {
            let parts: Vec<String> =
                cells.iter().zip(&widths).map(|(c, &w)| format!("{:<w$}", f(c))).collect();
            parts.join("  ").trim_end().to_string() + "\n"
        };
        let mut out = row(&|(h, _)| h.to_string()) + &row(&|(_, v)| v.clone());
        if let Some(cuda) = &self.stats.cuda {
            out += &format!("kernels: {}\n", cuda.kernels);
        }
        out
    }
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
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
