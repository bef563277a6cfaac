//! The command line: clap definitions of `phi3` and its subcommands, and the conversion of the
//! sampling flags into phi3-core's [`GenerateOptions`].
//!
//! Values are checked here where the check needs no model (ranges of sampling parameters, the
//! device string), so a bad flag is a usage error (exit code 2) before anything loads.

use clap::{Args, Parser, Subcommand, ValueEnum};
use phi3_core::loader::DType;
use phi3_core::{Device, GenerateOptions, WeightFormat};

/// Run Microsoft Phi-3 models locally.
///
/// Models are Hugging Face folders (config.json, *.safetensors, tokenizer.json) or Hugging Face
/// repo ids such as microsoft/Phi-3-medium-128k-instruct, found in the local Hugging Face cache
/// or downloaded into it. Without --model a small built-in demo model with random weights is used.
#[derive(Debug, Parser)]
#[command(name = "phi3", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// More log output on stderr: -v for info, -vv for debug (RUST_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a reply to one prompt, streamed to stdout.
    ///
    /// The prompt is sent as a user message through the model's chat template, or with --raw as
    /// plain text to continue. Ctrl-C stops the reply; a second Ctrl-C quits.
    #[command(after_help = "Examples:
  phi3 generate \"Write a haiku about Rust\"
  phi3 generate -m microsoft/Phi-3-mini-4k-instruct -t 0.7 --seed 1 \"Tell me a joke\"
  phi3 generate --raw -n 32 \"def fibonacci(n):\"")]
    Generate(GenerateArgs),
    /// Chat interactively, one user message per line of stdin.
    ///
    /// The conversation is kept in one session, so each turn only processes the new message.
    /// Type /reset to start over and /exit (or Ctrl-D) to quit. Ctrl-C stops the current reply;
    /// a second Ctrl-C quits. Stdin may be a pipe: each line is one user message.
    Chat(ChatArgs),
    /// Show a model's configuration, size and memory needs.
    Info(InfoArgs),
    /// Measure load time, prefill and decode speed.
    Bench(BenchArgs),
    /// Measure perplexity on a text and compare weight formats (top-1 agreement, KL).
    ///
    /// The text is tokenized and cut into windows of at most the model's context; each window
    /// starts with an empty session and its first token is not scored. With --compare-to (or
    /// quantized --weights, compared to native by default), both models are loaded at once and
    /// run on the same tokens. Every position costs one decode step per model.
    #[command(after_help = "Examples:
  phi3 perplexity --weights int4
  phi3 perplexity -m microsoft/Phi-3-mini-4k-instruct --weights int8 --text held.txt
  phi3 perplexity -m tests/fixtures/mha-f32-tied --weights int4-g32 --compare-to int8
  phi3 quantize -m ./Phi-3-mini-4k-instruct --weights int4 --out ./mini-int4
  phi3 perplexity -m ./mini-int4 --compare-to ./Phi-3-mini-4k-instruct
  phi3 perplexity -m ./mini-int4-awq --compare-to ./mini-int4")]
    Perplexity(PerplexityArgs),
    /// Write a copy of a model folder with int8 or int4 projection weights.
    ///
    /// The copy loads directly (no quantization at every start) with the format recorded in its
    /// config.json; embeddings, norms and lm_head are copied unchanged, as are the tokenizer
    /// files. Tensors are processed one at a time, so memory stays near one tensor.
    #[command(after_help = "Examples:
  phi3 quantize -m microsoft/Phi-3-medium-128k-instruct --weights int4 --out phi3-medium-int4
  phi3 quantize -m ./Phi-3-mini-4k-instruct --weights int8 --out ./mini-int8")]
    Quantize(QuantizeArgs),
    /// Check the CUDA backend on this machine's GPU: every op against the CPU backend, the full
    /// model against the HF fixtures, then a short Phi-3-medium benchmark with dummy weights.
    ///
    /// Prints a table last and writes details to OUT/gpu-check.txt; exits 1 when a check fails
    /// or there is no usable CUDA driver/device.
    GpuCheck(GpuCheckArgs),
}

