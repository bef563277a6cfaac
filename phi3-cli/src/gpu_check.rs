//! `phi3 gpu-check`: the CUDA backend against the CPU backend and the HF fixtures, then a short
//! benchmark at Phi-3-medium-128k shapes with dummy weights. Run on a GPU machine by
//! `scripts/gpu-check`. Each check prints one line as it finishes (so a crash or a timeout still
//! leaves the lines before it), then a summary that repeats every failure; details go to
//! `<out>/gpu-check.txt`. Exits non-zero when any check fails. Without a CUDA driver or device it
//! fails with that error. A section that returns an error (a failed launch, say) becomes one FAIL
//! line and the next section still runs; after an illegal-address fault every later section on the
//! same backend fails too, so read the FIRST failure first.
//!
//! Op checks run with poisoning on: every activation and KV block the GPU allocates starts as
//! NaN, so an output element a kernel fails to write makes its check fail (NaN is never "ok").
//!
//! Tolerances (relative L2, ||out - ref|| / ||ref||):
//! - ops computed in f32 on both sides from the same inputs (embed, rms_norm, swiglu, gather,
//!   GEMV for one token, f32 GEMM, rotated q, attention over the GPU's own q and cache): 1e-4;
//!   they differ only in summation order, FMA contraction and expf vs exp.
//! - keys and values in the bf16 cache against the CPU's f32 values rounded to bf16: 1e-3 (equal
//!   but for the rare element whose f32 value differs by an ulp across a bf16 rounding boundary).
//! - ops that round to bf16 on the device (GEMM inputs for bf16/f16 weights; attention over the
//!   bf16 cache against the CPU's f32 cache): 1e-2. bf16 keeps 8 significant bits: round-to-nearest
//!   error is at most 2^-9 = 2e-3 relative and ~1.1e-3 RMS, and a dot product of independently
//!   rounded terms keeps that relative RMS error; 1e-2 leaves ~5x headroom.
//! - full model logits (vs HF and vs the CPU backend): 3e-2 per logits row. The 2-layer fixtures
//!   chain ~10 such roundings (qkv, k/v store, o, gate_up, down per layer, lm_head) whose errors
//!   add roughly in quadrature: sqrt(10) x 2e-3 ≈ 6e-3 expected, with 5x headroom. A real bug (wrong
//!   rope regime, mask or GQA mapping) shows up as 1e-1 or more (see kv_cache.rs).
//!
//! Greedy continuations must equal HF's exactly; a difference is reported with the logit gap at
//! the first divergence (a gap near 0 is a near-tie, not necessarily a bug).

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
const TOL_KV: f64 = 1e-3;
const TOL_BF16: f64 = 1e-2;
const TOL_MODEL: f64 = 3e-2;
/// Width of the check column of the printed lines.
const CHECK_W: usize = 58;

/// One line of the report.
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
    fn push(&mut self, row: Row) {
        let _ = writeln!(
            self.details,
            "{}: {} (limit {}) {}",
            row.check,
            row.value,
            row.limit,
            ok_str(row.ok)
        );
        println!("{}", line(&row));
        self.rows.push(row);
    }

    fn err(&mut self, check: &str, err: f64, tol: f64) {
        let ok = err.is_finite() && err <= tol;
        let value = if err.is_nan() { "NaN".to_string() } else { format!("{err:.2e}") };
        self.push(Row { check: check.into(), value, limit: format!("{tol:.0e}"), ok });
    }

    fn flag(&mut self, check: &str, value: String, ok: bool) {
        self.push(Row { check: check.into(), value, limit: "-".into(), ok });
    }

    /// Run one section; an error it returns becomes a FAIL line and the run goes on.
    fn section(&mut self, name: &str, f: impl FnOnce(&mut Report) -> Result<()>) {
        let _ = writeln!(self.details, "== {name}");
        if let Err(e) = f(self) {
            self.flag(&format!("{name}: ERROR"), format!("{e:#}"), false);
        }
    }
}

fn ok_str(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "FAIL"
    }
}

fn line(row: &Row) -> String {
    format!("{:<4}  {:<CHECK_W$}  {:>9}  limit {}", ok_str(row.ok), row.check, row.value, row.limit)
}

/// ||got - want|| / ||want||; infinite when the lengths differ, NaN when `got` holds a NaN.
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

