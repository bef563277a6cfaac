//! Time `sampler::sample` over a Phi-3-sized vocabulary for the usual option sets: the host
//! work between two decode steps, which a fast GPU step waits for (docs/PERF.md). Then a top-k
//! step's draw from its candidates alone (`sample_candidates`: the host's part when the device
//! selects them) and with the selection on the host too (`top_candidates`: the CPU backend's).
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

fn main() {
    let mut rng = Rng::seeded(1);
    // Logits spread over [-10, 10), and a 1,000-token history for the penalties.
    let logits: Vec<f32> = (0..VOCAB).map(|_| rng.next_f64() as f32 * 20.0 - 10.0).collect();
    let history: Vec<u32> = (0..1000).map(|i| (i * 31 % LIMIT) as u32).collect();
    let base = SamplerOptions::default();
    let cases = [
        ("greedy", base.clone()),
        ("temperature 0.7", SamplerOptions { temperature: 0.7, ..base.clone() }),
        (
            "temperature 0.7, top-p 0.9",
            SamplerOptions { temperature: 0.7, top_p: 0.9, ..base.clone() },
        ),
        (
            "temperature 0.7, top-k 50, top-p 0.9",
            SamplerOptions { temperature: 0.7, top_k: 50, top_p: 0.9, ..base.clone() },
        ),
        (
            "temperature 0.7, top-p 0.9, repetition 1.1",
            SamplerOptions { temperature: 0.7, top_p: 0.9, repetition_penalty: 1.1, ..base },
        ),
    ];
    println!("{:<45} {:>12}", "options", "us per token");
    for (name, opts) in cases {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..CALLS {
                let token = sample(&logits, &history, &history[..100], &opts, LIMIT, &mut rng);
                std::hint::black_box(token.ok());
            }
            best = best.min(t.elapsed().as_secs_f64() / CALLS as f64);
        }
        println!("{name:<45} {:>12.1}", best * 1e6);
    }
    let opts =
        SamplerOptions { temperature: 0.7, top_k: 50, top_p: 0.9, ..SamplerOptions::default() };
    let count = candidate_count(&opts, VOCAB).expect("top-k options take candidates");
    let candidates = top_candidates(&logits, LIMIT, count);
    let from_candidates =
        |rng: &mut Rng| sample_candidates(&candidates, count, &opts, LIMIT, rng).ok().flatten();
    let with_selection = |rng: &mut Rng| {
        let c = top_candidates(&logits, LIMIT, count);
        sample_candidates(&c, count, &opts, LIMIT, rng).ok().flatten()
    };
    type Draw<'a> = &'a dyn Fn(&mut Rng) -> Option<u32>;
    let candidate_cases: [(&str, Draw); 2] = [
        ("same, from its 114 candidates", &from_candidates),
        ("same, selecting them on the host first", &with_selection),
    ];
    for (name, draw) in candidate_cases {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..CALLS {
                std::hint::black_box(draw(&mut rng));
            }
            best = best.min(t.elapsed().as_secs_f64() / CALLS as f64);
        }
        println!("{name:<45} {:>12.1}", best * 1e6);
    }
}
