//! `phi3 generate`: one prompt, one streamed reply.

use std::io::Read;
use std::process::ExitCode;

use anyhow::{Context, Result};
use phi3_core::SessionOptions;

use crate::cli::GenerateArgs;
use crate::interrupt::EXIT_INTERRUPTED;
use crate::load::load_model;
use crate::reply::{stats_line, stream_reply, Reply};

pub fn run(args: &GenerateArgs) -> Result<ExitCode> {
    let prompt = if args.prompt == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading the prompt from stdin")?;
        text
    } else {
        args.prompt.clone()
    };
    let model = load_model(&args.model, None)?.model;
    model.tokenizer()?;
    let mut session = model.session(SessionOptions::default())?;
    if args.raw {
        session.append_text(&prompt)?;
    } else {
        if let Some(system) = &args.system {
            session.append_message("system", system)?;
        }
        session.append_message("user", &prompt)?;
    }
    match stream_reply(&mut session, &args.sampling.generate_options())? {
        Reply::Finished(result) => {
            if args.stats {
                eprintln!("{}", stats_line(&result));
            }
            Ok(ExitCode::SUCCESS)
        }
        Reply::Cancelled => Ok(ExitCode::from(EXIT_INTERRUPTED)),
        Reply::StdoutClosed => Ok(ExitCode::SUCCESS),
    }
}
