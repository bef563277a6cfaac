//! Session save/load: a loaded session continues exactly as the original; bad files are clear
//! errors (truncated, corrupted, newer version, another model).

use std::fs;
use std::ops::ControlFlow;
use std::path::Path;

use phi3_core::{
    demo, Device, ErrorKind, GenerateOptions, LoadOptions, Model, Session, SessionOptions,
};

fn cpu() -> LoadOptions {
    LoadOptions { device: Device::Cpu, ..Default::default() }
}

fn fixture(name: &str) -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
    Model::load(dir, &cpu()).unwrap()
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| 3 + ((i * 7919) % (vocab - 3)) as u32).collect()
}

#[test]
fn loaded_session_continues_bit_for_bit_across_the_longrope_threshold() {
    let model = fixture("gqa-longrope-bf16");
    let toks = tokens(30, model.config().vocab_size);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.phi3");
    for saved_at in [5, 20] {
        let mut original =
            model.session(SessionOptions { max_context: Some(50), ..Default::default() }).unwrap();
        original.append_tokens(&toks[..saved_at]).unwrap();
        original.save(&path).unwrap();
        let mut loaded = Session::load(&model, &path).unwrap();
        assert_eq!(loaded.tokens(), original.tokens());
        assert_eq!(loaded.max_context(), 50);
        assert_eq!(loaded.kv_state(), original.kv_state());
        assert_eq!(loaded.last_logits(), original.last_logits());
        for t in &toks[saved_at..] {
            assert_eq!(
                loaded.append_tokens(&[*t]).unwrap(),
                original.append_tokens(&[*t]).unwrap()
            );
        }
    }
}

#[test]
fn sampling_state_chat_and_pending_tokens_survive() {
    let model = demo::demo_model(&cpu()).unwrap();
    let mut original = model.session(SessionOptions::default()).unwrap();
    original.append_message("user", "Tell me something").unwrap();
    let o = GenerateOptions {
        max_tokens: 6,
        temperature: 1.0,
        seed: Some(7),
        stop_token_ids: Some(vec![]),
        ..Default::default()
    };
    original.generate(&o, |_, _| ControlFlow::Continue(())).unwrap();
    original.append_message("user", "More").unwrap(); // pending: not yet run through the model
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.phi3");
    original.save(&path).unwrap();
    let mut loaded = Session::load(&model, &path).unwrap();

    // No seed now: both continue from the saved random state.
    let o = GenerateOptions { seed: None, ..o };
    let a = original.generate(&o, |_, _| ControlFlow::Continue(())).unwrap();
    let b = loaded.generate(&o, |_, _| ControlFlow::Continue(())).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.text, b.text);
    // The chat history came along: the next message renders the same way.
    original.append_message("user", "Again").unwrap();
    loaded.append_message("user", "Again").unwrap();
    assert_eq!(original.tokens(), loaded.tokens());
}

#[test]
fn bad_session_files_are_clear_errors() {
    let model = fixture("gqa-longrope-bf16");
    let mut s = model.session(SessionOptions::default()).unwrap();
    s.append_tokens(&tokens(20, model.config().vocab_size)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.phi3");
    s.save(&path).unwrap();
    let good = fs::read(&path).unwrap();
    let bad = dir.path().join("bad.phi3");
    let check = |bytes: &[u8], kind: ErrorKind, needle: &str| {
        fs::write(&bad, bytes).unwrap();
        let err = Session::load(&model, &bad).unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(needle), "{err:?} should mention {needle:?}");
    };
    check(&good[..good.len() - 1], ErrorKind::ModelFormat, "truncated or corrupted");
    check(&good[..10], ErrorKind::ModelFormat, "bad.phi3");
    check(b"hello world, this is not a session", ErrorKind::ModelFormat, "not a phi3 session file");
    let mut flipped = good.clone();
    let at = good.len() - 100;
    flipped[at] ^= 0x40;
    check(&flipped, ErrorKind::ModelFormat, "checksum");
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&2u32.to_le_bytes());
    check(&newer, ErrorKind::Unsupported, "version 2");
    let mut huge = good.clone();
    huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    check(&huge, ErrorKind::ModelFormat, "header length");

    let other = fixture("partial-rotary-f16");
    let err = Session::load(&other, &path).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("different model"), "{err}");

    let err = Session::load(&model, dir.path().join("missing.phi3")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);

    // A failed save leaves no file behind and the previous one intact.
    let err = s.save(dir.path().join("no/such/dir/s.phi3")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    s.append_tokens(&[5]).unwrap();
    assert_eq!(fs::read(&path).unwrap(), good);
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
}
