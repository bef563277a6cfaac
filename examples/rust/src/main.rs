//! A minimal chat on phi3-core: `cargo run -p phi3-example-chat [-- MODEL_DIR]`.
//!
//! Reads one user message per line from stdin and streams each reply; the session (and so its
//! KV cache) is reused across turns. Without a model folder it uses the built-in demo model.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;

use phi3_core::{demo, GenerateOptions, LoadOptions, Model, SessionOptions};

fn main() -> Result<(), phi3_core::Error> {
    let options = LoadOptions::default();
    let model = match std::env::args().nth(1) {
        Some(dir) => Model::load(dir, &options)?,
        None => demo::demo_model(&options)?,
    };
    let mut session = model.session(SessionOptions::default())?;
    let generate = GenerateOptions { max_tokens: 128, ..Default::default() };
    for line in std::io::stdin().lock().lines() {
        let line =
            line.map_err(|e| phi3_core::Error::new(phi3_core::ErrorKind::Io, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        session.append_message("user", &line)?;
        let reply = session.generate(&generate, |text, _token| {
            print!("{text}");
            let _ = std::io::stdout().flush();
            ControlFlow::Continue(())
        })?;
        println!("\n[{} tokens, {}]", reply.tokens.len(), reply.finish_reason.as_str());
    }
    Ok(())
}
