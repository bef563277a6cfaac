//! Ten NPCs talking at once: `cargo run -p phi3-example-chat --bin npcs [-- MODEL_DIR]`.
//!
//! One session holds the shared system prompt; each NPC is a fork of it (copy-on-write: the
//! prompt's KV blocks are stored once) and answers its own line on its own thread. The model's
//! scheduler runs the NPCs' decode steps together as one batch, so ten replies cost little more
//! than one; each reply is exactly what that NPC would say alone. Without a model folder it
//! uses the built-in demo model (random weights: the replies are gibberish, the mechanics real).

use std::ops::ControlFlow;
use std::time::Instant;

use phi3_core::{demo, GenerateOptions, LoadOptions, Model, Session, SessionOptions};

const LINES: [&str; 10] = [
    "Blacksmith, what do you sell?",
    "Innkeeper, any rooms free tonight?",
    "Guard, why is the gate closed?",
    "Farmer, how was the harvest?",
    "Bard, sing me something short.",
    "Merchant, where do your spices come from?",
    "Priest, when is the next service?",
    "Hunter, seen any wolves lately?",
    "Child, where are your parents?",
    "Sailor, when does the ship leave?",
];

fn main() -> Result<(), phi3_core::Error> {
    let options = LoadOptions::default();
    let model = match std::env::args().nth(1) {
        Some(dir) => Model::load(dir, &options)?,
        None => demo::demo_model(&options)?,
    };
    let mut world = model.session(SessionOptions::default())?;
    world.append_message(
        "system",
        "You are a villager in a small medieval town. Answer travellers in one or two friendly \
         sentences, in character.",
    )?;
    world.logits()?; // run the shared prompt once, before forking
    let shared = model.kv_usage();

    let npcs: Vec<Session> = LINES.iter().map(|_| world.fork()).collect::<Result<_, _>>()?;
    let generate = GenerateOptions { max_tokens: 48, ..Default::default() };
    let started = Instant::now();
    let replies = std::thread::scope(|s| {
        let handles: Vec<_> = npcs
            .into_iter()
            .zip(LINES)
            .map(|(mut npc, line)| {
                let generate = &generate;
                s.spawn(move || {
                    npc.append_message("user", line)?;
                    npc.generate(generate, |_, _| ControlFlow::Continue(()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("an NPC thread panicked")).collect::<Vec<_>>()
    });
    let elapsed = started.elapsed().as_secs_f64();

    let mut tokens = 0;
    for (line, reply) in LINES.iter().zip(replies) {
        let reply = reply?;
        tokens += reply.tokens.len();
        println!("> {line}\n{}\n", reply.text.trim());
    }
    let stats = model.scheduler_stats();
    println!(
        "{tokens} tokens in {elapsed:.2} s ({:.1} tok/s in total); {} forward passes carried {} \
         sequences (largest batch {})",
        tokens as f64 / elapsed,
        stats.steps,
        stats.sequences,
        stats.max_batch
    );
    println!(
        "the shared prompt took {} KV blocks of {} tokens, stored once for all {} NPCs",
        shared.blocks_in_use,
        shared.block_tokens,
        LINES.len()
    );
    Ok(())
}
