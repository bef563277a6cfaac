//! Activation-aware scale search (AWQ, Lin et al. 2023) for int4 quantization: per input channel
//! scales `s` that move quantization error away from the channels with large activations.
//!
//! Reference: AutoAWQ `awq/quantize/quantizer.py` (`_search_best_scale`), `awq/models/phi3.py`
//! (which projections share a scale), `awq/quantize/scale.py` (how scales are folded). For a
//! projection `y = W x` the written weight is `Q(W diag(s))` and `1/s` is folded into the op that
//! produces `x`, so that without quantization the model is unchanged:
//! - qkv_proj: `s` over `hidden`, `1/s` into `input_layernorm`'s weight;
//! - o_proj: `s` over `n_heads * head_dim`, `1/s` into the v rows of qkv_proj (attention is
//!   linear in v), only when `n_heads == n_kv_heads` (as AutoAWQ: with GQA the shapes differ);
//! - gate_up_proj: `s` over `hidden`, `1/s` into `post_attention_layernorm`'s weight;
//! - down_proj: `s` over `intermediate`, `1/s` into the up rows of gate_up_proj
//!   (`silu(gate) * up` is linear in up).
//!
//! **Search**, per projection: `s = mean|x|^α` per input channel over the calibration tokens,
//! normalised by `sqrt(max s * min s)` (an overall factor changes nothing: the quantizer's
//! per-row group scales absorb it), for `α = i / GRID`, `i < GRID`; the chosen `α` minimises the
//! mean squared output error `‖W x − Q(W diag(s)) (x / s)‖² / (n · rows)` over the calibration
//! activations. `α = 0` is `s = 1`, round-to-nearest, so the chosen error never exceeds RTN's.
//!
//! **Memory**, layer by layer as AutoAWQ: one layer's weights (file dtype, plus one projection
//! in f32 at a time) and the calibration hidden state `[tokens, hidden]` f32; the layer runs on
//! the CPU backend through `forward::decoder_layer` (the same code as inference), unquantized,
//! which also advances the hidden state to the next layer.
//!
//! Not here: AutoAWQ's clipping search (`auto_clip`), its `duo_scaling` (weight magnitudes in
//! `s`), and writing the folder (`quantize/mod.rs`).

use std::path::Path;

use crate::backend::cpu::{CpuAct, CpuBackend};
use crate::backend::{AttnParams, Backend, KvLayout, LinearRows, SeqSpan, KV_BLOCK_TOKENS};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::forward::{decoder_layer, LayerCtx, ProjInput};
use crate::loader::WeightFormat;
use crate::loader::{paths, DType, HostTensor, LayerWeights, ModelWeights, QuantizedTensor};
use crate::rope::{Rope, RopeBatch};
use crate::tokenizer::Tokenizer;

/// The built-in calibration text: about 4.5 KB of original English prose written for phi3-rs
/// (no third-party material), distinct from [`crate::eval::HELD_TEXT`].
pub const CALIBRATION_TEXT: &str = include_str!("calibration.txt");
/// Calibration tokens used when none are asked for (AutoAWQ's sample length).
pub const DEFAULT_CALIBRATION_TOKENS: usize = 512;
/// Points of the `α` grid: `α = i / GRID` for `i` in `0..GRID`.
pub const GRID: usize = 20;
/// Smallest scale before normalisation (a channel that is always zero).
const MIN_SCALE: f32 = 1e-4;

/// The scales chosen for one decoder layer; each multiplies its projection's input channels.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerScales {
    /// qkv_proj's scales, `[hidden]`.
    pub qkv: Vec<f32>,
    /// o_proj's scales, `[n_heads * head_dim]`; `None` with GQA (o_proj is not scaled).
    pub o: Option<Vec<f32>>,
    /// gate_up_proj's scales, `[hidden]`.
    pub gate_up: Vec<f32>,
    /// down_proj's scales, `[intermediate]`.
    pub down: Vec<f32>,
}

/// The outcome of one projection's search.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleSearch {
    /// The chosen exponent.
    pub alpha: f32,
    /// Mean squared output error with the chosen scales.
    pub error: f64,
    /// Mean squared output error of plain round-to-nearest (`α = 0`).
    pub rtn_error: f64,
}

