//! Loading the model that `--model` names (or the built-in demo model), with a spinner on stderr
//! while it loads when stderr is a terminal.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use phi3_core::{DummyWeights, LoadOptions, Model};

use crate::cli::ModelArgs;
use crate::hub::{self, Need};

/// What was loaded, and how long it took.
pub struct Loaded {
    pub model: Model,
    /// `--model` as given, or "demo".
    pub name: String,
    /// Seconds from the start of loading (resolution and download excluded) to a usable model.
    pub load_s: f64,
}

/// Load the model of `args`, with random weights when `dummy` is given.
pub fn load_model(args: &ModelArgs, dummy: Option<DummyWeights>) -> Result<Loaded> {
    let options = LoadOptions {
        device: args.device,
        max_context: args.max_context.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        dummy_weights: dummy,
        weights: args.weights,
        kv_memory: args.kv_memory,
        kv_wait: args.kv_wait,
        prefill_chunk: args.prefill_chunk.map(|n| n as usize),
        ..Default::default()
    };
    let Some(spec) = &args.model else {
        eprintln!("using the built-in demo model (random weights): pass --model for a real one");
        let started = Instant::now();
        let model = demo_model(&options)?;
        return Ok(Loaded { model, name: "demo".into(), load_s: started.elapsed().as_secs_f64() });
    };
    let need = if dummy.is_some() { Need::ConfigOnly } else { Need::Everything };
    let dir = hub::resolve_model(spec, need)?;
    let spinner = Spinner::start(&format!("loading {spec}"));
    let started = Instant::now();
    let model = Model::load(&dir, &options);
    let load_s = started.elapsed().as_secs_f64();
    spinner.finish();
    let model = model?;
    log::info!("loaded {} in {load_s:.2} s on {}", dir.display(), model.device_name());
    Ok(Loaded { model, name: spec.clone(), load_s })
}

/// The built-in demo model: small, random weights, its own tokenizer, no files.
fn demo_model(options: &LoadOptions) -> Result<Model> {
    Ok(phi3_core::demo::demo_model(options)?)
}

/// A spinner on stderr, shown only when stderr is a terminal.
struct Spinner(Option<ProgressBar>);

impl Spinner {
    fn start(message: &str) -> Spinner {
        if !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(message.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        Spinner(Some(bar))
    }

    fn finish(self) {
        if let Some(bar) = self.0 {
            bar.finish_and_clear();
        }
    }
}
