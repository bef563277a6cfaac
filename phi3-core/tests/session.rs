//! Sessions and generation on the built-in demo model (random weights, its own tokenizer):
//! streaming, stop rules, callbacks, cancellation, fork, seeds, chat messages, threads.

use std::ops::ControlFlow;
use std::sync::mpsc;
use std::time::Duration;

use phi3_core::{
    demo, ChatMessage, Device, ErrorKind, FinishReason, GenerateOptions, LoadOptions, Model,
    Session, SessionOptions,
};

fn model() -> Model {
    demo::demo_model(&LoadOptions { device: Device::Cpu, ..Default::default() }).unwrap()
}

fn prompted(model: &Model, text: &str) -> Session {
    let mut s = model.session(SessionOptions::default()).unwrap();
    s.append_message("user", text).unwrap();
    s
}

/// Length of the prompt `generate` runs on for one user message (assistant prompt included).
fn prompt_len(model: &Model, text: &str) -> usize {
    model.apply_chat_template(&[ChatMessage::new("user", text)], true).unwrap().len()
}

/// Generate collecting every streamed chunk.
fn run(
    s: &mut Session,
    o: &GenerateOptions,
) -> (phi3_core::Result<phi3_core::GenerationResult>, Vec<String>) {
    let mut chunks = Vec::new();
    let r = s.generate(o, |text, _| {
        chunks.push(text.to_string());
        ControlFlow::Continue(())
    });
    (r, chunks)
}

fn no_stop_tokens(o: GenerateOptions) -> GenerateOptions {
    GenerateOptions { stop_token_ids: Some(vec![]), ..o }
}

#[test]
fn streamed_text_equals_result_and_decoded_tokens() {
    let model = model();
    let mut s = prompted(&model, "Tell me a story about a cat.");
    let o = no_stop_tokens(GenerateOptions { max_tokens: 40, ..Default::default() });
    let (r, chunks) = run(&mut s, &o);
    let r = r.unwrap();
    assert_eq!(r.finish_reason, FinishReason::Length);
    assert_eq!(r.tokens.len(), 40);
    assert_eq!(chunks.concat(), r.text);
    let prompt = s.tokens()[..prompt_len(&model, "Tell me a story about a cat.")].to_vec();
    let tok = model.tokenizer().unwrap();
    let all = tok.decode(s.tokens(), true).unwrap();
    let before = tok.decode(&prompt, true).unwrap();
    assert_eq!(all.strip_prefix(&before).unwrap(), r.text);
    assert_eq!(s.tokens(), [prompt, r.tokens.clone()].concat());
    assert!(r.tokens.iter().all(|&t| (t as usize) < model.emittable_vocab()));
    assert!(r.stats.decode_tokens_per_s > 0.0);
    assert!(r.stats.prompt_tokens > 0);
}

#[test]
fn stop_string_cuts_the_text_and_never_streams() {
    let model = model();
    let base = prompted(&model, "Write something.");
    let o = no_stop_tokens(GenerateOptions { max_tokens: 40, ..Default::default() });
    let full = run(&mut base.fork().unwrap(), &o).0.unwrap().text;
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "demo output too short: {full:?}");
    // A stop string from the middle of the greedy text: the rerun must end right before it.
    let stop: String = chars[8..11].iter().collect();
    let cut = full.find(&stop).unwrap();
    let mut s = base.fork().unwrap();
    let (r, chunks) = run(&mut s, &GenerateOptions { stop: vec![stop.clone()], ..o.clone() });
    let r = r.unwrap();
    assert_eq!(r.finish_reason, FinishReason::StopString);
    assert_eq!(r.text, full[..cut]);
    assert_eq!(chunks.concat(), r.text);
    assert!(chunks.iter().all(|c| !c.contains(&stop)));
}