/// The searches of one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerSearch {
    /// qkv_proj.
    pub qkv: ScaleSearch,
    /// o_proj; `None` with GQA.
    pub o: Option<ScaleSearch>,
    /// gate_up_proj.
    pub gate_up: ScaleSearch,
    /// down_proj.
    pub down: ScaleSearch,
}

/// What the search found, for [`crate::quantize::QuantizeReport`].
#[derive(Clone, Debug, PartialEq)]
pub struct AwqReport {
    /// Calibration tokens the activations came from.
    pub tokens: usize,
    /// One entry per decoder layer, in order.
    pub layers: Vec<LayerSearch>,
}

/// Every layer's scales and how they were found.
#[derive(Clone, Debug, PartialEq)]
pub struct AwqScales {
    /// Calibration tokens the activations came from.
    pub tokens: usize,
    /// One entry per decoder layer, in order.
    pub layers: Vec<LayerScales>,
    /// One entry per decoder layer, in order.
    pub searches: Vec<LayerSearch>,
}

/// [`CALIBRATION_TEXT`] as the model in `dir` reads it, at most `max_tokens` ids: encoded with
/// the folder's tokenizer (BOS included), or, without `tokenizer.json`, its UTF-8 bytes as ids.
///
/// Errors: `InvalidArgument` for `max_tokens < 2`, or no tokenizer and a vocabulary below 256;
/// the tokenizer's errors (`Io`, `ModelFormat`).
pub fn calibration_tokens(dir: &Path, config: &ModelConfig, max_tokens: usize) -> Result<Vec<u32>> {
    if max_tokens < 2 {
        return Err(Error::invalid_argument(format!(
            "calibration tokens: {max_tokens}, need at least 2"
        )));
    }
    let mut ids = if paths::read_model_file(dir, "tokenizer.json")?.is_some() {
        Tokenizer::from_dir(dir)?.encode(CALIBRATION_TEXT, true)?
    } else if config.vocab_size >= 256 {
        CALIBRATION_TEXT.bytes().map(u32::from).collect()
    } else {
        return Err(Error::invalid_argument(format!(
            "{}: no tokenizer and a vocabulary of {} < 256, so the calibration text's bytes \
             cannot serve as token ids",
            dir.display(),
            config.vocab_size
        )));
    };
    ids.truncate(max_tokens);
    Ok(ids)
}

