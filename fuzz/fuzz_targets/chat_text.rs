//! Text and chat input on the demo model: tokenizer, incremental decoder, chat templates and a
//! session's `append_text` / `append_message`.
//!
//! Input (bytes that are not UTF-8 are replaced): NUL-separated fields. The first field is plain
//! text; each further field is a chat message, `role\x01content`, or just content, whose role is
//! then user, assistant or system by the field's length. Checks, besides never panicking:
//! - `encode` never fails, gives ids the tokenizer knows, and `decode` of them never fails;
//! - text without the cases the pipeline changes on purpose (see `roundtrips`) decodes back to
//!   itself;
//! - the incremental decoder's chunks, concatenated with its flush, equal `decode` of the same
//!   ids (its documented invariant), for the encoded ids and for arbitrary ids made of the
//!   input's bytes (byte-fallback runs with invalid UTF-8 included);
//! - message content is data: every content appears verbatim in the prompt rendered by the demo
//!   model's template and by the built-in Phi-3 template (`{{ 7*7 }}` stays `{{ 7*7 }}`);
//! - a session accepts the text and the messages or fails with a documented error kind (never
//!   `ContextFull` for a text whose tokens fit), and then holds only ids of the vocabulary,
//!   within its max context.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use phi3_core::detok::IncrementalDecoder;
use phi3_core::{ChatMessage, ChatTemplate, ErrorKind, SessionOptions, Tokenizer};
use phi3_fuzz::demo_model;

/// Whether `decode(encode(text))` must give `text` back with the demo tokenizer (transformers 5's
/// Llama pipeline: no normalizer, Metaspace prepending `▁` to the first piece only). Excluded:
/// `▁` itself (decodes to a space), a leading space (the Metaspace scheme does not double it and
/// the decoder strips one), the special tokens' text (rstrip tokens swallow the whitespace after
/// them), and `<unk>`/`<s>`/`</s>`-like text for the same reason.
fn roundtrips(text: &str) -> bool {
    !text.is_empty() && !text.contains('▁') && !text.starts_with(' ') && !text.contains('<')
}

fn check_stream(tok: &Tokenizer, ids: &[u32], skip_special: bool) {
    let full = tok.decode(ids, skip_special).expect("decode of known ids");
    let mut dec = IncrementalDecoder::new(tok.clone(), skip_special);
    let mut streamed = String::new();
    for &id in ids {
        streamed.push_str(&dec.push(id).expect("push of a known id"));
    }
    streamed.push_str(&dec.flush());
    assert_eq!(streamed, full, "incremental decode of {ids:?} (skip_special={skip_special})");
}

fuzz_target!(|data: &[u8]| {
    let model = demo_model();
    let tok = model.tokenizer().unwrap();
    let input = String::from_utf8_lossy(data);
    let mut fields = input.split('\0');
    let text = fields.next().unwrap_or_default();
    let messages: Vec<ChatMessage> = fields
        .map(|f| match f.split_once('\u{1}') {
            Some((role, content)) => ChatMessage::new(role, content),
            None => ChatMessage::new(["user", "assistant", "system"][f.len() % 3], f),
        })
        .collect();

    // Tokenizer.
    for add_special in [false, true] {
        let ids = tok.encode(text, add_special).expect("encode never fails");
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()), "{ids:?}");
        let decoded = tok.decode(&ids, false).expect("decode of encoded ids");
        if !add_special && roundtrips(text) {
            assert_eq!(decoded, text, "decode(encode(text)) of {text:?}: {ids:?}");
        }
        let head = &ids[..ids.len().min(64)];
        check_stream(tok, head, false);
        check_stream(tok, head, true);
    }
    let vocab = tok.vocab_size() as u32;
    // At most 64: every push decodes a window, so long runs only cost time.
    let raw_ids: Vec<u32> = data.iter().take(64).map(|&b| u32::from(b) % vocab).collect();
    check_stream(tok, &raw_ids, false);

    // Chat templates: content is never evaluated.
    static BUILT_IN: OnceLock<ChatTemplate> = OnceLock::new();
    let built_in = BUILT_IN.get_or_init(ChatTemplate::phi3_default);
    for template in [model.chat_template(), built_in] {
        match template.render(&messages, true, "<s>", "</s>") {
            Ok(prompt) => {
                for m in &messages {
                    assert!(
                        prompt.contains(&m.content),
                        "content {:?} missing from the prompt {prompt:?}",
                        m.content
                    );
                }
            }
            // The built-in template rejects unknown roles.
            Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}"),
        }
    }
    let _ = model.apply_chat_template(&messages, true);

    // A session.
    let mut session =
        model.session(SessionOptions { max_context: Some(256), ..Default::default() }).unwrap();
    let documented = |kind| {
        matches!(kind, ErrorKind::ContextFull | ErrorKind::InvalidArgument | ErrorKind::Unsupported)
    };
    let fits = tok.encode(text, true).unwrap().len() <= session.max_context();
    if let Err(e) = session.append_text(text) {
        assert!(documented(e.kind()), "append_text: {e}");
        assert!(session.is_empty(), "a failed append_text left tokens");
        // The length check that runs before tokenizing must never reject a text that fits.
        assert!(!(fits && e.kind() == ErrorKind::ContextFull), "{text:?} fits, yet: {e}");
    }
    // Each append renders the whole conversation: a few messages are enough.
    for m in messages.iter().take(8) {
        let before = session.tokens().to_vec();
        if let Err(e) = session.append_message(&m.role, &m.content) {
            assert!(documented(e.kind()), "append_message: {e}");
            assert_eq!(session.tokens(), &before[..], "a failed append_message changed the tokens");
        }
    }
    assert!(session.len() <= session.max_context());
    assert!(session.tokens().iter().all(|&t| (t as usize) < model.config().vocab_size));
});