#[test]
fn stop_token_max_tokens_and_callback_finish_reasons() {
    let model = model();
    let base = prompted(&model, "Hi");
    let o = no_stop_tokens(GenerateOptions { max_tokens: 10, ..Default::default() });
    let reference = run(&mut base.fork().unwrap(), &o).0.unwrap();

    let stop_at = reference.tokens[3];
    let first = reference.tokens.iter().position(|&t| t == stop_at).unwrap();
    let mut s = base.fork().unwrap();
    let r = run(&mut s, &GenerateOptions { stop_token_ids: Some(vec![stop_at]), ..o.clone() })
        .0
        .unwrap();
    assert_eq!(r.finish_reason, FinishReason::Eos);
    assert_eq!(r.tokens, reference.tokens[..=first]);
    assert_eq!(*s.tokens().last().unwrap(), stop_at, "the stop token stays in the session");

    let mut s = base.fork().unwrap();
    let mut calls = 0;
    let r = s
        .generate(&o, |_, token| {
            calls += usize::from(token.is_some());
            if calls == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(r.finish_reason, FinishReason::Callback);
    assert_eq!(r.tokens, reference.tokens[..2]);
    assert_eq!(s.len(), prompt_len(&model, "Hi") + 2);
}

#[test]
fn generation_continues_exactly_after_each_stop() {
    // Generating 10 tokens at once equals 4 + 6 in two calls (lazy last token, KV reuse).
    let model = model();
    let base = prompted(&model, "Count with me");
    let o = no_stop_tokens(GenerateOptions { max_tokens: 10, ..Default::default() });
    let whole = run(&mut base.fork().unwrap(), &o).0.unwrap();
    let mut s = base.fork().unwrap();
    let a = run(&mut s, &GenerateOptions { max_tokens: 4, ..o.clone() }).0.unwrap();
    let b = run(&mut s, &GenerateOptions { max_tokens: 6, ..o }).0.unwrap();
    assert_eq!([a.tokens, b.tokens].concat(), whole.tokens);
}

#[test]
fn seeded_sampling_is_deterministic() {
    let model = model();
    let base = prompted(&model, "Once upon a time");
    let o = no_stop_tokens(GenerateOptions {
        max_tokens: 20,
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(42),
        ..Default::default()
    });
    let a = run(&mut base.fork().unwrap(), &o).0.unwrap();
    let b = run(&mut base.fork().unwrap(), &o).0.unwrap();
    let c = run(&mut base.fork().unwrap(), &GenerateOptions { seed: Some(43), ..o }).0.unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);
}

#[test]
fn cancel_during_decode_from_another_thread() {
    let model = model();
    let mut s = prompted(&model, "Go on forever");
    let cancel = s.cancel_token();
    let (tx, rx) = mpsc::channel::<()>();
    let canceller = std::thread::spawn(move || {
        rx.recv().unwrap();
        cancel.cancel();
    });
    let before = prompt_len(&model, "Go on forever");
    let o = no_stop_tokens(GenerateOptions { max_tokens: 1000, ..Default::default() });
    let mut steps = 0;
    let err = s
        .generate(&o, |_, _| {
            steps += 1;
            if steps == 3 {
                tx.send(()).unwrap();
                // Give the other thread time to set the flag before the next step.
                std::thread::sleep(Duration::from_millis(50));
            }
            ControlFlow::Continue(())
        })
        .unwrap_err();
    canceller.join().unwrap();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    assert_eq!(s.len(), before + 3, "completed steps stay in the session");
    // Still usable, and the next call is not cancelled by the old request.
    let r = run(&mut s, &GenerateOptions { max_tokens: 2, ..o }).0.unwrap();
    assert_eq!(r.tokens.len(), 2);
}

#[test]
fn cancel_during_a_long_prefill() {
    let model = model();
    let mut s = model.session(SessionOptions::default()).unwrap();
    // Queue ~3500 pending tokens (append_text is lazy; the prefill runs inside generate).
    let per_word =
        model.tokenizer().unwrap().encode(&"word ".repeat(100), false).unwrap().len() / 100;
    let text = "word ".repeat(3500 / per_word.max(1));
    s.append_text(&text).unwrap();
    assert!(s.len() > 2000);
    let cancel = s.cancel_token();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        cancel.cancel();
    });
    let len = s.len();
    let err =
        s.generate(&GenerateOptions::default(), |_, _| ControlFlow::Continue(())).unwrap_err();
    canceller.join().unwrap();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    assert_eq!(s.len(), len, "pending prompt tokens stay; nothing was generated");
    let (cached, _) = s.kv_state();
    assert!(cached < len, "cancelled before the prefill finished ({cached} of {len} cached)");
    // The session resumes the prefill where it stopped and gives the same logits as a fresh one.
    let resumed = s.logits().unwrap().to_vec();
    let mut fresh = model.session(SessionOptions::default()).unwrap();
    fresh.append_text(&text).unwrap();
    assert_eq!(fresh.logits().unwrap(), &resumed[..]);
}

#[test]
fn chat_messages_match_the_template_of_the_whole_conversation() {
    let model = model();
    let mut s = model.session(SessionOptions::default()).unwrap();
    s.append_message("system", "You are terse.").unwrap();
    s.append_message("user", "Hello").unwrap();
    let messages =
        [ChatMessage::new("system", "You are terse."), ChatMessage::new("user", "Hello")];
    assert_eq!(s.tokens(), &model.apply_chat_template(&messages, false).unwrap()[..]);
    // generate adds the assistant prompt first: the prompt it runs on is the template's.
    let expected = model.apply_chat_template(&messages, true).unwrap();
    let reply = run(&mut s, &GenerateOptions { max_tokens: 5, ..Default::default() }).0.unwrap();
    assert_eq!(s.tokens()[..expected.len()], expected[..]);
    assert_eq!(s.tokens()[expected.len()..], reply.tokens[..]);
    s.append_message("user", "More").unwrap();
    assert!(s.len() > expected.len() + reply.tokens.len());
}

