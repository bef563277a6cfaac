//! `phi3 gpu-check`: the CUDA backend against the CPU backend and the HF fixtures, then a short
//! benchmark at Phi-3-medium-128k shapes with dummy weights. Run on a GPU machine by
//! `scripts/gpu-check`; prints a table last, writes details to `<out>/gpu-check.txt`, and exits
//! non-zero when any check fails. Without a CUDA driver or device it fails with that error.
//!
//! Tolerances (relative L2, ||out - ref|| / ||ref||):
//! - ops computed in f32 on both sides (embed, rms_norm, swiglu, gather, GEMV for one token, f32
//!   GEMM, rotated q): 1e-4; they differ only in summation order.
//! - ops that round to bf16 on the device (GEMM inputs for bf16/f16 weights, keys and values in
//!   the bf16 KV cache and so attention): 1e-2. bf16 keeps 8 significant bits: round-to-nearest
//!   error is at most 2^-9 = 2e-3 relative and ~1.1e-3 RMS, and a dot product of independently
//!   rounded terms keeps that relative RMS error; 1e-2 leaves ~5x headroom.
//! - full model logits (vs HF and vs the CPU backend): 3e-2 per logits row. The 2-layer fixtures
//!   chain ~10 such roundings (qkv, k/v store, o, gate_up, down per layer, lm_head) whose errors
//!   add roughly in quadrature: sqrt(10) x 2e-3 ≈ 6e-3 expected, with 5x headroom. A real bug (wrong
//!   rope regime, mask or GQA mapping) shows up as 1e-1 or more (see kv_cache.rs).
//!
//! Greedy continuations must equal HF's exactly.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use phi3_core::backend::cpu::{CpuAct, CpuBackend};
use phi3_core::backend::cuda::CudaBackend;
use phi3_core::backend::{AttnParams, Backend, KvLayout, SeqSpan};
use phi3_core::loader::{DType, HostTensor};
use phi3_core::rope::{Rope, RopeBatch, RopeRegime};
use phi3_core::{sampler, Device, DummyWeights, LoadOptions, Model, SessionOptions};

use crate::cli::GpuCheckArgs;

const TOL_F32: f64 = 1e-4;
const TOL_BF16: f64 = 1e-2;
const TOL_MODEL: f64 = 3e-2;

/// One row of the final table.
struct Row {
    check: String,
    value: String,
    limit: String,
    ok: bool,
}

struct Report {
    rows: Vec<Row>,
    details: String,
}

impl Report {
    fn err(&mut self, check: &str, err: f64, tol: f64) {
        let ok = err.is_finite() && err <= tol;
        let _ =
            writeln!(self.details, "{check}: rel L2 {err:.3e} (limit {tol:.0e}) {}", ok_str(ok));
        self.rows.push(Row {
            check: check.into(),
            value: format!("{err:.2e}"),
            limit: format!("{tol:.0e}"),
            ok,
        });
    }

    fn flag(&mut self, check: &str, value: String, ok: bool) {
        let _ = writeln!(self.details, "{check}: {value} {}", ok_str(ok));
        self.rows.push(Row { check: check.into(), value, limit: "-".into(), ok });
    }
}

fn ok_str(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "FAIL"
    }
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// SplitMix64 random numbers for inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A host tensor of `dtype` holding `values` (rounded to the dtype).
fn tensor(name: &str, dtype: DType, shape: Vec<usize>, values: &[f32]) -> Result<HostTensor> {
    let mut bytes = Vec::with_capacity(values.len() * dtype.size());
    for &x in values {
        match dtype {
            DType::F32 => bytes.extend_from_slice(&x.to_le_bytes()),
            DType::F16 => bytes.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
            DType::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
        }
    }
    Ok(HostTensor::from_bytes(name, dtype, shape, bytes)?)
}

fn cpu_act(rows: usize, cols: usize, data: Vec<f32>) -> CpuAct {
    CpuAct { rows, cols, data }
}

