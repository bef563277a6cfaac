//! Arbitrary bytes as a session file -> `Session::load` on the demo model.
//!
//! A session file may come from anywhere, so this is the most exposed parser. Under
//! `cfg(fuzzing)` the loader skips only its SHA-256 comparison (see session_file.rs), so
//! mutated inputs reach the checks behind it; and every 64-character run of `F` in the input is
//! replaced by the demo model's fingerprint (seeds carry that marker, see
//! `phi3_fuzz::FINGERPRINT_MARKER`), so the seeds stay valid when the demo model changes.
//!
//! Must never panic, abort or allocate more than the file's size suggests; errors are fine.
//! A session that loads must be usable: its sizes are within the model's limits, it saves and
//! loads back to the same state, and (when few tokens are pending) it computes logits and
//! accepts one more token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi3_core::{ErrorKind, Session};
use phi3_fuzz::{demo_model, scratch_dir, FINGERPRINT_MARKER};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fuzz_target!(|data: &[u8]| {
    let model = demo_model();
    let mut data = data.to_vec();
    let fingerprint = hex(&model.fingerprint());
    let mut i = 0;
    while i + 64 <= data.len() {
        if &data[i..i + 64] == FINGERPRINT_MARKER {
            data[i..i + 64].copy_from_slice(fingerprint.as_bytes());
            i += 64;
        } else {
            i += 1;
        }
    }
    let path = scratch_dir().join("session.phi3");
    std::fs::write(&path, &data).unwrap();
    let mut session = match Session::load(model, &path) {
        Ok(s) => s,
        Err(e) => {
            assert_ne!(e.kind(), ErrorKind::Internal, "{e}");
            return;
        }
    };
    let (cached, _) = session.kv_state();
    assert!(cached <= session.len());
    assert!(session.len() <= session.max_context());
    assert!(session.max_context() <= model.max_context());
    assert!(session.tokens().iter().all(|&t| (t as usize) < model.config().vocab_size));
    if session.last_logits().is_some() {
        assert_eq!(cached, session.len(), "logits loaded for a session with pending tokens");
    }

    // Save and load back: the same state.
    let copy = scratch_dir().join("session-copy.phi3");
    session.save(&copy).expect("saving a loaded session");
    let again = Session::load(model, &copy).expect("loading a session saved from a loaded one");
    assert_eq!(again.tokens(), session.tokens());
    assert_eq!(again.kv_state(), session.kv_state());
    assert_eq!(again.max_context(), session.max_context());
    // Bitwise: a file may hold NaN logits.
    let bits =
        |s: &Session| s.last_logits().map(|l| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    assert_eq!(bits(&again), bits(&session));

    // Use it, when that is cheap (a LongRoPE regime change reruns the whole history).
    if session.len() <= 64 && !session.is_empty() {
        let logits = session.logits().expect("logits of a loaded session").len();
        assert_eq!(logits, model.config().vocab_size);
        if session.len() < session.max_context() {
            session.append_tokens(&[1]).expect("appending a token to a loaded session");
        }
    }
});