#[test]
fn sessions_on_several_threads_match_a_single_thread() {
    let model = model();
    let o = no_stop_tokens(GenerateOptions { max_tokens: 12, ..Default::default() });
    let prompts = ["alpha", "beta", "gamma", "delta"];
    let solo: Vec<Vec<u32>> =
        prompts.iter().map(|p| run(&mut prompted(&model, p), &o).0.unwrap().tokens).collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (model, o, p) = (model.clone(), o.clone(), p.to_string());
            std::thread::spawn(move || run(&mut prompted(&model, &p), &o).0.unwrap().tokens)
        })
        .collect();
    let threaded: Vec<Vec<u32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(threaded, solo);
}

#[test]
fn bad_generate_options_and_empty_session() {
    let model = model();
    let mut s = model.session(SessionOptions::default()).unwrap();
    let err = run(&mut s, &GenerateOptions::default()).0.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    s.append_text("hi").unwrap();
    let len = s.len();
    for o in [
        GenerateOptions { temperature: -1.0, ..Default::default() },
        GenerateOptions { top_p: 0.0, ..Default::default() },
        GenerateOptions { stop: vec![String::new()], ..Default::default() },
    ] {
        let err = run(&mut s, &o).0.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{o:?}");
    }
    assert_eq!(s.len(), len);
}

#[test]
fn streaming_holds_back_split_characters() {
    // At a high temperature the demo model emits many byte-fallback tokens (ids 3..=258), so
    // multi-byte characters split across tokens occur; the streamed chunks must still add up to
    // exactly the decoded text, and no chunk may contain a replacement character that the full
    // decode does not have at that place.
    let model = model();
    let mut s = prompted(&model, "Emoji please: 😀 🎉 café");
    let o = no_stop_tokens(GenerateOptions {
        max_tokens: 200,
        temperature: 1.5,
        seed: Some(3),
        ..Default::default()
    });
    let (r, chunks) = run(&mut s, &o);
    let r = r.unwrap();
    let byte_tokens = r.tokens.iter().filter(|&&t| (3..=258).contains(&t)).count();
    assert!(byte_tokens >= 10, "only {byte_tokens} byte tokens: pick another seed");
    assert_eq!(chunks.concat(), r.text);
    let tok = model.tokenizer().unwrap();
    let prompt = &s.tokens()[..s.len() - r.tokens.len()];
    let full = tok.decode(s.tokens(), true).unwrap();
    assert_eq!(full.strip_prefix(&tok.decode(prompt, true).unwrap()).unwrap(), r.text);
}

#[test]
fn stream_iterator_yields_the_same_as_generate() {
    let model = model();
    let base = prompted(&model, "Stream it");
    let o = no_stop_tokens(GenerateOptions { max_tokens: 15, ..Default::default() });
    let (generated, chunks) = run(&mut base.fork().unwrap(), &o);
    let generated = generated.unwrap();

    let mut s = base.fork().unwrap();
    let mut stream = s.stream(&o).unwrap();
    let mut texts = Vec::new();
    let mut tokens = Vec::new();
    for chunk in stream.by_ref() {
        let chunk = chunk.unwrap();
        texts.push(chunk.text);
        tokens.extend(chunk.token);
    }
    assert_eq!(stream.finish_reason(), Some(FinishReason::Length));
    let result = stream.into_result().unwrap();
    assert_eq!(texts, chunks);
    assert_eq!(tokens, generated.tokens);
    assert_eq!(result.tokens, generated.tokens);
    assert_eq!(result.text, generated.text);

    // Dropping a stream early keeps the session valid with the tokens sampled so far.
    let mut s = base.fork().unwrap();
    let taken: Vec<_> = s.stream(&o).unwrap().take(4).collect();
    assert_eq!(taken.len(), 4);
    let next = run(&mut s, &GenerateOptions { max_tokens: 11, ..o }).0.unwrap();
    assert_eq!([&generated.tokens[..4], &next.tokens[..]].concat(), generated.tokens);
}

#[test]
fn model_and_session_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Model>();
    send::<Session>();
    send_sync::<phi3_core::CancelToken>();
}

#[test]
fn failed_generate_takes_back_its_assistant_prompt() {
    let model = model();
    let per_word =
        model.tokenizer().unwrap().encode(&"word ".repeat(100), false).unwrap().len() / 100;
    let text = "word ".repeat(3000 / per_word.max(1));
    let mut s = model.session(SessionOptions::default()).unwrap();
    s.append_message("user", &text).unwrap();
    let len = s.len();
    let cancel = s.cancel_token();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        cancel.cancel();
    });
    let err =
        s.generate(&GenerateOptions::default(), |_, _| ControlFlow::Continue(())).unwrap_err();
    canceller.join().unwrap();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    assert_eq!(s.len(), len, "the assistant prompt added by generate is taken back");
    // A later generate adds it again: the prompt equals the template's.
    let r = run(&mut s, &GenerateOptions { max_tokens: 2, ..Default::default() }).0.unwrap();
    let prompt = model.apply_chat_template(&[ChatMessage::new("user", &text)], true).unwrap();
    assert_eq!(s.tokens(), &[prompt, r.tokens].concat()[..]);
}