pub fn run(args: &GpuCheckArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let gpu =
        CudaBackend::new(args.ordinal).map_err(|e| anyhow!("no usable CUDA driver/device: {e}"))?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut r = Report { rows: Vec::new(), details: String::new() };
    let _ = writeln!(
        r.details,
        "device: {}\nseed: {seed}\nkernels: {}",
        gpu.name(),
        gpu.stats().kernels
    );
    gpu.set_poison(true);
    op_checks(&gpu, &mut Rng(seed), &mut r).context("op checks")?;
    gpu.set_poison(false);
    drop(gpu);

    for name in ["gqa-longrope-bf16", "mha-f32-tied", "partial-rotary-f16", "sliding-window-f32"] {
        if let Err(e) = model_check(&args.fixtures.join(name), name, args.ordinal, &mut r) {
            r.flag(&format!("{name}: load/run"), format!("{e:#}"), false);
        }
    }
    if !args.skip_bench {
        if let Err(e) = bench(&args.fixtures, args.ordinal, &mut r) {
            r.flag("bench phi3-medium dummy", format!("{e:#}"), false);
        }
    }

    let _ = writeln!(r.details, "total {:.1} s", started.elapsed().as_secs_f64());
    std::fs::create_dir_all(&args.out)?;
    let details_path = args.out.join("gpu-check.txt");
    std::fs::write(&details_path, &r.details)?;
    let w = r.rows.iter().map(|x| x.check.len()).max().unwrap_or(5).max(5);
    let v = r.rows.iter().map(|x| x.value.len()).max().unwrap_or(5).max(5);
    println!("{:<w$}  {:<v$}  {:<6}  result", "check", "value", "limit");
    for row in &r.rows {
        println!("{:<w$}  {:<v$}  {:<6}  {}", row.check, row.value, row.limit, ok_str(row.ok));
    }
    let failed = r.rows.iter().filter(|x| !x.ok).count();
    println!(
        "{} passed, {} failed (details: {})",
        r.rows.len() - failed,
        failed,
        details_path.display()
    );
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Every backend op on random inputs at several shapes, odd sizes included.
fn op_checks(gpu: &CudaBackend, rng: &mut Rng, r: &mut Report) -> Result<()> {
    let cpu = CpuBackend;
    let dtypes = [DType::BF16, DType::F16, DType::F32];
    // embed
    for (dt, hidden) in dtypes.iter().zip([64, 100, 131]) {
        let vocab = 97;
        let t = tensor("embed", *dt, vec![vocab, hidden], &rng.vec(vocab * hidden, 1.0))?;
        let ids: Vec<u32> = (0..13).map(|_| rng.below(vocab) as u32).collect();
        let want = cpu.embed(&cpu.upload(&t)?, &ids)?.data;
        let got = gpu.to_host(&gpu.embed(&gpu.upload(&t)?, &ids)?)?;
        r.err(
            &format!("embed {} [13 of {vocab}, {hidden}]", dt.name()),
            rel_l2(&got, &want),
            TOL_F32,
        );
    }
    // rms_norm with and without the residual add; gather_rows; swiglu
    for (rows, cols) in [(1, 64), (7, 129), (33, 1000)] {
        let w = tensor("norm", DType::BF16, vec![cols], &rng.vec(cols, 1.0))?;
        let x = rng.vec(rows * cols, 2.0);
        let d = rng.vec(rows * cols, 2.0);
        for with_delta in [false, true] {
            let mut cres = cpu_act(rows, cols, x.clone());
            let cd = cpu_act(rows, cols, d.clone());
            let want =
                cpu.rms_norm(&mut cres, with_delta.then_some(&cd), &cpu.upload(&w)?, 1e-5)?;
            let mut gres = gpu.act_from_host(rows, cols, &x)?;
            let gd = gpu.act_from_host(rows, cols, &d)?;
            let got = gpu.rms_norm(&mut gres, with_delta.then_some(&gd), &gpu.upload(&w)?, 1e-5)?;
            let name = format!("rms_norm{} [{rows}, {cols}]", if with_delta { "+add" } else { "" });
            r.err(&name, rel_l2(&gpu.to_host(&got)?, &want.data), TOL_F32);
            r.err(&format!("{name} residual"), rel_l2(&gpu.to_host(&gres)?, &cres.data), TOL_F32);
        }
        let idx: Vec<usize> = (0..3).map(|_| rng.below(rows)).collect();
        let want = cpu.gather_rows(&cpu_act(rows, cols, x.clone()), &idx)?.data;
        let got = gpu.to_host(&gpu.gather_rows(&gpu.act_from_host(rows, cols, &x)?, &idx)?)?;
        r.err(&format!("gather_rows [{rows}, {cols}]"), rel_l2(&got, &want), TOL_F32);
        let gu = rng.vec(rows * cols * 2, 4.0);
        let want = cpu.swiglu(&cpu_act(rows, 2 * cols, gu.clone()))?.data;
        let got = gpu.to_host(&gpu.swiglu(&gpu.act_from_host(rows, 2 * cols, &gu)?)?)?;
        r.err(&format!("swiglu [{rows}, {}]", 2 * cols), rel_l2(&got, &want), TOL_F32);
    }
    // linear: GEMV (one row) and cuBLAS (more rows), every dtype, odd sizes
    for dt in dtypes {
        for (n, k, m) in
            [(1, 64, 33), (1, 100, 70), (1, 1000, 257), (3, 64, 33), (17, 131, 70), (64, 512, 300)]
        {
            let w = tensor("w", dt, vec![m, k], &rng.vec(m * k, 1.0 / (k as f32).sqrt()))?;
            let x = rng.vec(n * k, 1.0);
            let want = cpu.linear(&cpu_act(n, k, x.clone()), &cpu.upload(&w)?)?.data;
            let got = gpu.to_host(&gpu.linear(&gpu.act_from_host(n, k, &x)?, &gpu.upload(&w)?)?)?;
            let tol = if n == 1 || dt == DType::F32 { TOL_F32 } else { TOL_BF16 };
            let path = if n == 1 { "gemv" } else { "gemm" };
            r.err(
                &format!("linear/{path} {} [{n},{k}]x[{m},{k}]", dt.name()),
                rel_l2(&got, &want),
                tol,
            );
        }
    }
    // rope_store_kv + attention: GQA and MHA, partial rotary, a sliding window, a cache that
    // already holds tokens, prefill and single-token decode
    let cases = [
        // (n_heads, n_kv_heads, head_dim, rotary_dim, window, pos0, len)
        (8, 2, 64, 64, None, 0, 19),
        (8, 2, 64, 64, None, 37, 1),
        (4, 4, 96, 48, None, 5, 7),
        (6, 3, 128, 128, Some(9), 20, 13),
        (6, 3, 128, 128, Some(9), 140, 1),
        (10, 2, 80, 80, None, 300, 130),
    ];
    for (nh, nkv, hd, rot, window, pos0, len) in cases {
        let layout = KvLayout { n_layers: 2, n_kv_heads: nkv, head_dim: hd };
        let params = AttnParams {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            rotary_dim: rot,
            scale: (hd as f32).powf(-0.5),
            sliding_window: window,
        };
        let layer = 1;
        // Existing cache contents, exactly representable in bf16 so both caches start equal.
        let kv_dim = nkv * hd;
        let old: Vec<f32> = rng
            .vec(2 * 2 * pos0 * kv_dim, 1.0)
            .into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect();
        let mut ckv = cpu.alloc_kv(&layout)?;
        cpu.kv_from_host(&mut ckv, pos0, &old)?;
        cpu.reserve_kv(&mut ckv, pos0 + len)?;
        let mut gkv = gpu.alloc_kv(&layout)?;
        gpu.kv_from_host(&mut gkv, pos0, &old)?;
        gpu.reserve_kv(&mut gkv, pos0 + len)?;
        let cfg = phi3_core::config::RopeConfig {
            theta: 10_000.0,
            rotary_dim: rot,
            scaling: phi3_core::config::RopeScaling::None,
        };
        let rope = Rope::new(&cfg);
        let mut batch = RopeBatch::new(rope.half());
        batch.push_positions(rope.tables(RopeRegime::Short), pos0..pos0 + len);
        let seqs = [SeqSpan { row: 0, len, pos0 }];
        let qkv = rng.vec(len * (nh + 2 * nkv) * hd, 1.0);
        let cols = (nh + 2 * nkv) * hd;
        let cq = cpu.rope_store_kv(
            &cpu_act(len, cols, qkv.clone()),
            &seqs,
            &batch,
            &mut [&mut ckv],
            layer,
            &params,
        )?;
        let gq = gpu.rope_store_kv(
            &gpu.act_from_host(len, cols, &qkv)?,
            &seqs,
            &batch,
            &mut [&mut gkv],
            layer,
            &params,
        )?;
        let tag = format!(
            "h{nh}/kv{nkv} hd{hd} rot{rot} win{} pos{pos0}+{len}",
            window.map_or("-".into(), |w| w.to_string())
        );
        r.err(&format!("rope q {tag}"), rel_l2(&gpu.to_host(&gq)?, &cq.data), TOL_F32);
        let ck = cpu.kv_to_host(&ckv, pos0 + len)?;
        let gk = gpu.kv_to_host(&gkv, pos0 + len)?;
        r.err(&format!("rope k,v cache {tag}"), rel_l2(&gk, &ck), TOL_BF16);
        let want = cpu.attention(&cq, &seqs, &[&ckv], layer, &params)?.data;
        let got = gpu.to_host(&gpu.attention(&gq, &seqs, &[&gkv], layer, &params)?)?;
        r.err(&format!("attention {tag}"), rel_l2(&got, &want), TOL_BF16);
        // fork (copy_kv) keeps the cache
        let fork = gpu.copy_kv(&gkv, pos0 + len)?;
        r.err(&format!("copy_kv {tag}"), rel_l2(&gpu.kv_to_host(&fork, pos0 + len)?, &gk), 0.0);
    }
    // dummy weights: device values equal the Rust twin of the hash
    let w = gpu.dummy_weight("model.layers.0.mlp.down_proj.weight", &[33, 77], DType::F32, 7, 5)?;
    let got = gpu.weight_to_host(&w)?;
    let want: Vec<f32> = (0..33 * 77)
        .map(|i| phi3_core::backend::cuda::dummy_value(7, 5, i as u64, 0.0, 1.0 / 77f32.sqrt()))
        .collect();
    r.err("dummy weights f32 [33, 77]", rel_l2(&got, &want), 1e-6);
    Ok(())
}

/// Read the fixture's HF oracle: tokens, logits [L, vocab], greedy prompt and continuation.
struct Oracle {
    tokens: Vec<u32>,
    vocab: usize,
    logits: Vec<f32>,
    greedy_prompt: Vec<u32>,
    greedy_tokens: Vec<u32>,
}

fn oracle(dir: &Path) -> Result<Oracle> {
    let bytes = std::fs::read(dir.join("oracle.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let ints = |key: &str| -> Result<Vec<u32>> {
        Ok(st
            .tensor(key)?
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as u32)
            .collect())
    };
    let lv = st.tensor("logits")?;
    let vocab = lv.shape()[1];
    let logits =
        lv.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(Oracle {
        tokens: ints("tokens")?,
        vocab,
        logits,
        greedy_prompt: ints("greedy_prompt")?,
        greedy_tokens: ints("greedy_tokens")?,
    })
}

fn model_check(dir: &Path, name: &str, ordinal: usize, r: &mut Report) -> Result<()> {
    let o = oracle(dir)?;
    let cuda = LoadOptions { device: Device::Cuda(ordinal), ..Default::default() };
    let gpu = Model::load(dir, &cuda)?;
    let cpu = Model::load(dir, &LoadOptions { device: Device::Cpu, ..Default::default() })?;
    let row = |i: usize| &o.logits[i * o.vocab..(i + 1) * o.vocab];
    let n = o.tokens.len();
    // Prefill of the whole sequence (cuBLAS path), against HF and the CPU backend.
    let got = gpu.session(SessionOptions::default())?.append_tokens(&o.tokens)?;
    let cpu_logits = cpu.session(SessionOptions::default())?.append_tokens(&o.tokens)?;
    r.err(&format!("{name}: prefill {n} vs HF"), rel_l2(&got, row(n - 1)), TOL_MODEL);
    r.err(&format!("{name}: prefill {n} vs CPU"), rel_l2(&got, &cpu_logits), TOL_MODEL);
    // Token by token (GEMV and decode attention; crosses the LongRoPE threshold where the
    // fixture has one, so the session recomputes its cache in the long regime).
    let mut s = gpu.session(SessionOptions::default())?;
    let mut worst: f64 = 0.0;
    for (i, &t) in o.tokens.iter().enumerate() {
        worst = worst.max(rel_l2(&s.append_tokens(&[t])?, row(i)));
    }
    r.err(&format!("{name}: decode 1..{n} worst vs HF"), worst, TOL_MODEL);
    // Chunks that straddle the threshold (original_max 16 in the longrope fixture).
    let mut s = gpu.session(SessionOptions::default())?;
    let (mut start, mut worst) = (0, 0.0f64);
    for end in [5, 14, 19, 20, 31, n] {
        let end = end.min(n);
        if end <= start {
            continue;
        }
        worst = worst.max(rel_l2(&s.append_tokens(&o.tokens[start..end])?, row(end - 1)));
        start = end;
    }
    r.err(&format!("{name}: chunked appends across LongRoPE threshold"), worst, TOL_MODEL);
    // Greedy continuation equals HF's.
    let mut s = gpu.session(SessionOptions::default())?;
    let mut logits = s.append_tokens(&o.greedy_prompt)?;
    let mut out = Vec::new();
    for _ in 0..o.greedy_tokens.len() {
        let t = sampler::greedy(&logits, gpu.config().vocab_size)
            .ok_or_else(|| anyhow!("NaN logits"))?;
        out.push(t);
        logits = s.append_tokens(&[t])?;
    }
    let same = out == o.greedy_tokens;
    let first_diff = out.iter().zip(&o.greedy_tokens).position(|(a, b)| a != b);
    r.flag(
        &format!("{name}: greedy {} tokens", out.len()),
        if same { "equal".into() } else { format!("differ at {first_diff:?}") },
        same,
    );
    Ok(())
}

/// Load Phi-3-medium-128k shapes with dummy bf16 weights on the device, prefill 512 tokens and
/// decode 32.
fn bench(fixtures: &Path, ordinal: usize, r: &mut Report) -> Result<()> {
    let config = fixtures.join("configs/Phi-3-medium-128k-instruct.config.json");
    let dir: PathBuf = std::env::temp_dir().join(format!("phi3-gpu-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&config, dir.join("config.json"))
        .with_context(|| config.display().to_string())?;
    let options = LoadOptions {
        device: Device::Cuda(ordinal),
        dummy_weights: Some(DummyWeights { dtype: DType::BF16, seed: 0 }),
        ..Default::default()
    };
    let started = Instant::now();
    let model = Model::load(&dir, &options);
    let _ = std::fs::remove_dir_all(&dir);
    let model = model?;
    let load_s = started.elapsed().as_secs_f64();
    let mut s = model.session(SessionOptions::default())?;
    let prompt: Vec<u32> = (0..512).map(|i| 3 + (i % 997) as u32).collect();
    let t = Instant::now();
    let mut logits = s.append_tokens(&prompt)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let gen = 32;
    for _ in 0..gen {
        let tok = sampler::greedy(&logits, model.config().vocab_size).unwrap_or(3);
        logits = s.append_tokens(&[tok])?;
    }
    let decode_s = t.elapsed().as_secs_f64();
    let stats = model.device_stats();
    let cuda = stats.cuda.as_ref();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let _ = writeln!(
        r.details,
        "bench: load {load_s:.2} s, prefill 512 tok {prefill_s:.3} s ({:.1} tok/s), decode {gen} tok {decode_s:.3} s ({:.2} ms/token), weights {:.2} GiB, kv {:.2} GiB, free {:?}",
        512.0 / prefill_s,
        decode_s * 1000.0 / gen as f64,
        gib(stats.weight_bytes),
        gib(cuda.map_or(0, |c| c.kv_bytes)),
        cuda.and_then(|c| c.free_memory).map(gib)
    );
    let finite = logits.iter().all(|x| x.is_finite());
    r.flag("bench medium: prefill tok/s", format!("{:.1}", 512.0 / prefill_s), finite);
    r.flag(
        "bench medium: decode ms/token",
        format!("{:.2}", decode_s * 1000.0 / gen as f64),
        finite,
    );
    r.flag("bench medium: weights GiB", format!("{:.2}", gib(stats.weight_bytes)), true);
    if !finite {
        bail!("non-finite logits from dummy weights");
    }
    Ok(())
}