/// `x` rounded to bf16 and back (what the GPU's KV cache holds).
fn bf16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}

/// SplitMix64 random numbers for inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        phi3_core::sampler::splitmix64(&mut self.0)
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
    let head = format!(
        "device: {}\nseed: {seed} (rerun with --seed {seed})\nkernels: {}",
        gpu.name(),
        gpu.stats().kernels
    );
    println!("{head}");
    let _ = writeln!(r.details, "{head}");
    gpu.set_poison(true);
    let mut rng = Rng(seed);
    r.section("embed", |r| check_embed(&gpu, &mut rng, r));
    r.section("rms_norm/gather/swiglu", |r| check_rows(&gpu, &mut rng, r));
    r.section("linear", |r| check_linear(&gpu, &mut rng, r));
    r.section("rope/kv/attention", |r| check_attention(&gpu, &mut rng, r));
    r.section("dummy weights", |r| check_dummy(&gpu, r));
    r.section("device errors", |_| Ok(gpu.synchronize()?));
    gpu.set_poison(false);
    drop(gpu);

    for name in ["gqa-longrope-bf16", "mha-f32-tied", "partial-rotary-f16", "sliding-window-f32"] {
        r.section(name, |r| model_check(&args.fixtures.join(name), name, args.ordinal, r));
    }
    if !args.skip_bench {
        r.section("bench phi3-medium dummy", |r| bench(&args.fixtures, args.ordinal, r));
    }

    let _ = writeln!(r.details, "total {:.1} s", started.elapsed().as_secs_f64());
    std::fs::create_dir_all(&args.out)?;
    let details_path = args.out.join("gpu-check.txt");
    std::fs::write(&details_path, &r.details)?;
    let failed: Vec<&Row> = r.rows.iter().filter(|x| !x.ok).collect();
    println!();
    if !failed.is_empty() {
        println!(
            "FAILED ({} of {}), in run order (the first is the one to read first):",
            failed.len(),
            r.rows.len()
        );
        for row in &failed {
            println!("{}", line(row));
        }
    }
    println!(
        "gpu-check: {} passed, {} failed, {:.0} s (details: {})",
        r.rows.len() - failed.len(),
        failed.len(),
        started.elapsed().as_secs_f64(),
        details_path.display()
    );
    Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// embed in every dtype, odd widths, ids at both ends of the vocabulary.
fn check_embed(gpu: &CudaBackend, rng: &mut Rng, r: &mut Report) -> Result<()> {
    let cpu = CpuBackend;
    let dtypes = [DType::BF16, DType::F16, DType::F32];
    for (dt, hidden) in dtypes.iter().zip([64, 100, 131]) {
        let vocab = 97;
        let t = tensor("embed", *dt, vec![vocab, hidden], &rng.vec(vocab * hidden, 1.0))?;
        let mut ids: Vec<u32> = (0..13).map(|_| rng.below(vocab) as u32).collect();
        ids[0] = 0;
        ids[12] = vocab as u32 - 1;
        let want = cpu.embed(&cpu.upload(&t)?, &ids)?.data;
        let got = gpu.to_host(&gpu.embed(&gpu.upload(&t)?, &ids)?)?;
        r.err(
            &format!("embed {} [13 of {vocab}, {hidden}]", dt.name()),
            rel_l2(&got, &want),
            TOL_F32,
        );
    }
    Ok(())
}

/// rms_norm with and without the residual add; gather_rows; swiglu.
fn check_rows(gpu: &CudaBackend, rng: &mut Rng, r: &mut Report) -> Result<()> {
    let cpu = CpuBackend;
    for (rows, cols) in [(1, 64), (7, 129), (33, 1000), (3, 5120)] {
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
        let mut idx: Vec<usize> = (0..3).map(|_| rng.below(rows)).collect();
        idx.push(rows - 1);
        let want = cpu.gather_rows(&cpu_act(rows, cols, x.clone()), &idx)?.data;
        let got = gpu.to_host(&gpu.gather_rows(&gpu.act_from_host(rows, cols, &x)?, &idx)?)?;
        r.err(&format!("gather_rows {idx:?} of [{rows}, {cols}]"), rel_l2(&got, &want), TOL_F32);
        let gu = rng.vec(rows * cols * 2, 4.0);
        let want = cpu.swiglu(&cpu_act(rows, 2 * cols, gu.clone()))?.data;
        let got = gpu.to_host(&gpu.swiglu(&gpu.act_from_host(rows, 2 * cols, &gu)?)?)?;
        r.err(&format!("swiglu [{rows}, {}]", 2 * cols), rel_l2(&got, &want), TOL_F32);
    }
    Ok(())
}

