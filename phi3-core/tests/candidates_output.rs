//! Top-k sampling (and greedy decoding with penalties) asks the model only for each step's
//! largest logits
//! (`OutputKind::Candidates`: on CUDA about k (id, logit) pairs come back instead of the
//! vocabulary's logits) and draws from them (`sampler::sample_candidates`). Its tokens must be
//! those of the logits path for the same seed, including the steps where the candidates cannot
//! decide and the session computes the whole row again; the session must hand out exact logits
//! afterwards, and one saved after such a step must load and continue exactly.

use std::ops::ControlFlow;

mod common;

use phi3_core::sampler::{candidate_count, SamplerOptions};
use phi3_core::{
    demo, Device, ErrorKind, GenerateOptions, LoadOptions, Model, Session, SessionOptions,
};

fn demo_cpu() -> Model {
    demo::demo_model(&LoadOptions { device: Device::Cpu, ..Default::default() }).unwrap()
}

/// Sampling options with `top_k`.
fn top_k(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> GenerateOptions {
    GenerateOptions {
        max_tokens: 24,
        temperature,
        top_k,
        top_p,
        min_p,
        seed: Some(seed),
        stop_token_ids: Some(vec![]),
        ..Default::default()
    }
}

/// `options` with a positive bias on a padding id of the demo model (one past the ids the
/// tokenizer can emit, which step 1 of the sampler has already removed): it changes no logit
/// that counts, but a raising bias makes the steps ask for all the logits (the path every
/// backend had before).
fn via_logits(model: &Model, options: &GenerateOptions) -> GenerateOptions {
    let pad = model.config().vocab_size - 1;
    assert!(pad >= model.emittable_vocab(), "the demo model has padding ids");
    let mut o = options.clone();
    o.logit_bias.push((pad as u32, 1.0));
    o
}

fn prompt_session(model: &Model) -> Session {
    let mut s = model.session(SessionOptions::default()).unwrap();
    s.append_text("The quick brown fox jumps over the lazy dog, and then").unwrap();
    s
}

fn generate(s: &mut Session, options: &GenerateOptions) -> Vec<u32> {
    s.generate(options, |_, _| ControlFlow::Continue(())).unwrap().tokens
}

/// Whether generate with `options` asks for candidates (as the session decides it).
fn asks_for_candidates(model: &Model, options: &GenerateOptions) -> bool {
    let sampling: SamplerOptions = options.sampler_options();
    candidate_count(&sampling, model.config().vocab_size).is_some()
}

#[test]
fn top_k_steps_draw_the_logits_paths_tokens() {
    let model = demo_cpu();
    let prompt = prompt_session(&model);
    // (temperature, top_k, top_p, min_p): top-k alone, with top-p and min-p, k = 1, a k near
    // the candidates' cap, a hot and a cold temperature.
    let cases = [
        (0.8, 40, 1.0, 0.0),
        (1.0, 50, 0.9, 0.0),
        (0.7, 20, 0.95, 0.05),
        (1.3, 1, 1.0, 0.0),
        (1.5, 900, 0.98, 0.0),
        (0.05, 10, 1.0, 0.0),
    ];
    for (i, &(t, k, p, m)) in cases.iter().enumerate() {
        for seed in [1, 2, 3] {
            let plain = top_k(t, k, p, m, seed);
            assert_same_tokens(&model, &prompt, &plain, &format!("case {i} seed {seed}"));
        }
    }
}

/// Penalties and biases that only lower logits keep the candidates, for sampling and for greedy
/// decoding over the penalised logits; each token is the logits path's.
#[test]
fn lowering_penalties_keep_the_candidates() {
    let model = demo_cpu();
    let prompt = prompt_session(&model);
    let penalised = |o: GenerateOptions, r: f32, presence: f32, frequency: f32| GenerateOptions {
        repetition_penalty: r,
        presence_penalty: presence,
        frequency_penalty: frequency,
        logit_bias: vec![(7, -3.0), (300, -0.5)],
        ..o
    };
    let cases = [
        penalised(top_k(0.8, 40, 0.95, 0.0, 11), 1.1, 0.0, 0.0),
        penalised(top_k(1.2, 5, 1.0, 0.0, 12), 1.3, 0.5, 0.2),
        penalised(top_k(0.0, 0, 1.0, 0.0, 13), 1.2, 0.0, 0.0), // greedy
        penalised(top_k(0.0, 0, 1.0, 0.0, 14), 1.0, 0.3, 0.3), // greedy
    ];
    for (i, options) in cases.iter().enumerate() {
        assert_same_tokens(&model, &prompt, options, &format!("case {i}"));
    }
}

/// Generate with `options` from `prompt`: the steps ask for candidates, and the tokens are those
/// of the logits path.
fn assert_same_tokens(model: &Model, prompt: &Session, options: &GenerateOptions, what: &str) {
    let all_logits = via_logits(model, options);
    assert!(asks_for_candidates(model, options), "{what}");
    assert!(!asks_for_candidates(model, &all_logits), "{what}");
    let a = generate(&mut prompt.fork().unwrap(), options);
    let b = generate(&mut prompt.fork().unwrap(), &all_logits);
    assert_eq!(a.len(), options.max_tokens, "{what}");
    assert_eq!(a, b, "{what}: tokens differ from the logits path's");
}

/// A temperature so small (the least f32 above 0) that every positive logit becomes +inf: the k-th and the smallest
/// candidate are both +inf, so the candidates cannot show that no other id ties with them, and
/// every step computes the whole row again. The tokens are still the logits path's.
#[test]
fn steps_the_candidates_cannot_decide_fall_back_to_the_whole_row() {
    let model = demo_cpu();
    let prompt = prompt_session(&model);
    for seed in [4, 5] {
        let plain = top_k(1e-45, 3, 1.0, 0.0, seed);
        let a = generate(&mut prompt.fork().unwrap(), &plain);
        let b = generate(&mut prompt.fork().unwrap(), &via_logits(&model, &plain));
        assert_eq!(a, b, "seed {seed}");
        // Not all the same token: the draw among the tied ids took place.
        assert!(a.iter().any(|&t| t != a[0]), "{a:?}");
    }
}

#[test]
fn after_a_top_k_step_logits_are_exact_and_a_saved_session_continues() {
    let model = demo_cpu();
    let prompt = prompt_session(&model);
    let (mut plain, mut all_logits) = (prompt.fork().unwrap(), prompt.fork().unwrap());
    // Stopped from the callback after 5 tokens: each session holds its last pass's output.
    let stop_after = |s: &mut Session, options: &GenerateOptions| {
        let mut seen = 0;
        s.generate(options, |_, token| {
            seen += usize::from(token.is_some());
            if seen == 5 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap()
        .tokens
    };
    let options = top_k(0.9, 30, 0.9, 0.0, 8);
    let a = stop_after(&mut plain, &options);
    let b = stop_after(&mut all_logits, &via_logits(&model, &options));
    assert_eq!(a, b);
    assert!(plain.has_last_output() && plain.last_logits().is_none());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("top-k.phi3");
    plain.save(&path).unwrap();
    // Asked for logits, the session runs its last token again: the same bits.
    let want = all_logits.last_logits().expect("the logits path keeps its logits").to_vec();
    let got = plain.logits().unwrap().to_vec();
    assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "logits differ");
    // The saved session holds the candidates (header `candidates`: ids and exact bits) and
    // continues exactly as the original from them, with no pass over the last token.
    let mut loaded = Session::load(&model, &path).unwrap();
    assert!(loaded.has_last_output() && loaded.last_logits().is_none());
    let next = top_k(0.9, 30, 0.9, 0.0, 9);
    assert_eq!(generate(&mut loaded, &next), generate(&mut plain, &next));

    // A header whose candidates are not ascending ids is refused before anything is read.
    let bad_path = dir.path().join("bad.phi3");
    common::write_with_edited_header(&path, &bad_path, |header| {
        let ids = header["candidates"]["ids"].as_array_mut().expect("the header records the ids");
        ids.swap(0, 1);
    });
    let err = Session::load(&model, &bad_path).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ModelFormat, "{err}");
    assert!(err.to_string().contains("inconsistent candidates"), "{err}");
}