/// Arguments of `phi3 quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A Hugging Face model folder or repo id (bf16, f16 or f32 safetensors).
    #[arg(short, long, value_name = "DIR|REPO")]
    pub model: String,
    /// int8, int4 (groups of 128), int4-g32, int4-g64 or int4-g128.
    #[arg(long, value_name = "FORMAT", value_parser = parse_weights)]
    pub weights: WeightFormat,
    /// The folder to create (must not exist).
    #[arg(long, value_name = "DIR")]
    pub out: std::path::PathBuf,
    /// Quantize the (untied) lm_head too, round to nearest; by default it keeps its dtype.
    #[arg(long)]
    pub lm_head: bool,
    /// Before quantizing, search activation-aware (AWQ) per-channel scales on a built-in
    /// calibration text and fold them into the weights (int4 only).
    #[arg(long)]
    pub awq: bool,
    /// Most calibration tokens for --awq (default 512).
    #[arg(long, value_name = "N", requires = "awq")]
    pub calibration_tokens: Option<usize>,
}

/// Arguments of `phi3 gpu-check`.
#[derive(Debug, Args)]
pub struct GpuCheckArgs {
    /// The fixtures folder (tests/fixtures of the repository).
    #[arg(long, default_value = "tests/fixtures", value_name = "DIR")]
    pub fixtures: std::path::PathBuf,
    /// Where to write gpu-check.txt.
    #[arg(long, default_value = "gpu-check-out", value_name = "DIR")]
    pub out: std::path::PathBuf,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub ordinal: usize,
    /// Seed of the random op inputs (default: from the clock; printed in the details).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Skip the Phi-3-medium benchmark.
    #[arg(long)]
    pub skip_bench: bool,
    /// Run the benchmarks only (no checks): with --skip-bench, a GPU session can split one run
    /// into two commands under a per-command time limit.
    #[arg(long, conflicts_with = "skip_bench")]
    pub bench_only: bool,
    /// Run only this section (repeatable; names as --list-sections prints them), appending to
    /// gpu-check.txt instead of starting it afresh: scripts/gpu-check runs each section in its
    /// own process, so a fault that ends one CUDA context cannot fail the sections after it.
    #[arg(long = "section", value_name = "NAME")]
    pub sections: Vec<String>,
    /// Print the names of the sections that would run, one per line, and exit (no GPU needed).
    #[arg(long)]
    pub list_sections: bool,
}

/// Which model to load and where.
#[derive(Clone, Debug, Args)]
pub struct ModelArgs {
    /// Model folder, or Hugging Face repo id (org/name) looked up in the local HF cache
    /// ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub) and downloaded when
    /// missing (unless HF_HUB_OFFLINE=1). Default: the built-in demo model (random weights).
    #[arg(short, long, value_name = "DIR|REPO_ID")]
    pub model: Option<String>,

    /// Where to run: auto (the CPU until the CUDA backend is verified on a GPU), cpu, cuda, cuda:N.
    #[arg(short, long, default_value = "auto", value_parser = parse_device)]
    pub device: Device,

    /// Largest context a session may hold, in tokens (default: the model's maximum).
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_context: Option<u64>,

    /// How the layer projections are stored: native (the checkpoint's dtype), int8 (per-row
    /// scales), int4 (groups of 128), int4-g32, int4-g64; quantized while loading. Embeddings,
    /// norms and lm_head keep their dtype. An already-quantized folder (phi3 quantize, AWQ,
    /// GPTQ) loads as stored.
    #[arg(long, default_value = "native", value_name = "FORMAT", value_parser = parse_weights)]
    pub weights: WeightFormat,

    /// KV-cache memory for all sessions together, e.g. 2GiB, 512MiB, 1.5GB or a byte count
    /// (default: no limit on the CPU, the free device memory on CUDA). A pass that needs more
    /// fails with an out-of-memory error, or waits with --kv-wait.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub kv_memory: Option<u64>,

