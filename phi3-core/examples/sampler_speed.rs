//! Time `sampler::sample` over a Phi-3-sized vocabulary for the usual option sets: the host
//! work between two decode steps, which a fast GPU step waits for (docs/PERF.md). For the
//! option sets whose token the largest logits decide (`candidate_count`), also the host's part
//! from the candidates alone (`sample_candidates`: what is left when the device selects them)
//! and with the selection on the host too (`top_candidates`: the CPU backend's path).
//!
//! `cargo run --release -p phi3-core --example sampler_speed`

use std::time::Instant;

use phi3_core::sampler::{
    candidate_count, sample, sample_candidates, top_candidates, Rng, SamplerOptions,
};

/// Phi-3's vocabulary (32,064 logits, the last 53 padding rows beyond the limit).
const VOCAB: usize = 32064;
const LIMIT: usize = 32011;
const CALLS: usize = 300;

/// Best of 3 × CALLS calls of `f`, in µs per call.
fn time(mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..CALLS {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / CALLS as f64);
    }
    best * 1e6
}

fn main() {
    let mut rng = Rng::seeded(1);
    // Logits spread over [-10, 10), and a 1,000-token history for the penalties.
    let logits: Vec<f32> = (0..VOCAB).map(|_| rng.next_f64() as f32 * 20.0 - 10.0).collect();
    let history: Vec<u32> = (0..1000).map(|i| (i * 31 % LIMIT) as u32).collect();
    let generated = &history[..100];
    let base = SamplerOptions::default();
    let t07 = SamplerOptions { temperature: 0.7, ..base.clone() };
    let cases = [
        ("greedy", base.clone()),
        ("greedy, repetition 1.1", SamplerOptions { repetition_penalty: 1.1, ..base.clone() }),
        ("temperature 0.7", t07.clone()),
        ("temperature 0.7, top-p 0.9", SamplerOptions { top_p: 0.9, ..t07.clone() }),
        (
            "temperature 0.7, top-k 50, top-p 0.9",
            SamplerOptions { top_k: 50, top_p: 0.9, ..t07.clone() },
        ),
        (
            "temperature 0.7, top-k 50, repetition 1.1",
            SamplerOptions { top_k: 50, repetition_penalty: 1.1, ..t07.clone() },
        ),
        (
            "temperature 0.7, top-p 0.9, repetition 1.1",
            SamplerOptions { top_p: 0.9, repetition_penalty: 1.1, ..t07 },
        ),
    ];
    println!(
        "{:<45} {:>12} {:>16} {:>16}",
        "options", "all logits", "from candidates", "host selects"
    );
    println!("{:<45} {:>12} {:>16} {:>16}", "", "us/token", "us/token", "us/token");
    for (name, opts) in cases {
        let all = time(|| {
            let token = sample(&logits, &history, generated, &opts, LIMIT, &mut rng);
            std::hint::black_box(token.ok());
        });
        let Some(count) = candidate_count(&opts, VOCAB) else {
            println!("{name:<45} {all:>12.1} {:>16} {:>16}", "-", "-");
            continue;
        };
        let candidates = top_candidates(&logits, LIMIT, count);
        let from = |c: &[(u32, f32)], rng: &mut Rng| {
            let token = sample_candidates(c, count, &history, generated, &opts, LIMIT, rng);
            std::hint::black_box(token.ok());
        };
        let alone = time(|| from(&candidates, &mut rng));
        let with_selection = time(|| from(&top_candidates(&logits, LIMIT, count), &mut rng));
        println!("{name:<45} {all:>12.1} {alone:>16.1} {with_selection:>16.1}");
    }
}
