//! Continuous batching and the paged KV cache on the CPU backend: sessions that run at the same
//! time share forward passes and KV memory, and each gets exactly (bit for bit) what it would
//! get alone.

use std::ops::ControlFlow;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use phi3_core::{
    demo, Device, ErrorKind, GenerateOptions, LoadOptions, Model, Session, SessionOptions,
};

fn cpu() -> LoadOptions {
    LoadOptions { device: Device::Cpu, ..Default::default() }
}

/// `len` token ids drawn from `seed`, all of them ordinary (emittable, not special) tokens.
fn prompt(model: &Model, seed: u64, len: usize) -> Vec<u32> {
    let vocab = model.emittable_vocab() as u64 - 20;
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (3 + (x >> 33) % vocab) as u32
        })
        .collect()
}

/// Generate exactly `n` tokens: greedy, or sampled with `seed`.
fn options(n: usize, seed: Option<u64>) -> GenerateOptions {
    GenerateOptions {
        max_tokens: n,
        stop_token_ids: Some(Vec::new()),
        temperature: if seed.is_some() { 0.8 } else { 0.0 },
        top_p: 0.95,
        seed,
        ..Default::default()
    }
}

/// What a session produced: its generated tokens and the logits after its last token.
type Outcome = (Vec<u32>, Vec<f32>);

fn run(session: &mut Session, prompt: &[u32], opts: &GenerateOptions) -> Outcome {
    session.append_tokens(prompt).unwrap();
    let result = session.generate(opts, |_, _| ControlFlow::Continue(())).unwrap();
    (result.tokens, session.logits().unwrap().to_vec())
}

/// Each case alone, one after the other, each on a fresh session.
fn solo(model: &Model, cases: &[(Vec<u32>, GenerateOptions)]) -> Vec<Outcome> {
    cases
        .iter()
        .map(|(p, o)| run(&mut model.session(SessionOptions::default()).unwrap(), p, o))
        .collect()
}