    /// When the KV memory is exhausted, wait for other sessions to free blocks instead of failing
    /// (useful only with several sessions on different threads, e.g. bench --sessions).
    #[arg(long)]
    pub kv_wait: bool,

    /// Most prompt tokens of one session per forward pass, and most prefill tokens of a batched
    /// pass (default 512). Larger chunks keep a GPU busier on long prompts and take more
    /// activation memory; smaller ones let other sessions' decode steps in more often.
    #[arg(long, value_name = "TOKENS",
          value_parser = clap::value_parser!(u64).range(1..=phi3_core::MAX_PREFILL_CHUNK as u64))]
    pub prefill_chunk: Option<u64>,
}

/// Sampling and stopping flags shared by `generate` and `chat`.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate per reply.
    #[arg(short = 'n', long, default_value_t = 256, value_name = "N")]
    pub max_tokens: usize,

    /// Sampling temperature; 0 picks the most likely token every time (greedy).
    #[arg(short, long, default_value_t = 0.0, value_name = "T", value_parser = non_negative)]
    pub temperature: f32,

    /// Sample only among the K most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: usize,

    /// Sample only among the most likely tokens whose probabilities add up to P (1 = off).
    #[arg(long, default_value_t = 1.0, value_name = "P", value_parser = probability_nonzero)]
    pub top_p: f32,

    /// Drop tokens less likely than M times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0, value_name = "M", value_parser = probability)]
    pub min_p: f32,

    /// Penalise tokens already in the conversation (HF repetition penalty; 1 = off).
    #[arg(long, default_value_t = 1.0, value_name = "R", value_parser = positive)]
    pub repetition_penalty: f32,

    /// Subtract this from the logit of every token generated so far (0 = off).
    #[arg(long, default_value_t = 0.0, value_name = "X", value_parser = finite)]
    pub presence_penalty: f32,

    /// Subtract this, per occurrence, from the logit of every token generated so far (0 = off).
    #[arg(long, default_value_t = 0.0, value_name = "X", value_parser = finite)]
    pub frequency_penalty: f32,

    /// Random seed: the same seed and input give the same output (default: a fresh one).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,

    /// Stop when the reply contains this text (not printed). Repeat for several.
    #[arg(long, value_name = "STR", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub stop: Vec<String>,

    /// Do not stop at the model's end-of-sequence tokens (only --max-tokens and --stop end a
    /// reply).
    #[arg(long)]
    pub ignore_eos: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// Send the prompt as plain text to complete, without the chat template.
    #[arg(long)]
    pub raw: bool,

    /// A system message sent before the prompt (chat template only).
    #[arg(short, long, value_name = "TEXT", conflicts_with = "raw")]
    pub system: Option<String>,

    /// Print token counts and speeds to stderr at the end.
    #[arg(long)]
    pub stats: bool,

    /// The prompt; "-" reads it from stdin.
    pub prompt: String,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// A system message that starts the conversation (and every conversation after /reset).
    #[arg(short, long, value_name = "TEXT")]
    pub system: Option<String>,

    /// Print token counts and speeds to stderr after each reply.
    #[arg(long)]
    pub stats: bool,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Context length, in tokens, for the KV-cache memory estimate (default: the model's
    /// maximum).
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    pub context: Option<u64>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Prompt length, in tokens, for the prefill measurement.
    #[arg(long, default_value_t = 128, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub prompt_tokens: u64,

    /// Tokens to decode one at a time after the prompt.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub gen_tokens: u64,

    /// Runs to measure; the median run is reported.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub repeat: u64,

    /// Sessions decoding at the same time, one thread each (continuous batching). With N > 1 each
    /// session gets its own --prompt-tokens prompt, all N are prefilled at once, then all decode
    /// --gen-tokens tokens at once; reported: total decode tok/s and the time per output token
    /// against one session alone at the same context.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub sessions: u64,

    /// Use random weights of this type instead of the checkpoint's (only config.json is read).
    #[arg(long, value_name = "DTYPE")]
    pub dummy_weights: Option<WeightType>,

    /// On CUDA, run decode steps as CUDA graphs (captured once per shape, then replayed; not yet
    /// the default: not verified on a GPU). Ignored on the CPU.
    #[arg(long)]
    pub cuda_graphs: bool,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The reference to compare the model to: a weight format (same names as --weights: the
    /// same model loaded that way), or else another model folder or Hugging Face repo id (found
    /// like --model, loaded as stored, e.g. the folder that `phi3 quantize` read), which must
    /// have the same vocabulary. Default: native when --weights is quantized; with native
    /// --weights and no --compare-to, only the perplexity is measured.
    #[arg(long, value_name = "FORMAT|DIR|REPO_ID", value_parser = parse_compare_to)]
    pub compare_to: Option<CompareTo>,

    /// UTF-8 text file to score (default: a built-in held-out English text of about 5 KB).
    /// For a model without a tokenizer, the text's bytes are the token ids.
    #[arg(long, value_name = "FILE")]
    pub text: Option<std::path::PathBuf>,

    /// Use only the first N tokens of the text.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..))]
    pub max_tokens: Option<u64>,

    /// Most tokens per window (default: the model's max context, which also caps it).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..))]
    pub window: Option<u64>,
}

/// What `perplexity --compare-to` names: a value that parses as a weight format is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompareTo {
    /// The same model, loaded with these weights.
    Weights(WeightFormat),
    /// Another model: a folder or a Hugging Face repo id, as `--model` takes.
    Model(String),
}

