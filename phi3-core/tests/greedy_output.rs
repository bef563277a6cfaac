//! Plain greedy generation asks the model only for each step's greedy choice
//! (`OutputKind::Greedy`: on CUDA one id comes back instead of the logits). Its tokens must be
//! those of the logits path, the session must hand out exact logits afterwards, and a session
//! saved after such a step must load and continue exactly.

mod common;

use std::ops::ControlFlow;

use phi3_core::{
    demo, Device, ErrorKind, GenerateOptions, LoadOptions, Model, Session, SessionOptions,
};

fn demo_cpu() -> Model {
    demo::demo_model(&LoadOptions { device: Device::Cpu, ..Default::default() }).unwrap()
}

/// Greedy options; `via_logits` adds a positive bias on a padding id (past the ids the tokenizer
/// can emit, which the sampler removes first), which changes nothing in the choice but makes the
/// step ask for all the logits and process them on the host (the path every backend had before;
/// a bias that only lowers logits would take the candidates' path).
fn greedy(max_tokens: usize, via_logits: bool) -> GenerateOptions {
    let model = demo_cpu();
    let pad = model.config().vocab_size - 1;
    assert!(pad >= model.emittable_vocab(), "the demo model has padding ids");
    GenerateOptions {
        max_tokens,
        stop_token_ids: Some(vec![]),
        logit_bias: if via_logits { vec![(pad as u32, 1.0)] } else { vec![] },
        ..Default::default()
    }
}

/// Generate with `options`, stopping from the callback after `stop_after` tokens: the session
/// then holds the output of its last token's pass, which the next step would have used.
fn generate_then_stop(s: &mut Session, options: &GenerateOptions, stop_after: usize) -> Vec<u32> {
    let mut seen = 0;
    let result = s
        .generate(options, |_, token| {
            seen += usize::from(token.is_some());
            if seen == stop_after {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    result.tokens
}

fn prompt_session(model: &Model) -> Session {
    let mut s = model.session(SessionOptions::default()).unwrap();
    s.append_text("The quick brown fox jumps over the lazy dog, and then").unwrap();
    s
}

#[test]
fn greedy_steps_give_the_logits_paths_tokens_and_exact_logits_after() {
    let model = demo_cpu();
    let prompt = prompt_session(&model);
    let (mut plain, mut via_logits) = (prompt.fork().unwrap(), prompt.fork().unwrap());
    let a = generate_then_stop(&mut plain, &greedy(20, false), 6);
    let b = generate_then_stop(&mut via_logits, &greedy(20, true), 6);
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "greedy choices differ from the host sampler's");
    // The greedy run holds only its last step's choice; the other its logits.
    assert!(plain.has_last_output() && plain.last_logits().is_none());
    let want = via_logits.last_logits().expect("logits path keeps its logits").to_vec();
    // Asked for logits, the greedy session runs its last token again: the same pass as the one
    // that chose the token (a one-token decode step), so the same bits.
    let got = plain.logits().unwrap().to_vec();
    assert_eq!(got.len(), want.len());
    assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "logits differ");
    // And both continue alike.
    let a = plain.generate(&greedy(5, false), |_, _| ControlFlow::Continue(())).unwrap();
    let b = via_logits.generate(&greedy(5, true), |_, _| ControlFlow::Continue(())).unwrap();
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn a_session_saved_after_a_greedy_step_loads_and_continues_exactly() {
    let model = demo_cpu();
    let mut original = prompt_session(&model);
    generate_then_stop(&mut original, &greedy(20, false), 4);
    assert!(original.has_last_output() && original.last_logits().is_none());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("greedy.phi3");
    original.save(&path).unwrap();
    let mut loaded = Session::load(&model, &path).unwrap();
    assert!(loaded.has_last_output(), "the greedy step's choice was not restored");
    assert_eq!(loaded.kv_state(), original.kv_state());
    let a = original.generate(&greedy(6, false), |_, _| ControlFlow::Continue(())).unwrap();
    let b = loaded.generate(&greedy(6, false), |_, _| ControlFlow::Continue(())).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(original.logits().unwrap(), loaded.logits().unwrap());

    // A header whose greedy choice is outside its limit is refused before anything is read.
    let bad_path = dir.path().join("bad.phi3");
    common::write_with_edited_header(&path, &bad_path, |header| {
        let greedy = header["greedy"].as_object_mut().expect("the header records the choice");
        assert!(greedy.contains_key("token"), "{greedy:?}");
        greedy.insert("token".into(), 4_000_000_000u64.into());
    });
    let err = Session::load(&model, &bad_path).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ModelFormat, "{err}");
    assert!(err.to_string().contains("inconsistent greedy"), "{err}");
}

#[test]
fn append_tokens_greedy_chooses_as_the_host_and_leaves_the_session_on_error() {
    let model = demo_cpu();
    let limit = model.emittable_vocab();
    let prompt = prompt_session(&model);
    let (mut by_logits, mut by_choice) = (prompt.fork().unwrap(), prompt.fork().unwrap());
    let choose = |logits: &[f32]| phi3_core::sampler::greedy_choice(logits, limit);
    let mut token = choose(by_logits.logits().unwrap()).unwrap();
    let (mut want, mut got) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        want.push(choose(&by_logits.append_tokens(&[token]).unwrap()));
        got.push(by_choice.append_tokens_greedy(&[token]).unwrap());
        token = want.last().unwrap().unwrap();
    }
    assert_eq!(got, want);
    assert!(got.iter().all(|t| t.is_some_and(|t| (t as usize) < limit)));

    // A bad id: an error naming it, and the session as it was (its greedy choice still held).
    let (len, kv) = (by_choice.len(), by_choice.kv_state());
    let err = by_choice.append_tokens_greedy(&[model.config().vocab_size as u32]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TokenOutOfRange, "{err}");
    assert_eq!((by_choice.len(), by_choice.kv_state()), (len, kv));
    assert!(by_choice.has_last_output());
}
