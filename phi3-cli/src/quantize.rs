//! `phi3 quantize`: write a quantized copy of a model folder (phi3-core's `quantize` module),
//! with a progress bar on stderr when it is a terminal.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use phi3_core::quantize::{quantize_folder, QuantizeOptions};
use phi3_core::LoadProgress;

use crate::cli::QuantizeArgs;
use crate::hub::{self, Need};

pub fn run(args: &QuantizeArgs) -> Result<ExitCode> {
    let src = hub::resolve_model(&args.model, Need::Everything)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let progress = bar.clone().map(|bar| {
        Arc::new(move |p: &LoadProgress| {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
            bar.set_message(p.tensor.clone());
        }) as phi3_core::ProgressFn
    });
    let options = QuantizeOptions {
        progress,
        awq: args.awq,
        calibration_tokens: args.calibration_tokens,
        lm_head: args.lm_head,
        ..Default::default()
    };
    let report = quantize_folder(&src, &args.out, args.weights, &options);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = report?;
    let gb = |b: u64| b as f64 / 1e9;
    println!(
        "wrote {} ({}): {} tensors, {} quantized; {:.2} GB -> {:.2} GB in {} file(s), {:.1} s",
        args.out.display(),
        report.format,
        report.tensors,
        report.quantized,
        gb(report.bytes_in),
        gb(report.bytes_out),
        report.files.len(),
        report.seconds
    );
    if let Some(awq) = &report.awq {
        println!(
            "awq: {} calibration tokens; per layer, alpha and output MSE vs round-to-nearest:",
            awq.tokens
        );
        let show = |name: &str, s: &phi3_core::quantize::awq::ScaleSearch| {
            format!("{name} a={:.2} {:.3e}/{:.3e}", s.alpha, s.error, s.rtn_error)
        };
        for (i, l) in awq.layers.iter().enumerate() {
            let o = l.o.as_ref().map_or("o (skipped: GQA)".to_string(), |o| show("o", o));
            println!(
                "  layer {i}: {}; {o}; {}; {}",
                show("qkv", &l.qkv),
                show("gate_up", &l.gate_up),
                show("down", &l.down)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
