//! Parity of phi3-core's tokenizer, chat template and streaming decoder with HF, on the real
//! Phi-3 tokenizer.
//!
//! Reference ids and text: tests/fixtures/tokenizer/phi3_parity.json, recorded from transformers
//! (`AutoTokenizer`, `apply_chat_template`) by tests/oracle/make_tokenizer_fixtures.py. The
//! tokenizer files live in ../shared/phi3-tokenizer/ beside the repository and are never
//! committed; without them every test here prints a notice and passes.

use std::path::{Path, PathBuf};

use phi3_core::chat::{ChatMessage, ChatTemplate};
use phi3_core::detok::IncrementalDecoder;
use phi3_core::tokenizer::Tokenizer;
use phi3_core::ErrorKind;
use serde_json::Value;

fn tokenizer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/phi3-tokenizer")
}

fn fixture() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer/phi3_parity.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The real tokenizer and the fixture, or `None` (after a notice) when the tokenizer is absent.
fn setup(test: &str) -> Option<(Tokenizer, Value)> {
    let dir = tokenizer_dir();
    if !dir.join("tokenizer.json").is_file() {
        eprintln!("{test}: skipped: no Phi-3 tokenizer at {}", dir.display());
        return None;
    }
    let tok = Tokenizer::from_dir(&dir).expect("load the real Phi-3 tokenizer");
    Some((tok, fixture()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("fixture field {key} is not a string"))
}

/// Every id sequence in the fixture: encode results and the decode-only cases.
fn all_id_sequences(fx: &Value) -> Vec<Vec<u32>> {
    let encoded = fx["cases"].as_array().unwrap().iter().map(|c| ids(&c["ids"]));
    let decoded = fx["decode_cases"].as_array().unwrap().iter().map(|c| ids(&c["ids"]));
    let chats = fx["chat_cases"].as_array().unwrap().iter().map(|c| ids(&c["ids"]));
    encoded.chain(decoded).chain(chats).collect()
}

#[test]
fn tokenizer_metadata_matches_transformers() {
    let Some((tok, fx)) = setup("tokenizer_metadata_matches_transformers") else { return };
    assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.bos_token_id().map(u64::from), fx["bos_token_id"].as_u64());
    assert_eq!(tok.eos_token_id().map(u64::from), fx["eos_token_id"].as_u64());
    assert_eq!((tok.bos_token(), tok.eos_token()), (Some("<s>"), Some("<|endoftext|>")));
    assert!(tok.chat_template().is_some_and(|t| t.contains("<|user|>")));
    assert_eq!(tok.token_to_id("<|end|>"), Some(32007));
    assert_eq!(tok.id_to_token(32010).as_deref(), Some("<|user|>"));
    assert_eq!(tok.id_to_token(243).as_deref(), Some("<0xF0>"));
    let special: Vec<u32> = (0..tok.vocab_size() as u32).filter(|&i| tok.is_special(i)).collect();
    let expected: Vec<u32> = [0, 1].into_iter().chain(32000..=32010).collect();
    assert_eq!(special, expected, "</s> (2) is not special in Phi-3's tokenizer");
}