/// All cases at once, one thread each, released together.
fn together(model: &Model, cases: &[(Vec<u32>, GenerateOptions)]) -> Vec<Outcome> {
    let start = Arc::new(Barrier::new(cases.len()));
    thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(p, o)| {
                let start = start.clone();
                s.spawn(move || {
                    let mut session = model.session(SessionOptions::default()).unwrap();
                    start.wait();
                    run(&mut session, p, o)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_same(solo: &[Outcome], batched: &[Outcome]) {
    for (i, (a, b)) in solo.iter().zip(batched).enumerate() {
        assert_eq!(a.0, b.0, "case {i}: tokens differ from the solo run");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&a.1) == bits(&b.1), "case {i}: logits differ from the solo run");
    }
}

#[test]
fn sessions_generating_at_once_get_their_solo_results() {
    let model = demo::demo_model(&cpu()).unwrap();
    // Prompt lengths: a decode-sized prompt, ones that cross the demo's LongRoPE threshold of
    // 64 tokens while generating (the history is then recomputed), and longer ones.
    let cases: Vec<_> =
        [(3, None), (17, Some(7)), (50, None), (60, Some(9)), (90, None), (130, Some(11))]
            .iter()
            .enumerate()
            .map(|(i, &(len, seed))| (prompt(&model, i as u64, len), options(24, seed)))
            .collect();
    let alone = solo(&model, &cases);
    let before = model.scheduler_stats();
    let batched = together(&model, &cases);
    assert_same(&alone, &batched);
    let stats = model.scheduler_stats();
    assert!(stats.max_batch >= 2, "no pass batched two sessions: {stats:?}");
    assert!(
        stats.sequences - before.sequences > stats.steps - before.steps,
        "passes were not shared: {before:?} -> {stats:?}"
    );
    assert_eq!(model.kv_usage().blocks_in_use, 0, "dropped sessions gave their blocks back");
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_between_other_sessions_decode_steps() {
    let model = demo::demo_model(&cpu()).unwrap();
    let long = phi3_core::PREFILL_CHUNK * 3 + 100;
    let cases = vec![
        (prompt(&model, 1, long), options(8, None)),
        (prompt(&model, 2, 10), options(120, None)),
        (prompt(&model, 3, 20), options(120, Some(3))),
    ];
    let alone = solo(&model, &cases);
    let batched = together(&model, &cases);
    assert_same(&alone, &batched);
    let stats = model.scheduler_stats();
    assert!(stats.mixed_steps >= 1, "no pass mixed a prefill chunk with decode steps: {stats:?}");
}

#[test]
fn forks_share_the_prompt_blocks_until_they_write() {
    let model = demo::demo_model(&cpu()).unwrap();
    let block = model.kv_usage().block_tokens;
    let p = prompt(&model, 5, 100);
    let mut parent = model.session(SessionOptions::default()).unwrap();
    parent.append_tokens(&p).unwrap();
    let prompt_blocks = 100usize.div_ceil(block);
    assert_eq!(model.kv_usage().blocks_in_use, prompt_blocks);
    let mut forks: Vec<Session> = (0..4).map(|_| parent.fork().unwrap()).collect();
    assert_eq!(model.kv_usage().blocks_in_use, prompt_blocks, "a fork copied blocks");

    // Each fork writes position 100, inside the last (shared, partly filled) block: it copies
    // that one block and nothing else.
    let want = solo(&model, &[(p.clone(), options(1, Some(42)))]);
    for (i, fork) in forks.iter_mut().enumerate() {
        let result =
            fork.generate(&options(1, Some(42)), |_, _| ControlFlow::Continue(())).unwrap();
        assert_eq!(result.tokens, want[0].0);
        assert_eq!(fork.logits().unwrap(), &want[0].1[..]);
        assert_eq!(model.kv_usage().blocks_in_use, prompt_blocks + i + 1);
    }
    // The parent's cache is untouched by its forks' writes.
    let mut again = model.session(SessionOptions::default()).unwrap();
    again.append_tokens(&p).unwrap();
    parent.truncate(99).unwrap();
    again.truncate(99).unwrap();
    assert_eq!(parent.logits().unwrap(), again.logits().unwrap());
    drop((forks, parent, again));
    assert_eq!(model.kv_usage().blocks_in_use, 0);
}

/// The demo model with a KV budget of `blocks` blocks.
fn budget_model(blocks: u64, wait: bool) -> Model {
    let block_bytes = demo::demo_model(&cpu()).unwrap().kv_usage().block_bytes;
    let options = LoadOptions { kv_memory: Some(blocks * block_bytes), kv_wait: wait, ..cpu() };
    demo::demo_model(&options).unwrap()
}

#[test]
fn an_exhausted_kv_budget_fails_the_pass_and_leaves_the_session_as_it_was() {
    // (Lengths stay below the demo's LongRoPE threshold of 64, past which a session recomputes
    // its whole history.)
    let model = budget_model(3, false);
    assert_eq!(model.kv_usage().max_blocks, Some(3));
    let mut a = model.session(SessionOptions::default()).unwrap();
    a.append_tokens(&prompt(&model, 1, 40)).unwrap(); // 3 blocks
    let mut b = model.session(SessionOptions::default()).unwrap();
    let e = b.append_tokens(&prompt(&model, 2, 5)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfMemory);
    assert!(e.to_string().contains("KV memory exhausted"), "{e}");
    assert!(b.is_empty());
    // `a` may fill its last block but not grow past it; a failed pass keeps its cache.
    a.append_tokens(&prompt(&model, 3, 8)).unwrap();
    let logits = a.logits().unwrap().to_vec();
    let e = a.append_tokens(&prompt(&model, 3, 1)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfMemory);
    assert_eq!((a.len(), a.kv_state()), (48, (48, false)));
    assert_eq!(a.logits().unwrap(), &logits[..]);
    // Freed blocks serve the next pass.
    a.truncate(10).unwrap();
    b.append_tokens(&prompt(&model, 2, 5)).unwrap();
    assert_eq!(model.kv_usage().blocks_in_use, 2);
    // A budget below one block is refused at load.
    let tiny = LoadOptions { kv_memory: Some(1), ..cpu() };
    assert_eq!(demo::demo_model(&tiny).unwrap_err().kind(), ErrorKind::InvalidArgument);
}

#[test]
fn with_kv_wait_a_pass_waits_for_blocks_and_can_be_cancelled() {
    let model = budget_model(4, true);
    let mut a = model.session(SessionOptions::default()).unwrap();
    a.append_tokens(&prompt(&model, 1, 64)).unwrap();
    // Larger than the whole budget: fails at once, waiting could never help.
    let mut big = model.session(SessionOptions::default()).unwrap();
    let e = big.append_tokens(&prompt(&model, 9, 65)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfMemory);

    let mut b = model.session(SessionOptions::default()).unwrap();
    let p = prompt(&model, 2, 5);
    let waiter = thread::spawn(move || {
        let logits = b.append_tokens(&p).map(|l| l.len());
        (logits, b)
    });
    thread::sleep(Duration::from_millis(200));
    assert!(!waiter.is_finished(), "the pass did not wait for KV memory");
    drop(a);
    let (logits, b) = waiter.join().unwrap();
    assert_eq!(logits.unwrap(), model.config().vocab_size);
    assert_eq!(b.len(), 5);
    drop(b);

    // A waiting pass is cancelled by its session's cancel token and leaves it unchanged.
    let mut c = model.session(SessionOptions::default()).unwrap();
    c.append_tokens(&prompt(&model, 3, 60)).unwrap(); // the whole budget
    let mut d = model.session(SessionOptions::default()).unwrap();
    let cancel = d.cancel_token();
    let p = prompt(&model, 4, 30);
    let waiter = thread::spawn(move || {
        let e = d.append_tokens(&p).unwrap_err();
        (e, d)
    });
    thread::sleep(Duration::from_millis(100));
    cancel.cancel();
    let (e, d) = waiter.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert!(d.is_empty());
    drop(c);
    assert_eq!(model.kv_usage().blocks_in_use, 0);
}

#[test]
fn the_prefill_chunk_sets_the_passes_of_a_prompt_and_not_its_results() {
    let default = demo::demo_model(&cpu()).unwrap();
    assert_eq!(default.prefill_chunk(), phi3_core::PREFILL_CHUNK);
    let small = demo::demo_model(&LoadOptions { prefill_chunk: Some(37), ..cpu() }).unwrap();
    assert_eq!(small.prefill_chunk(), 37);
    let p = prompt(&default, 9, 200);
    let case = [(p.clone(), options(5, Some(7)))];
    let before = small.scheduler_stats();
    let chunked = solo(&small, &case);
    // 200 prompt tokens in passes of at most 37 (6 passes), then one pass per generated token.
    assert_eq!(small.scheduler_stats().steps - before.steps, 200usize.div_ceil(37) as u64 + 5);
    // Bit for bit: the CPU computes each prefill row on its own, and every chunk here (37 and
    // 15 rows) is longer than GEMV_SPAN, so no row changes path. (A chunk of up to 4 rows would
    // run as decode rows and differ in the last bits; on CUDA, cuBLAS picks its algorithm by the
    // chunk's rows.)
    assert_same(&solo(&default, &case), &chunked);
    for bad in [0, phi3_core::MAX_PREFILL_CHUNK + 1] {
        let e = demo::demo_model(&LoadOptions { prefill_chunk: Some(bad), ..cpu() }).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        assert!(e.to_string().contains("prefill_chunk"), "{e}");
    }
}
