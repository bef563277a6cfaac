//! A token callback that panics (the Rust side of the reliability issue's "callback that throws"):
//! the panic reaches the caller of `Session::generate` with its payload, the callback is not
//! called again, and the session is left as a `ControlFlow::Break` at the same call would leave
//! it: the tokens sampled before the panic stay, and the session generates again.

use std::ops::ControlFlow;
use std::panic::{self, AssertUnwindSafe};

use phi3_core::{
    demo, Device, FinishReason, GenerateOptions, GenerationResult, LoadOptions, Model, Session,
    SessionOptions,
};

fn model() -> Model {
    demo::demo_model(&LoadOptions { device: Device::Cpu, ..Default::default() }).unwrap()
}

fn chat(model: &Model) -> Session {
    let mut s = model.session(SessionOptions::default()).unwrap();
    s.append_message("user", "Hello").unwrap();
    s
}

/// Generate until `max_tokens` (no stop tokens), with a fixed seed so runs compare.
fn options(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        seed: Some(7),
        stop_token_ids: Some(Vec::new()),
        ..Default::default()
    }
}

/// The marker payload the tests panic with.
#[derive(Debug, PartialEq)]
struct Boom(u32);

/// Run `generate` with a callback that panics with `Boom(at)` on its `at`-th token (1-based).
/// Returns the panic payload (None when generate returned) and the tokens the callback saw, plus
/// how many times it was called after panicking.
fn generate_panicking(
    s: &mut Session,
    o: &GenerateOptions,
    at: usize,
) -> (Option<Box<dyn std::any::Any + Send>>, Vec<u32>, usize) {
    let mut seen = Vec::new();
    let mut calls_after = 0;
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        s.generate(o, |_, token| {
            if seen.len() >= at {
                calls_after += 1;
            }
            if let Some(t) = token {
                seen.push(t);
                if seen.len() == at {
                    panic::panic_any(Boom(at as u32));
                }
            }
            ControlFlow::Continue(())
        })
    }));
    (outcome.err(), seen, calls_after)
}

#[test]
fn panic_propagates_with_its_payload_and_keeps_the_tokens() {
    let model = model();
    let mut s = chat(&model);
    let o = options(32);
    let (payload, seen, calls_after) = generate_panicking(&mut s, &o, 3);
    let payload = payload.expect("the panic did not reach the caller");
    assert_eq!(payload.downcast_ref::<Boom>(), Some(&Boom(3)));
    assert_eq!(calls_after, 0, "on_token was called after it panicked");
    assert_eq!(seen.len(), 3);

    // The prompt plus exactly the three tokens the callback saw.
    let mut reference = chat(&model);
    let full = reference.generate(&o, |_, _| ControlFlow::Continue(())).unwrap();
    let prompt = reference.len() - full.tokens.len();
    assert_eq!(s.len(), prompt + 3);
    assert_eq!(&s.tokens()[prompt..], &seen[..]);
    assert_eq!(&full.tokens[..3], &seen[..], "the panicking run sampled what a clean run does");

    // Usable: it generates again, continuing from where it stopped.
    let more = s.generate(&options(4), |_, _| ControlFlow::Continue(())).unwrap();
    assert_eq!(more.tokens.len(), 4);
    assert_eq!(s.len(), prompt + 3 + 4);
    assert_eq!(s.kv_state().0 + 1, s.len(), "all but the last sampled token are cached");
}

#[test]
fn panic_leaves_the_session_as_a_break_would() {
    let model = model();
    let o = options(32);

    let mut panicked = chat(&model);
    let (payload, seen, _) = generate_panicking(&mut panicked, &o, 5);
    assert!(payload.is_some());

    let mut stopped = chat(&model);
    let mut n = 0;
    let r = stopped
        .generate(&o, |_, token| {
            n += usize::from(token.is_some());
            if n == 5 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(r.finish_reason, FinishReason::Callback);
    assert_eq!(r.tokens, seen);
    assert_eq!(panicked.tokens(), stopped.tokens());
    assert_eq!(panicked.kv_state(), stopped.kv_state());

    // The whole state (tokens, cache, logits, RNG, chat messages with the partial reply) is
    // the same: the saved files are identical.
    let dir = std::env::temp_dir();
    let a = dir.join(format!("phi3-callback-faults-{}-panicked.session", std::process::id()));
    let b = dir.join(format!("phi3-callback-faults-{}-stopped.session", std::process::id()));
    panicked.save(&a).unwrap();
    stopped.save(&b).unwrap();
    let (bytes_a, bytes_b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    assert!(bytes_a == bytes_b, "the panicked session differs from the stopped one");

    // And the conversation goes on identically.
    let next = |s: &mut Session| -> GenerationResult {
        s.append_message("user", "Tell me more").unwrap();
        s.generate(&options(6), |_, _| ControlFlow::Continue(())).unwrap()
    };
    assert_eq!(next(&mut panicked).tokens, next(&mut stopped).tokens);
    assert_eq!(panicked.tokens(), stopped.tokens());
}

#[test]
fn panic_on_the_first_token_and_with_a_string_payload() {
    let model = model();
    let mut s = chat(&model);
    let before = s.len();
    let mut calls = 0;
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        s.generate(&options(16), |_, _| -> ControlFlow<()> {
            calls += 1;
            panic!("host failed at call {calls}")
        })
    }));
    let payload = outcome.expect_err("the panic did not reach the caller");
    assert_eq!(payload.downcast_ref::<String>().map(String::as_str), Some("host failed at call 1"));
    assert_eq!(calls, 1);
    // The assistant prompt and the one sampled token stay.
    assert!(s.len() > before);
    let r = s.generate(&options(3), |_, _| ControlFlow::Continue(())).unwrap();
    assert_eq!(r.tokens.len(), 3);
}

#[test]
fn repeated_panics_never_wedge_the_session() {
    let model = model();
    let mut s = chat(&model);
    let mut len = s.len();
    for round in 1..=4 {
        let (payload, seen, calls_after) = generate_panicking(&mut s, &options(8), round);
        assert_eq!(payload.unwrap().downcast_ref::<Boom>(), Some(&Boom(round as u32)));
        assert_eq!(calls_after, 0);
        assert_eq!(&s.tokens()[s.len() - round..], &seen[..]);
        assert!(s.len() >= len + round);
        len = s.len();
    }
    let r = s.generate(&options(2), |_, _| ControlFlow::Continue(())).unwrap();
    assert_eq!(r.finish_reason, FinishReason::Length);
    assert_eq!(s.len(), len + 2);
}