/// Search every layer's scales for int4 with groups of `group`, on `tokens` cut into sequences
/// of at most `max_position_embeddings` tokens. `on_layer(i)` is called after layer `i`.
///
/// Errors: `InvalidArgument` for no tokens, an id outside the vocabulary, or a group that does
/// not divide a projection's width; `ModelFormat` for non-finite weights; `Io` when the files
/// cannot be read; `OutOfMemory`.
pub fn search(
    config: &ModelConfig,
    weights: &ModelWeights<HostTensor>,
    group: usize,
    tokens: &[u32],
    mut on_layer: impl FnMut(usize),
) -> Result<AwqScales> {
    let format = WeightFormat::Int4 { group };
    format.validate()?;
    if tokens.is_empty() {
        return Err(Error::invalid_argument("AWQ calibration: no tokens"));
    }
    if let Some(id) = tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(Error::invalid_argument(format!(
            "AWQ calibration: token {id} out of range [0, {})",
            config.vocab_size
        )));
    }
    let be = CpuBackend;
    let attn = AttnParams::from_config(config);
    let rope = Rope::new(&config.rope);
    let seq_len = config.max_position_embeddings.max(1);
    let mut spans = Vec::new();
    let mut batch = RopeBatch::new(rope.half());
    for (i, chunk) in tokens.chunks(seq_len).enumerate() {
        spans.push(SeqSpan { row: i * seq_len, len: chunk.len(), pos0: 0 });
        batch.push_positions(rope.tables(rope.regime_for_len(chunk.len())), 0..chunk.len());
    }
    // One layer's KV at a time: a pool of one-layer blocks, each span its own run of them,
    // rewritten by every layer.
    let kv_layout = KvLayout { n_layers: 1, n_kv_heads: attn.n_kv_heads, head_dim: attn.head_dim };
    let mut pool = be.new_kv_pool(&kv_layout)?;
    let mut tables = Vec::new();
    for span in &spans {
        let first = be.kv_pool_blocks(&pool);
        let n = span.len.div_ceil(KV_BLOCK_TOKENS);
        be.grow_kv_pool(&mut pool, first + n, first + n)?;
        tables.push((first as u32..(first + n) as u32).collect::<Vec<u32>>());
    }
    let table_refs: Vec<&[u32]> = tables.iter().map(Vec::as_slice).collect();
    let kv_batch = be.kv_batch(&spans, &table_refs)?;
    let rows = LinearRows::one_sequence(tokens.len());
    let ctx = LayerCtx {
        batch: &kv_batch,
        rows: &rows,
        rope: &batch,
        attn: &attn,
        eps: config.rms_norm_eps as f32,
    };
    let scale_o = attn.n_heads == attn.n_kv_heads;

    let mut residual = be.embed(&be.upload(&weights.embed_tokens)?, tokens)?; // [n, hidden]
    let mut mlp_out: Option<CpuAct> = None; // [n, hidden]
    let (mut layers, mut searches) = (Vec::new(), Vec::new());
    for (i, lw) in weights.layers.iter().enumerate() {
        let on_cpu = LayerWeights {
            input_layernorm: be.upload(&lw.input_layernorm)?,
            qkv_proj: be.upload(&lw.qkv_proj)?,
            o_proj: be.upload(&lw.o_proj)?,
            post_attention_layernorm: be.upload(&lw.post_attention_layernorm)?,
            gate_up_proj: be.upload(&lw.gate_up_proj)?,
            down_proj: be.upload(&lw.down_proj)?,
        };
        let mut inputs: [Option<CpuAct>; 4] = [None, None, None, None];
        let mut tap = |which: ProjInput, x: &CpuAct| {
            inputs[which as usize] = Some(x.clone());
            Ok(())
        };
        let out = decoder_layer(
            &be,
            &on_cpu,
            0,
            &mut residual,
            mlp_out.as_ref(),
            &mut pool,
            &ctx,
            Some(&mut tap),
        )?;
        mlp_out = Some(out);
        drop(on_cpu);
        let [Some(x_qkv), Some(x_o), Some(x_gu), Some(x_down)] = inputs else {
            return Err(Error::internal("decoder_layer skipped a projection input"));
        };
        let (qkv, qkv_s) = search_projection(&be, &lw.qkv_proj, &x_qkv, format)?;
        let o =
            if scale_o { Some(search_projection(&be, &lw.o_proj, &x_o, format)?) } else { None };
        let (gate_up, gate_up_s) = search_projection(&be, &lw.gate_up_proj, &x_gu, format)?;
        let (down, down_s) = search_projection(&be, &lw.down_proj, &x_down, format)?;
        let (o, o_s) = o.map_or((None, None), |(s, r)| (Some(s), Some(r)));
        layers.push(LayerScales { qkv, o, gate_up, down });
        searches.push(LayerSearch { qkv: qkv_s, o: o_s, gate_up: gate_up_s, down: down_s });
        on_layer(i);
    }
    Ok(AwqScales { tokens: tokens.len(), layers, searches })
}

/// The best scales for the projection `w` (`[rows, cols]`) given its inputs `x` (`[n, cols]`).
fn search_projection(
    be: &CpuBackend,
    w: &HostTensor,
    x: &CpuAct,
    format: WeightFormat,
) -> Result<(Vec<f32>, ScaleSearch)> {
    let [rows, cols] = w.shape[..] else {
        return Err(Error::internal(format!("{}: not a matrix", w.name)));
    };
    if x.cols != cols {
        return Err(Error::internal(format!("{}: input width {} != {cols}", w.name, x.cols)));
    }
    let w32 = w.to_f32_vec()?; // [rows, cols]
    let n = x.rows.max(1);
    let mut mean_abs = vec![0.0f64; cols];
    for row in x.data.chunks_exact(cols) {
        for (m, v) in mean_abs.iter_mut().zip(row) {
            *m += v.abs() as f64;
        }
    }
    let mean_abs: Vec<f32> = mean_abs.iter().map(|m| (m / n as f64) as f32).collect();
    let mut best: Option<(f32, f64, Vec<f32>)> = None;
    let mut rtn_error = f64::NAN;
    for i in 0..GRID {
        let alpha = i as f32 / GRID as f32;
        let s = scales_for(&mean_abs, alpha);
        let error = output_error(be, &w.name, &w32, rows, cols, x, &s, format)?;
        if i == 0 {
            rtn_error = error;
        }
        // Strictly smaller: ties keep the smaller α (α = 0 first).
        if best.as_ref().is_none_or(|(_, e, _)| error < *e) {
            best = Some((alpha, error, s));
        }
    }
    let (alpha, error, s) = best.ok_or_else(|| Error::internal("empty α grid"))?;
    Ok((s, ScaleSearch { alpha, error, rtn_error }))
}