fn parse_compare_to(s: &str) -> Result<CompareTo, String> {
    match s.parse::<WeightFormat>() {
        Ok(weights) => Ok(CompareTo::Weights(weights)),
        Err(_) if s.trim().is_empty() => {
            Err("expected a weight format, a model folder or a Hugging Face repo id".into())
        }
        // `int3`, `int4-g16`: a mistyped format (a repo id has a '/'), unless a folder has
        // that name.
        Err(e)
            if s.strip_prefix("int")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
                && !s.contains('/')
                && !std::path::Path::new(s).exists() =>
        {
            Err(e.to_string())
        }
        Err(_) => Ok(CompareTo::Model(s.to_string())),
    }
}

/// Element type of `--dummy-weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WeightType {
    Bf16,
    F16,
    F32,
}

impl From<WeightType> for DType {
    fn from(w: WeightType) -> DType {
        match w {
            WeightType::Bf16 => DType::BF16,
            WeightType::F16 => DType::F16,
            WeightType::F32 => DType::F32,
        }
    }
}

impl SamplingArgs {
    /// The phi3-core options these flags describe.
    pub fn generate_options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
            stop_token_ids: self.ignore_eos.then(Vec::new),
            ..GenerateOptions::default()
        }
    }
}

/// A memory size: a number with an optional unit, binary (KiB, MiB, GiB, TiB) or decimal (kB,
/// MB, GB, TB; B for bytes), case-insensitive; e.g. "2GiB", "512 MiB", "1.5GB", "1000000".
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "\"{s}\": unknown unit \"{}\" (use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB)",
                unit.trim()
            ))
        }
    };
    let bytes = match number.parse::<u64>() {
        Ok(n) => n.checked_mul(scale),
        Err(_) => match number.parse::<f64>() {
            Ok(x) if x.is_finite() && x * (scale as f64) < u64::MAX as f64 => {
                Some((x * scale as f64).round() as u64)
            }
            Ok(_) => None,
            Err(_) => return Err(format!("\"{s}\" is not a size such as 2GiB, 512MiB or 1000000")),
        },
    };
    match bytes {
        Some(0) => Err(format!("{s} must be more than 0 bytes")),
        Some(n) => Ok(n),
        None => Err(format!("{s} is too large")),
    }
}

fn parse_weights(s: &str) -> Result<WeightFormat, String> {
    s.parse::<WeightFormat>().map_err(|e| e.to_string())
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse::<Device>().map_err(|e| e.to_string())
}

