//! Streaming one reply to stdout: shared by `generate` and `chat`.
//!
//! Each chunk of text is written and flushed as the session produces it, so a reader sees tokens
//! as they come. Ctrl-C during the reply cancels it (see `interrupt.rs`); a closed stdout (e.g.
//! `phi3 generate ... | head -c 10`) ends the reply quietly.

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::{Context, Result};
use phi3_core::{ErrorKind, GenerateOptions, GenerationResult, Session};

use crate::interrupt::Interrupt;

/// How a reply ended.
pub enum Reply {
    /// Generation ended by itself (stop token, stop string, max tokens, full context).
    Finished(GenerationResult),
    /// Ctrl-C stopped it; the tokens generated so far stay in the session.
    Cancelled,
    /// Stdout was closed by its reader.
    StdoutClosed,
}

/// Generate from `session`, streaming the text to stdout, then end the line.
pub fn stream_reply(session: &mut Session, options: &GenerateOptions) -> Result<Reply> {
    let _interrupt = Interrupt::guard(session.cancel_token());
    let mut out = std::io::stdout().lock();
    let mut write_error: Option<std::io::Error> = None;
    let mut ends_with_newline = true;
    let result = session.generate(options, |text, _token| {
        if text.is_empty() {
            return ControlFlow::Continue(());
        }
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => {
                ends_with_newline = text.ends_with('\n');
                ControlFlow::Continue(())
            }
            Err(e) => {
                write_error = Some(e);
                ControlFlow::Break(())
            }
        }
    });
    if let Some(e) = write_error {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(Reply::StdoutClosed);
        }
        return Err(e).context("writing to stdout");
    }
    let reply = match result {
        Ok(result) => Reply::Finished(result),
        Err(e) if e.kind() == ErrorKind::Cancelled => Reply::Cancelled,
        Err(e) => return Err(e.into()),
    };
    if !ends_with_newline {
        match out.write_all(b"\n").and_then(|()| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(Reply::StdoutClosed),
            other => other.context("writing to stdout")?,
        }
    }
    if matches!(reply, Reply::Cancelled) {
        eprintln!("[generation stopped]");
    }
    Ok(reply)
}

/// One line of statistics for stderr, e.g.
/// `[stats] prompt 12 tokens at 345.6 tok/s, reply 8 tokens at 23.4 tok/s, first token after 0.120 s, finish: length`.
pub fn stats_line(result: &GenerationResult) -> String {
    let stats = &result.stats;
    format!(
        "[stats] prompt {} tokens at {:.1} tok/s, reply {} tokens at {:.1} tok/s, first token after \
         {:.3} s, finish: {}",
        stats.prompt_tokens,
        stats.prefill_tokens_per_s,
        stats.generated_tokens,
        stats.decode_tokens_per_s,
        stats.time_to_first_token.as_secs_f64(),
        result.finish_reason.as_str()
    )
}
