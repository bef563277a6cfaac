//! `phi3 perplexity`: perplexity of a model on a text and, with a reference, the comparison of
//! the two (perplexity of each, top-1 agreement, KL), through `phi3_core::eval`. The reference is
//! the same model in another weight format, or another model (folder or repo id, resolved like
//! `--model` and loaded as stored) with the same vocabulary.
//!
//! The text (a file or `eval::HELD_TEXT`) is tokenized once with the model's tokenizer (BOS
//! added as `tokenizer(text)` does); a model without a tokenizer (the HF test fixtures) gets the
//! text's UTF-8 bytes as token ids, which needs a vocabulary of at least 256. `--max-tokens`
//! keeps the first N tokens. Ctrl-C stops the measurement (exit 130).

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use phi3_core::eval::{self, Comparison, EvalOptions, Perplexity, HELD_TEXT};
use phi3_core::{CancelToken, ErrorKind, Model, WeightFormat};

use crate::cli::{CompareTo, ModelArgs, PerplexityArgs};
use crate::hub::{self, Need};
use crate::interrupt::{Interrupt, EXIT_INTERRUPTED};
use crate::load::load_model;

pub fn run(args: &PerplexityArgs) -> Result<ExitCode> {
    let (text, source) = match &args.text {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --text {}", path.display()))?;
            (text, path.display().to_string())
        }
        None => (HELD_TEXT.to_string(), "the built-in held-out text".to_string()),
    };
    if text.trim().is_empty() {
        bail!("{source} is empty: nothing to score");
    }
    let compare_to = match &args.compare_to {
        Some(c) => Some(c.clone()),
        None if args.model.weights != WeightFormat::Native => {
            Some(CompareTo::Weights(WeightFormat::Native))
        }
        None => None,
    };
    // What the "reference:" line says, and the loaded reference.
    let (reference_name, reference) = match &compare_to {
        Some(CompareTo::Weights(weights)) => (
            format!("the same model with {weights} weights"),
            Some(load_model(&with_weights(&args.model, *weights), None)?),
        ),
        Some(CompareTo::Model(spec)) => {
            let dir = resolve_reference(spec)?;
            let mut model_args = with_weights(&args.model, WeightFormat::Native);
            model_args.model = Some(spec.clone());
            let loaded = load_model(&model_args, None)?;
            let at = if Path::new(spec) == dir {
                String::new()
            } else {
                format!(" at {}", dir.display())
            };
            (format!("{spec}{at} ({} weights)", loaded.model.weight_format()), Some(loaded))
        }
        None => (String::new(), None),
    };
    let candidate = load_model(&args.model, None)?;
    let model = &candidate.model;

    let (mut tokens, byte_ids) = tokenize(model, &text)?;
    let n_text_tokens = tokens.len();
    if let Some(max) = args.max_tokens {
        tokens.truncate(usize::try_from(max).unwrap_or(usize::MAX));
    }
    if tokens.len() < 2 {
        bail!(
            "{source} is {} token{} long: need at least 2 (the first only conditions)",
            tokens.len(),
            if tokens.len() == 1 { "" } else { "s" }
        );
    }
    let options =
        EvalOptions { window: args.window.map(|n| usize::try_from(n).unwrap_or(usize::MAX)) };

    let cancel = CancelToken::new();
    let _interrupt = Interrupt::guard(cancel.clone());
    let progress = Progress::start();
    let on_progress = |done: usize, total: usize| {
        progress.update(done, total);
        if cancel.is_cancelled() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let result = match &reference {
        Some(r) => eval::compare_with_progress(&r.model, model, &tokens, &options, on_progress)
            .map(Outcome::Compared),
        None => eval::perplexity_with_progress(model, &tokens, &options, on_progress)
            .map(Outcome::Single),
    };
    progress.finish();
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) if e.kind() == ErrorKind::Cancelled => {
            eprintln!("[measurement stopped]");
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
        Err(e) => return Err(e.into()),
    };

    let window = options.window.unwrap_or(usize::MAX).min(
        reference
            .as_ref()
            .map_or(model.max_context(), |r| r.model.max_context().min(model.max_context())),
    );
    println!("model:    {} on {}", candidate.name, model.device_name());
    if reference.is_some() {
        println!("reference: {reference_name}");
    }
    println!(
        "text:     {source}, {} bytes -> {n_text_tokens} tokens{}",
        text.len(),
        if byte_ids { " (no tokenizer: bytes as token ids)" } else { "" }
    );
    let stats = outcome.counts();
    println!(
        "scored:   {} of {} tokens, in {} window{} of at most {window}",
        stats.tokens,
        tokens.len(),
        stats.windows,
        if stats.windows == 1 { "" } else { "s" }
    );
    println!();
    println!(
        "{:<10} {:>18} {:>9} {:>8} {:>8} {:>8}",
        "weights", "perplexity", "mean NLL", "load s", "eval s", "tok/s"
    );
    let line = |format: WeightFormat, p: &Perplexity, load_s: f64| {
        println!(
            "{:<10} {:>18.3} {:>9.4} {:>8.2} {:>8.2} {:>8.1}",
            format.to_string(),
            p.perplexity(),
            p.mean_nll(),
            load_s,
            p.seconds,
            p.tokens as f64 / p.seconds
        );
    };
    match (&outcome, &reference) {
        (Outcome::Compared(c), Some(r)) => {
            let (rf, cf) = (r.model.weight_format(), model.weight_format());
            line(rf, &c.reference, r.load_s);
            line(cf, &c.candidate, candidate.load_s);
            println!();
            let delta = c.candidate.perplexity() - c.reference.perplexity();
            println!(
                "Δ perplexity ({cf} vs {rf}): {delta:+.3} ({:+.3}%)",
                100.0 * (c.perplexity_ratio() - 1.0)
            );
            println!(
                "top-1 agreement: {:.2}% ({} of {})",
                100.0 * c.top1_agreement(),
                c.top1_matches,
                c.reference.tokens
            );
            println!("KL({rf} ‖ {cf}): mean {:.3e}, max {:.3e} nats", c.mean_kl(), c.kl_max);
        }
        _ => line(model.weight_format(), stats, candidate.load_s),
    }
    if args.model.model.is_none() {
        println!();
        println!(
            "note: random weights: absolute perplexities mean nothing (near or above the \
             vocabulary size of {}); only the differences between formats do",
            model.config().vocab_size
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What was measured: one model, or a reference and a candidate.
enum Outcome {
    Single(Perplexity),
    Compared(Comparison),
}

impl Outcome {
    /// The reference's statistics (its token and window counts hold for both models).
    fn counts(&self) -> &Perplexity {
        match self {
            Outcome::Single(p) => p,
            Outcome::Compared(c) => &c.reference,
        }
    }
}

/// `args` with another weight format.
fn with_weights(args: &ModelArgs, weights: WeightFormat) -> ModelArgs {
    ModelArgs { weights, ..args.clone() }
}

/// The folder of `--compare-to SPEC`. A bare word that is neither a folder nor a repo id is most
/// likely a mistyped weight format, so its error lists the formats too.
fn resolve_reference(spec: &str) -> Result<PathBuf> {
    hub::resolve_model(spec, Need::Everything).map_err(|e| {
        let bare_word = !spec.contains(['/', std::path::MAIN_SEPARATOR]);
        if bare_word && !Path::new(spec).exists() {
            anyhow!(
                "--compare-to {spec}: not a weight format (native, int8, int4, int4-g32, \
                 int4-g64, int4-g128) and no such model folder"
            )
        } else {
            e.context("--compare-to")
        }
    })
}

/// The text's token ids, and whether they are its bytes (no tokenizer).
fn tokenize(model: &Model, text: &str) -> Result<(Vec<u32>, bool)> {
    match model.tokenizer() {
        Ok(tokenizer) => Ok((tokenizer.encode(text, true)?, false)),
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            let vocab = model.config().vocab_size;
            if vocab < 256 {
                bail!("the model has no tokenizer and a vocabulary of {vocab} < 256, so the text's bytes cannot serve as token ids");
            }
            Ok((text.bytes().map(u32::from).collect(), true))
        }
        Err(e) => Err(e.into()),
    }
}

/// A progress bar on stderr, shown only when stderr is a terminal.
struct Progress(Option<ProgressBar>);

impl Progress {
    fn start() -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("scoring {pos}/{len} tokens ({elapsed}, eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Progress(Some(bar))
    }

    fn update(&self, done: usize, total: usize) {
        if let Some(bar) = &self.0 {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