/// `mean_abs^α`, floored at [`MIN_SCALE`], divided by `sqrt(max * min)`. All ones for `α = 0`.
pub(crate) fn scales_for(mean_abs: &[f32], alpha: f32) -> Vec<f32> {
    let mut s: Vec<f32> = mean_abs.iter().map(|m| m.powf(alpha).max(MIN_SCALE)).collect();
    let (lo, hi) = s.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let norm = (hi * lo).sqrt();
    if norm.is_finite() && norm > 0.0 {
        s.iter_mut().for_each(|v| *v /= norm);
    }
    s
}

/// `‖W x − Q(W diag(s)) (x / s)‖² / (n · rows)`, computed as `‖E (x / s)‖²` with
/// `E = W diag(s) − Q(W diag(s))` (the two are equal: `W x = W diag(s) (x / s)`).
#[allow(clippy::too_many_arguments)]
fn output_error(
    be: &CpuBackend,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &CpuAct,
    s: &[f32],
    format: WeightFormat,
) -> Result<f64> {
    let mut ws = w.to_vec(); // [rows, cols]
    for row in ws.chunks_exact_mut(cols) {
        row.iter_mut().zip(s).for_each(|(v, s)| *v *= s);
    }
    let q = QuantizedTensor::from_f32(name, &ws, rows, cols, format)?.dequantize();
    let bytes: Vec<u8> = ws.iter().zip(&q).flat_map(|(a, b)| (a - b).to_le_bytes()).collect();
    let e = be.upload(&HostTensor::from_bytes(name, DType::F32, vec![rows, cols], bytes)?)?;
    let mut xs = x.clone();
    for row in xs.data.chunks_exact_mut(cols) {
        row.iter_mut().zip(s).for_each(|(v, s)| *v /= s);
    }
    let y = be.linear(&xs, &e, &LinearRows::one_sequence(xs.rows))?; // [n, rows]
    let sum: f64 = y.data.iter().map(|v| (*v as f64) * (*v as f64)).sum();
    Ok(sum / (x.rows.max(1) * rows) as f64)
}

/// `w` (`[rows, cols]` row-major, `cols = col_scales.len()`) with column `c` multiplied by
/// `col_scales[c]` and each of its last `row_div.len()` rows divided by its entry of `row_div`:
/// a projection with its own scales and the next projection's `1/s` folded in.
pub(crate) fn fold_matrix(w: &mut [f32], col_scales: &[f32], row_div: &[f32]) {
    let cols = col_scales.len().max(1);
    let rows = w.len() / cols;
    let first = rows.saturating_sub(row_div.len());
    for (r, row) in w.chunks_exact_mut(cols).enumerate() {
        row.iter_mut().zip(col_scales).for_each(|(v, s)| *v *= s);
        if let Some(d) = r.checked_sub(first).and_then(|i| row_div.get(i)) {
            row.iter_mut().for_each(|v| *v /= d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_zero_is_all_ones() {
        let s = scales_for(&[0.0, 0.5, 3.0], 0.0);
        assert_eq!(s, vec![1.0; 3]);
    }

    #[test]
    fn scales_are_normalised_and_floored() {
        let s = scales_for(&[0.0, 1.0, 4.0], 1.0);
        // [1e-4, 1, 4] / sqrt(4e-4) = [0.005, 50, 200]
        assert!((s[0] - 0.005).abs() < 1e-6 && (s[1] - 50.0).abs() < 1e-3, "{s:?}");
    }

    #[test]
    fn fold_scales_columns_and_divides_rows() {
        let mut w = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [3, 2]
        fold_matrix(&mut w, &[2.0, 0.5], &[4.0, 1.0]);
        assert_eq!(w, vec![2.0, 1.0, 1.5, 0.5, 10.0, 3.0]);
    }
}