fn finite(s: &str) -> Result<f32, String> {
    let x: f32 = s.parse().map_err(|_| format!("\"{s}\" is not a number"))?;
    if x.is_finite() {
        Ok(x)
    } else {
        Err(format!("{s} is not a finite number"))
    }
}

fn non_negative(s: &str) -> Result<f32, String> {
    let x = finite(s)?;
    if x >= 0.0 {
        Ok(x)
    } else {
        Err(format!("{s} is negative"))
    }
}

fn positive(s: &str) -> Result<f32, String> {
    let x = finite(s)?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err(format!("{s} must be > 0"))
    }
}

fn probability(s: &str) -> Result<f32, String> {
    let x = finite(s)?;
    if (0.0..=1.0).contains(&x) {
        Ok(x)
    } else {
        Err(format!("{s} is not in [0, 1]"))
    }
}

fn probability_nonzero(s: &str) -> Result<f32, String> {
    let x = probability(s)?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err(format!("{s} is not in (0, 1]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sampling_flags_become_options() {
        let cli = Cli::try_parse_from([
            "phi3",
            "generate",
            "--max-tokens",
            "7",
            "--temperature",
            "0.5",
            "--top-k",
            "40",
            "--stop",
            "A",
            "--stop",
            "B",
            "--ignore-eos",
            "hi",
        ])
        .unwrap();
        let Command::Generate(g) = cli.command else { panic!("not generate") };
        let o = g.sampling.generate_options();
        assert_eq!((o.max_tokens, o.temperature, o.top_k), (7, 0.5, 40));
        assert_eq!(o.stop, ["A", "B"]);
        assert_eq!(o.stop_token_ids, Some(vec![]));
        assert_eq!(g.prompt, "hi");
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["phi3", "generate", "--max-tokens=-1", "x"][..],
            &["phi3", "generate", "--temperature", "-1", "x"],
            &["phi3", "generate", "--top-p", "0", "x"],
            &["phi3", "generate", "--device", "gpu", "x"],
            &["phi3", "generate", "--stop", "", "x"],
            &["phi3", "generate", "--raw", "--system", "s", "x"],
            &["phi3", "bench", "--dummy-weights", "int4"],
            &["phi3", "bench", "--sessions", "0"],
            &["phi3", "info", "--context", "0"],
            &["phi3", "perplexity", "--compare-to", "int3"],
            &["phi3", "perplexity", "--max-tokens", "1"],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}

#[cfg(test)]
mod kv_flag_tests {
    use super::*;

    #[test]
    fn kv_memory_takes_sizes_with_units() {
        for (text, bytes) in [
            ("2GiB", 2u64 << 30),
            ("512MiB", 512 << 20),
            ("512 mib", 512 << 20),
            ("1.5GB", 1_500_000_000),
            ("64KiB", 64 << 10),
            ("1000000", 1_000_000),
            ("4096B", 4096),
        ] {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text}");
        }
        for bad in ["", "0", "0GiB", "2 GiBs", "GiB", "-1", "1e3", "99999999999TiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        let cli =
            Cli::try_parse_from(["phi3", "generate", "--kv-memory", "2GiB", "--kv-wait", "x"])
                .unwrap();
        let Command::Generate(g) = cli.command else { panic!("not generate") };
        assert_eq!((g.model.kv_memory, g.model.kv_wait), (Some(2 << 30), true));
        let cli =
            Cli::try_parse_from(["phi3", "generate", "--prefill-chunk", "2048", "x"]).unwrap();
        let Command::Generate(g) = cli.command else { panic!("not generate") };
        assert_eq!(g.model.prefill_chunk, Some(2048));
        for bad in ["0", "65537", "x"] {
            let e = Cli::try_parse_from(["phi3", "generate", "--prefill-chunk", bad, "x"]);
            assert_eq!(e.unwrap_err().exit_code(), 2, "{bad}");
        }
        assert_eq!(
            Cli::try_parse_from(["phi3", "info", "--kv-memory", "x"]).unwrap_err().exit_code(),
            2
        );
    }
}