#[test]
fn encode_matches_transformers() {
    let Some((tok, fx)) = setup("encode_matches_transformers") else { return };
    let mut failures = Vec::new();
    let cases = fx["cases"].as_array().unwrap();
    for c in cases {
        let text = str_of(c, "text");
        let add = c["add_special_tokens"].as_bool().unwrap();
        let got = tok.encode(text, add).unwrap();
        if got != ids(&c["ids"]) {
            failures.push(format!(
                "{text:?} add_special={add}: got {got:?}, want {:?}",
                ids(&c["ids"])
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The fixture also records where the `tokenizers` library, reading tokenizer.json as is,
/// disagrees with transformers; check that record against the Rust `tokenizers` crate, so the
/// difference is known to be exactly the transformers 5 pre-tokenizer rebuild.
#[test]
fn tokenizer_json_as_is_matches_tokenizers_library() {
    let Some((_, fx)) = setup("tokenizer_json_as_is_matches_tokenizers_library") else { return };
    let raw = tokenizers::Tokenizer::from_file(tokenizer_dir().join("tokenizer.json")).unwrap();
    let mut differ = 0;
    for c in fx["cases"].as_array().unwrap() {
        let want = ids(c.get("ids_tokenizers_lib").unwrap_or(&c["ids"]));
        differ += usize::from(c.get("ids_tokenizers_lib").is_some());
        let add = c["add_special_tokens"].as_bool().unwrap();
        let got = raw.encode(str_of(c, "text"), add).unwrap();
        assert_eq!(got.get_ids(), &want[..], "{:?}", c["text"]);
    }
    assert!(differ > 0, "the fixture should record the transformers-vs-tokenizers differences");
}

#[test]
fn decode_matches_transformers() {
    let Some((tok, fx)) = setup("decode_matches_transformers") else { return };
    let cases =
        fx["cases"].as_array().unwrap().iter().chain(fx["decode_cases"].as_array().unwrap());
    for c in cases {
        let ids = ids(&c["ids"]);
        assert_eq!(tok.decode(&ids, false).unwrap(), str_of(c, "decoded"), "{ids:?}");
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            str_of(c, "decoded_skip_special"),
            "{ids:?} skip"
        );
    }
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let Some((tok, _)) = setup("decode_rejects_ids_outside_the_vocabulary") else { return };
    // Phi-3's embedding has 32064 rows but the tokenizer only 32011 ids.
    for bad in [32011u32, 32063, u32::MAX] {
        let e = tok.decode(&[1, 22172, bad], false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TokenOutOfRange);
        assert_eq!(e.message(), format!("tokens[2] = {bad} out of range [0, 32011)"));
    }
    let mut dec = IncrementalDecoder::new(tok.clone(), false);
    let e = dec.push(40000).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TokenOutOfRange);
}

#[test]
fn chat_template_matches_apply_chat_template() {
    let Some((tok, fx)) = setup("chat_template_matches_apply_chat_template") else { return };
    let template = ChatTemplate::from_tokenizer(&tok).unwrap();
    let bos = tok.bos_token().unwrap();
    let eos = tok.eos_token().unwrap();
    for c in fx["chat_cases"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(str_of(m, "role"), str_of(m, "content")))
            .collect();
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(&messages, agp, bos, eos).unwrap();
        assert_eq!(text, str_of(c, "text"), "{}", c["name"]);
        assert_eq!(tok.encode(&text, false).unwrap(), ids(&c["ids"]), "{}", c["name"]);
    }
}

#[test]
fn builtin_default_format_on_the_real_tokenizer() {
    let Some((tok, _)) = setup("builtin_default_format_on_the_real_tokenizer") else { return };
    let messages = [
        ChatMessage::new("system", "You are a pirate."),
        ChatMessage::new("user", "Hi there"),
        ChatMessage::new("assistant", "Arr!"),
        ChatMessage::new("user", "Bye"),
    ];
    let text =
        ChatTemplate::phi3_default().render(&messages, true, "<s>", "<|endoftext|>").unwrap();
    assert_eq!(
        text,
        "<s><|system|>\nYou are a pirate.<|end|>\n<|user|>\nHi there<|end|>\n\
         <|assistant|>\nArr!<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\n"
    );
    let ids = tok.encode(&text, false).unwrap();
    let skeleton: Vec<u32> = ids.iter().copied().filter(|&i| tok.is_special(i)).collect();
    assert_eq!(skeleton, [1, 32006, 32007, 32010, 32007, 32001, 32007, 32010, 32007, 32001]);
    // The special tokens' rstrip swallows the newline after each of them.
    assert_eq!(tok.decode(&ids, false).unwrap(), text.replace("|>\n", "|>"));
}

/// Push `ids` one at a time after `prefix`, flush, and compare with a full decode.
fn stream(tok: &Tokenizer, prefix: &[u32], ids: &[u32], skip: bool) -> Result<(), String> {
    let mut dec = IncrementalDecoder::with_prefix(tok.clone(), skip, prefix);
    let mut chunks: Vec<String> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    chunks.push(dec.flush());
    let all: Vec<u32> = prefix.iter().chain(ids).copied().collect();
    let full = tok.decode(&all, skip).unwrap();
    let before = tok.decode(prefix, skip).unwrap();
    let want = full.strip_prefix(before.as_str()).ok_or("prefix text is not a prefix")?;
    if chunks.concat() != want {
        return Err(format!("chunks {chunks:?} != {want:?}"));
    }
    if !want.contains('\u{FFFD}') && chunks.iter().any(|c| c.contains('\u{FFFD}')) {
        return Err(format!("U+FFFD in chunks {chunks:?} but not in {want:?}"));
    }
    Ok(())
}

#[test]
fn streaming_decoder_matches_full_decode() {
    let Some((tok, fx)) = setup("streaming_decoder_matches_full_decode") else { return };
    let mut checked = 0;
    for ids in all_id_sequences(&fx) {
        for skip in [false, true] {
            stream(&tok, &[], &ids, skip).unwrap_or_else(|e| panic!("{ids:?} skip={skip}: {e}"));
            // Every split into prefix + generated whose prefix text is a prefix of the whole
            // text and does not end inside a byte-fallback run.
            for k in 1..ids.len() {
                let (prefix, rest) = ids.split_at(k);
                let last = prefix[k - 1];
                let skipped = skip && tok.is_special(last);
                if skipped || tok.id_to_token(last).is_some_and(|t| t.starts_with("<0x")) {
                    continue;
                }
                let full = tok.decode(&ids, skip).unwrap();
                if !full.starts_with(&tok.decode(prefix, skip).unwrap()) {
                    continue;
                }
                stream(&tok, prefix, rest, skip)
                    .unwrap_or_else(|e| panic!("{prefix:?} + {rest:?} skip={skip}: {e}"));
                checked += 1;
            }
        }
    }
    assert!(checked > 1000, "only {checked} prefix splits checked");
}

#[test]
fn streaming_a_reply_after_a_chat_prompt() {
    let Some((tok, _)) = setup("streaming_a_reply_after_a_chat_prompt") else { return };
    let template = ChatTemplate::from_tokenizer(&tok).unwrap();
    let prompt = template
        .render(&[ChatMessage::new("user", "Write a haiku")], true, "<s>", "<|endoftext|>")
        .unwrap();
    let prompt_ids = tok.encode(&prompt, false).unwrap();
    let reply = " Cherry blossoms fall 🌸\n  静かな池 — café naïve 𠀀<|end|>";
    let reply_ids = tok.encode(reply, false).unwrap();
    for skip in [false, true] {
        stream(&tok, &prompt_ids, &reply_ids, skip).unwrap();
    }
    let mut dec = IncrementalDecoder::with_prefix(tok.clone(), true, &prompt_ids);
    let mut chunks: Vec<String> = reply_ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    chunks.push(dec.flush());
    // In context the reply keeps the space of its first token "▁Cherry", which a decode of the
    // reply alone (HF's TextStreamer with skip_prompt) strips.
    assert_eq!(chunks.concat(), format!(" {}", tok.decode(&reply_ids, true).unwrap()));
    // The emoji and the rare ideograph arrive whole, never as U+FFFD.
    assert!(chunks.iter().any(|c| c.contains('🌸')));
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')));
}
