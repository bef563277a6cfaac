//! `phi3 chat`: a multi-turn conversation, one user message per line of stdin.
//!
//! One session holds the whole conversation, so each turn prefills only the new message (the KV
//! cache of earlier turns is reused). Commands: `/reset` starts over, `/exit` (or end of input)
//! quits. Ctrl-C stops the reply in progress and the conversation goes on.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, Result};
use phi3_core::{ErrorKind, Session, SessionOptions};

use crate::cli::ChatArgs;
use crate::load::load_model;
use crate::reply::{stats_line, stream_reply, Reply};

pub fn run(args: &ChatArgs) -> Result<ExitCode> {
    let loaded = load_model(&args.model, None)?;
    let model = loaded.model;
    model.tokenizer()?;
    let interactive = std::io::stdin().is_terminal();
    let mut session = model.session(SessionOptions::default())?;
    start_conversation(&mut session, args.system.as_deref())?;
    let options = args.sampling.generate_options();
    if interactive {
        eprintln!(
            "chatting with {} on {}: /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply",
            loaded.name,
            model.device_name()
        );
    }

    let mut stdin = std::io::stdin().lock();
    let mut line = Vec::new();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        line.clear();
        if stdin.read_until(b'\n', &mut line).context("reading stdin")? == 0 {
            if interactive {
                eprintln!();
            }
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let message = text.trim_end_matches(['\n', '\r']);
        match message.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                session.reset();
                start_conversation(&mut session, args.system.as_deref())?;
                if interactive {
                    eprintln!("[conversation cleared]");
                }
                continue;
            }
            _ => {}
        }
        if let Err(e) = session.append_message("user", message) {
            // The session is unchanged by a failed append: report and let the user go on.
            match e.kind() {
                ErrorKind::ContextFull => eprintln!("error: {e} (type /reset to start over)"),
                ErrorKind::InvalidArgument | ErrorKind::TokenOutOfRange => eprintln!("error: {e}"),
                _ => return Err(e.into()),
            }
            continue;
        }
        match stream_reply(&mut session, &options)? {
            Reply::Finished(result) => {
                if args.stats {
                    eprintln!("{}", stats_line(&result));
                }
            }
            Reply::Cancelled => {}
            Reply::StdoutClosed => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Empty conversation, or one that starts with the system message.
fn start_conversation(session: &mut Session, system: Option<&str>) -> Result<()> {
    if let Some(system) = system {
        session.append_message("system", system)?;
    }
    Ok(())
}