/// linear: GEMV (one row; `in` a multiple of 8 takes the 16-byte path, others the scalar loop)
/// and cuBLAS (more rows), every dtype, odd sizes, and a Phi-3-mini lm_head in bf16.
fn check_linear(gpu: &CudaBackend, rng: &mut Rng, r: &mut Report) -> Result<()> {
    let cpu = CpuBackend;
    let mut shapes: Vec<(DType, usize, usize, usize)> = Vec::new();
    for dt in [DType::BF16, DType::F16, DType::F32] {
        for (n, k, m) in [
            (1, 64, 33),
            (1, 100, 70),
            (1, 1000, 257),
            (1, 7, 5),
            (2, 64, 33),
            (3, 64, 33),
            (17, 131, 70),
            (64, 512, 300),
        ] {
            shapes.push((dt, n, k, m));
        }
    }
    shapes.push((DType::BF16, 1, 3072, 32064));
    shapes.push((DType::BF16, 5, 3072, 32064));
    for (dt, n, k, m) in shapes {
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
    Ok(())
}

/// One attention geometry of [`check_attention`].
struct AttnCase {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    window: Option<usize>,
    /// (pos0, len) of each sequence of the batch, each with its own cache.
    seqs: &'static [(usize, usize)],
}

/// rope_store_kv + attention (+ copy_kv): GQA and MHA, partial rotary, sliding windows narrower
/// and wider than a 128-key tile, caches that already hold tokens, prefill and single-token
/// decode, head_dim up to 256 and not a multiple of 32, and batches of several sequences (rows
/// that do not start at 0).
fn check_attention(gpu: &CudaBackend, rng: &mut Rng, r: &mut Report) -> Result<()> {
    let case = |n_heads, n_kv_heads, head_dim, rotary_dim, window, seqs| AttnCase {
        n_heads,
        n_kv_heads,
        head_dim,
        rotary_dim,
        window,
        seqs,
    };
    let cases = [
        case(8, 2, 64, 64, None, &[(0, 19)][..]),
        case(8, 2, 64, 64, None, &[(37, 1)]),
        case(4, 4, 96, 48, None, &[(5, 7)]),
        case(6, 3, 128, 128, Some(9), &[(20, 13)]),
        case(6, 3, 128, 128, Some(9), &[(140, 1)]),
        case(10, 2, 80, 80, None, &[(300, 130)]),
        case(8, 1, 200, 64, Some(130), &[(100, 40)]),
        case(4, 2, 256, 256, None, &[(0, 150)]),
        case(8, 2, 64, 32, None, &[(3, 5), (0, 4), (129, 1)]),
        case(4, 2, 72, 72, Some(8), &[(10, 1), (20, 1), (0, 1)]),
    ];
    for c in &cases {
        attention_case(gpu, rng, r, c)?;
    }
    Ok(())
}

fn attention_case(gpu: &CudaBackend, rng: &mut Rng, r: &mut Report, c: &AttnCase) -> Result<()> {
    let cpu = CpuBackend;
    let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
    let layout = KvLayout { n_layers: 2, n_kv_heads: nkv, head_dim: hd };
    let params = AttnParams {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        rotary_dim: c.rotary_dim,
        scale: (hd as f32).powf(-0.5),
        sliding_window: c.window,
    };
    let layer = 1;
    let kv_dim = nkv * hd;
    let rope = Rope::new(&phi3_core::config::RopeConfig {
        theta: 10_000.0,
        rotary_dim: c.rotary_dim,
        scaling: phi3_core::config::RopeScaling::None,
    });
    let mut batch = RopeBatch::new(rope.half());
    let (mut ckvs, mut gkvs, mut spans) = (Vec::new(), Vec::new(), Vec::new());
    let mut rows = 0;
    for &(pos0, len) in c.seqs {
        // Existing cache contents, exactly representable in bf16 so both caches start equal.
        let old = bf16_round(&rng.vec(2 * 2 * pos0 * kv_dim, 1.0));
        let mut ckv = cpu.alloc_kv(&layout)?;
        cpu.kv_from_host(&mut ckv, pos0, &old)?;
        cpu.reserve_kv(&mut ckv, pos0 + len)?;
        let mut gkv = gpu.alloc_kv(&layout)?;
        gpu.kv_from_host(&mut gkv, pos0, &old)?;
        gpu.reserve_kv(&mut gkv, pos0 + len)?;
        ckvs.push(ckv);
        gkvs.push(gkv);
        batch.push_positions(rope.tables(RopeRegime::Short), pos0..pos0 + len);
        spans.push(SeqSpan { row: rows, len, pos0 });
        rows += len;
    }
    let cols = (nh + 2 * nkv) * hd;
    let qkv = rng.vec(rows * cols, 1.0);
    let cq = {
        let mut kvs: Vec<_> = ckvs.iter_mut().collect();
        cpu.rope_store_kv(
            &cpu_act(rows, cols, qkv.clone()),
            &spans,
            &batch,
            &mut kvs,
            layer,
            &params,
        )?
    };
    let gq = {
        let mut kvs: Vec<_> = gkvs.iter_mut().collect();
        gpu.rope_store_kv(
            &gpu.act_from_host(rows, cols, &qkv)?,
            &spans,
            &batch,
            &mut kvs,
            layer,
            &params,
        )?
    };
    let seqs_tag: Vec<String> = c.seqs.iter().map(|(p, l)| format!("{p}+{l}")).collect();
    let tag = format!(
        "h{nh}/kv{nkv} hd{hd} rot{} win{} pos{}",
        c.rotary_dim,
        c.window.map_or("-".into(), |w| w.to_string()),
        seqs_tag.join(",")
    );
    let gq_host = gpu.to_host(&gq)?;
    r.err(&format!("rope q {tag}"), rel_l2(&gq_host, &cq.data), TOL_F32);
    // kv_to_host: per layer, keys then values, each [n, kv_dim]. Only `layer` was written; the
    // other layer's new positions are still poison (NaN) on the GPU, so it is compared over the
    // old positions only (which must be unchanged).
    let (mut gk_all, mut ck_all, mut g_old, mut c_old) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (s, &(pos0, len)) in c.seqs.iter().enumerate() {
        let n = pos0 + len;
        let (ch, gh) = (cpu.kv_to_host(&ckvs[s], n)?, gpu.kv_to_host(&gkvs[s], n)?);
        let block = 2 * n * kv_dim;
        ck_all.extend(bf16_round(&ch[layer * block..(layer + 1) * block]));
        gk_all.extend_from_slice(&gh[layer * block..(layer + 1) * block]);
        for l in (0..layout.n_layers).filter(|&l| l != layer) {
            for half in 0..2 {
                let at = l * block + half * n * kv_dim;
                c_old.extend_from_slice(&ch[at..at + pos0 * kv_dim]);
                g_old.extend_from_slice(&gh[at..at + pos0 * kv_dim]);
            }
        }
    }
    r.err(&format!("rope k,v cache {tag}"), rel_l2(&gk_all, &ck_all), TOL_KV);
    if !c_old.is_empty() {
        r.err(&format!("other layer untouched {tag}"), rel_l2(&g_old, &c_old), 0.0);
    }

    // Attention end to end (GPU: bf16 cache; CPU: f32 cache).
    let got = {
        let kvs: Vec<_> = gkvs.iter().collect();
        gpu.to_host(&gpu.attention(&gq, &spans, &kvs, layer, &params)?)?
    };
    let want = {
        let kvs: Vec<_> = ckvs.iter().collect();
        cpu.attention(&cq, &spans, &kvs, layer, &params)?.data
    };
    r.err(&format!("attention {tag}"), rel_l2(&got, &want), TOL_BF16);
    // The attention kernel alone: the CPU over the GPU's own q and (bf16) cache.
    let mut same_kvs = Vec::new();
    for (s, &(pos0, len)) in c.seqs.iter().enumerate() {
        let mut k = cpu.alloc_kv(&layout)?;
        cpu.kv_from_host(&mut k, pos0 + len, &gpu.kv_to_host(&gkvs[s], pos0 + len)?)?;
        same_kvs.push(k);
    }
    let want_same = {
        let kvs: Vec<_> = same_kvs.iter().collect();
        cpu.attention(&cpu_act(rows, nh * hd, gq_host), &spans, &kvs, layer, &params)?.data
    };
    r.err(&format!("attention kernel (same inputs) {tag}"), rel_l2(&got, &want_same), TOL_F32);

    // fork (copy_kv) keeps the cache
    let (pos0, len) = c.seqs[0];
    let fork = gpu.copy_kv(&gkvs[0], pos0 + len)?;
    let want = gpu.kv_to_host(&gkvs[0], pos0 + len)?;
    let got = gpu.kv_to_host(&fork, pos0 + len)?;
    // Bit for bit, poison included (NaN != NaN would fail a numeric comparison).
    let differ = got.len().abs_diff(want.len())
        + got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    r.flag(&format!("copy_kv {tag}"), format!("{differ} values differ"), differ == 0);
    Ok(())
}

/// Dummy weights: device values equal the Rust twin of the hash.
fn check_dummy(gpu: &CudaBackend, r: &mut Report) -> Result<()> {
    let w = gpu.dummy_weight("model.layers.0.mlp.down_proj.weight", &[33, 77], DType::F32, 7, 5)?;
    let got = gpu.weight_to_host(&w)?;
    let want: Vec<f32> = (0..33 * 77)
        .map(|i| phi3_core::backend::cuda::dummy_value(7, 5, i as u64, 0.0, 1.0 / 77f32.sqrt()))
        .collect();
    r.err("dummy weights f32 [33, 77]", rel_l2(&got, &want), 1e-6);
    Ok(())
}

/// The worse of two errors; NaN wins (f64::max would drop it and hide NaN logits).
fn worse(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
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
        worst = worse(worst, rel_l2(&s.append_tokens(&[t])?, row(i)));
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
        worst = worse(worst, rel_l2(&s.append_tokens(&o.tokens[start..end])?, row(end - 1)));
        start = end;
    }
    r.err(&format!("{name}: chunked appends across LongRoPE threshold"), worst, TOL_MODEL);
    // Greedy continuation equals HF's.
    let mut s = gpu.session(SessionOptions::default())?;
    let mut logits = s.append_tokens(&o.greedy_prompt)?;
    let mut out = Vec::new();
    let mut diverged = None;
    for i in 0..o.greedy_tokens.len() {
        if logits.iter().any(|x| x.is_nan()) {
            bail!("NaN logits at greedy step {i}");
        }
        let t = sampler::greedy(&logits, gpu.config().vocab_size)
            .ok_or_else(|| anyhow!("no finite logit at greedy step {i}"))?;
        let hf = o.greedy_tokens[i];
        if t != hf && diverged.is_none() {
            // How close the GPU's own logits came to HF's choice: ~0 is a near-tie.
            let gap = logits[t as usize] - logits.get(hf as usize).copied().unwrap_or(f32::NAN);
            diverged = Some(format!("step {i}: got {t}, HF {hf}, logit gap {gap:.3e}"));
        }
        out.push(t);
        logits = s.append_tokens(&[t])?;
    }
    let same = out == o.greedy_tokens;
    r.flag(
        &format!("{name}: greedy {} tokens", out.len()),
        diverged.unwrap_or_else(|| if same { "equal".into() } else { "lengths differ".into() }),
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
    // Warm-up (cuBLAS heuristics, first launches, allocator pool) so the timings below are steady.
    {
        let mut w = model.session(SessionOptions::default())?;
        w.append_tokens(&[3, 4, 5, 6, 7, 8, 9, 10])?;
        w.append_tokens(&[11])?;
    }
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
    let summary = format!(
        "bench: load {load_s:.2} s, prefill 512 tok {prefill_s:.3} s ({:.1} tok/s), decode {gen} tok {decode_s:.3} s ({:.2} ms/token), weights {:.2} GiB, kv {:.2} GiB, free {:?}",
        512.0 / prefill_s,
        decode_s * 1000.0 / gen as f64,
        gib(stats.weight_bytes),
        gib(cuda.map_or(0, |c| c.kv_bytes)),
        cuda.and_then(|c| c.free_memory).map(gib)
    );
    println!("{summary}");
    let _ = writeln!(r.details, "{summary}");
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
