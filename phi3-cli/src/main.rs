//! `phi3`: run Phi-3 models from the command line (generate, chat, info, bench, perplexity,
//! quantize).
//!
//! A thin front end over phi3-core: argument parsing, model resolution (folder or Hugging Face
//! repo id), streaming output, Ctrl-C and error reporting. No model logic lives here.
//!
//! Exit codes: 0 success, 1 error (one `error: ...` line on stderr), 2 usage error (clap),
//! 130 interrupted by Ctrl-C.

mod bench;
mod chat;
mod cli;
mod generate;
mod gpu_check;
mod hub;
mod info;
mod interrupt;
mod load;
mod perplexity;
mod quantize;
mod reply;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    if let Err(e) = interrupt::install() {
        log::warn!("{e:#}");
    }
    let result = match &cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Info(args) => info::run(args),
        Command::Bench(args) => bench::run(args),
        Command::GpuCheck(args) => gpu_check::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Quantize(args) => quantize::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// Log to stderr at warn, info (-v) or debug (-vv and more); RUST_LOG, when set, wins.
fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
}

/// An error message on one line: embedded line breaks become spaces.
fn one_line(message: &str) -> String {
    message.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}
