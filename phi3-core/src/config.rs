//! `config.json` (+ `generation_config.json`) -> [`ModelConfig`].
//!
//! Field names are HF's `Phi3Config` verbatim (transformers `configuration_phi3.py`). Both config
//! formats are read: transformers 4 (top-level `rope_theta`, `rope_scaling` {type "su"|"longrope",
//! short_factor, long_factor}) and transformers 5 (`rope_parameters` {rope_type, rope_theta, ...}).
//! Either is normalised into [`RopeConfig`]. `validate()` checks every invariant the forward pass
//! relies on, so later code never re-checks shapes derived from here.
//!
//! Not here: the RoPE tables themselves (`rope.rs`) and tensor shapes (`loader/names.rs`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};

/// Largest dimension we accept from a config: far above any Phi model, far below overflow.
const MAX_DIM: usize = 1 << 20;
/// Largest context a config may declare.
const MAX_POSITIONS: usize = 1 << 24;
/// Largest parameter count a config may imply: 2^40 (1.1 trillion; Phi-3-medium has 14 billion).
/// Keeps every weight's byte size, and their sum, far from overflow, so a config of valid
/// dimensions whose products are astronomical is an error here rather than an overflow or an
/// allocation attempt later (dummy weights, tensor shapes).
pub const MAX_PARAMETERS: u64 = 1 << 40;

/// The model's architecture and generation defaults, normalised from the HF files.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Rows of the embedding table and of `lm_head`; may exceed the tokenizer's size (Phi-3:
    /// 32064 rows, 32011 ids).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer (each of gate and up).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads; query heads share them in groups (GQA). Defaults to
    /// `num_attention_heads` when config.json omits it.
    pub num_key_value_heads: usize,
    /// Dimensions per head; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// Longest sequence the model supports, in tokens: the default and upper bound of a
    /// session's context.
    pub max_position_embeddings: usize,
    /// Epsilon added to the mean square in every RMSNorm (default 1e-5).
    pub rms_norm_eps: f64,
    /// Keys at distance >= this from the query are masked (HF `sliding_window`); `None`: full causal.
    pub sliding_window: Option<usize>,
    /// The logits reuse `embed_tokens`; the checkpoint then has no `lm_head.weight`.
    pub tie_word_embeddings: bool,
    /// Rotary embedding parameters, normalised from either config format.
    pub rope: RopeConfig,
    /// Beginning-of-sequence id from config.json, else generation_config.json.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids from config.json, then generation_config.json (deduplicated).
    pub eos_token_ids: Vec<u32>,
    /// Padding id from config.json, else generation_config.json.
    pub pad_token_id: Option<u32>,
}

/// Rotary embedding parameters, whichever config format they came from.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Base of the rotary frequencies (HF `rope_theta`, default 10000).
    pub theta: f64,
    /// Number of leading dimensions of each head that rotate (`head_dim * partial_rotary_factor`).
    pub rotary_dim: usize,
    /// Frequency scaling: none, or LongRoPE.
    pub scaling: RopeScaling,
}

/// How rotary frequencies are scaled.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: inv_freq_i = theta^(-2i/d), cos/sin unscaled.
    None,
    /// LongRoPE (HF "longrope", formerly "su"): per-frequency factors, short up to
    /// `original_max_position_embeddings` tokens and long beyond, cos/sin scaled by `attention_factor`.
    LongRope {
        /// Divisors of the inverse frequencies up to the threshold, `[rotary_dim / 2]`.
        short_factor: Vec<f64>,
        /// Divisors of the inverse frequencies past the threshold, `[rotary_dim / 2]`.
        long_factor: Vec<f64>,
        /// The threshold: a sequence longer than this many tokens uses `long_factor`.
        original_max_position_embeddings: usize,
        /// Multiplies cos and sin. When config.json omits it: `sqrt(1 + ln(max / original_max)
        /// / ln(original_max))`, or 1 when `max <= original_max` (HF's Phi-3 default).
        attention_factor: f64,
    },
}

/// One id or a list of ids, as HF writes `eos_token_id`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

/// config.json as written by transformers 4 or 5 (unknown fields are ignored).
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    original_max_position_embeddings: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    tie_word_embeddings: bool,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    #[serde(default)]
    attention_bias: bool,
    bos_token_id: Option<i64>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<i64>,
}

fn default_rms_norm_eps() -> f64 {
    1e-5
}

/// generation_config.json: only the fields that affect which tokens end a generation.
#[derive(Deserialize)]
struct RawGenerationConfig {
    bos_token_id: Option<i64>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<i64>,
}

/// A model-folder file as text (`None` when absent); it must stay inside the folder.
fn read_text(dir: &Path, name: &str) -> Result<Option<String>> {
    let Some(bytes) = crate::loader::paths::read_model_file(dir, name)? else { return Ok(None) };
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|e| Error::model_format(format!("{}: not UTF-8: {e}", dir.join(name).display())))
}

impl ModelConfig {
    /// Read `config.json` and, when present, `generation_config.json` from a model folder.
    ///
    /// Errors: `Io` when a file cannot be read (config.json missing included); otherwise those
    /// of [`ModelConfig::from_json`], the message prefixed with the file's path.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        let config_path = dir.join("config.json");
        let text = read_text(dir, "config.json")?.ok_or_else(|| {
            let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
            Error::io(&config_path, missing)
        })?;
        let mut config = Self::from_json(&text).map_err(|e| e.context(config_path.display()))?;
        if let Some(text) = read_text(dir, "generation_config.json")? {
            let gen_path = dir.join("generation_config.json");
            config.merge_generation_config(&text).map_err(|e| e.context(gen_path.display()))?;
        }
        Ok(config)
    }

    /// Parse and validate the text of a config.json.
    ///
    /// Errors: `ModelFormat` for invalid JSON, a missing or mistyped field (named by its path),
    /// a negative token id or a failed [`ModelConfig::validate`]; `Unsupported` for a
    /// `model_type` other than "phi3", a `hidden_act` other than "silu", `attention_bias = true`
    /// or a rope type other than "default", "su" or "longrope".
    pub fn from_json(text: &str) -> Result<ModelConfig> {
        let raw: RawConfig = parse_json(text)?;
        let config = Self::from_raw(raw)?;
        config.validate()?;
        Ok(config)
    }

    fn from_raw(raw: RawConfig) -> Result<ModelConfig> {
        match raw.model_type.as_deref() {
            Some("phi3") => {}
            Some(other) => {
                return Err(Error::unsupported(format!(
                    "model_type \"{other}\" is not supported (expected \"phi3\")"
                )))
            }
            None => return Err(Error::model_format("model_type is missing")),
        }
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(Error::unsupported(format!(
                    "hidden_act \"{act}\" is not supported (expected \"silu\")"
                )));
            }
        }
        if raw.attention_bias {
            return Err(Error::unsupported("attention_bias = true is not supported"));
        }
        if raw.num_attention_heads == 0 {
            return Err(Error::model_format("num_attention_heads must be > 0"));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        let rope = parse_rope(&raw, head_dim)?;
        let mut eos_token_ids = Vec::new();
        push_ids(&mut eos_token_ids, raw.eos_token_id.as_ref(), "eos_token_id")?;
        Ok(ModelConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            sliding_window: raw.sliding_window,
            tie_word_embeddings: raw.tie_word_embeddings,
            rope,
            bos_token_id: opt_id(raw.bos_token_id, "bos_token_id")?,
            eos_token_ids,
            pad_token_id: opt_id(raw.pad_token_id, "pad_token_id")?,
        })
    }

    /// Merge the text of a generation_config.json (what [`ModelConfig::from_dir`] does when the
    /// file exists): its eos ids join config.json's; bos/pad fill gaps. Other fields are ignored.
    ///
    /// Errors: `ModelFormat` for invalid JSON, a mistyped field or a negative token id; `self`
    /// is unchanged on error.
    pub fn merge_generation_config(&mut self, text: &str) -> Result<()> {
        let raw: RawGenerationConfig = parse_json(text)?;
        let mut eos_token_ids = self.eos_token_ids.clone();
        push_ids(&mut eos_token_ids, raw.eos_token_id.as_ref(), "eos_token_id")?;
        let bos_token_id = match self.bos_token_id {
            Some(id) => Some(id),
            None => opt_id(raw.bos_token_id, "bos_token_id")?,
        };
        let pad_token_id = match self.pad_token_id {
            Some(id) => Some(id),
            None => opt_id(raw.pad_token_id, "pad_token_id")?,
        };
        self.eos_token_ids = eos_token_ids;
        self.bos_token_id = bos_token_id;
        self.pad_token_id = pad_token_id;
        Ok(())
    }

    /// Check every invariant the loader and the forward pass rely on.
    ///
    /// Errors: `ModelFormat` naming the first field that breaks one: a layer dimension of 0 or
    /// above 2^20, dimensions that imply more than [`MAX_PARAMETERS`] parameters,
    /// `max_position_embeddings = 0` or above 2^24, heads not a multiple of KV heads, an odd
    /// `head_dim`, `sliding_window = 0`, an epsilon or LongRoPE value that is not finite and > 0,
    /// a theta not finite and > 1, a rotary dimension that is 0, odd or above `head_dim`, or
    /// LongRoPE factor lists whose length is not `rotary_dim / 2`.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in dims {
            if value == 0 || value > MAX_DIM {
                return Err(Error::model_format(format!(
                    "{name} = {value} out of range [1, {MAX_DIM}]"
                )));
            }
        }
        match self.checked_parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => {}
            n => {
                return Err(Error::model_format(format!(
                    "the dimensions imply {} parameters, more than the limit of {MAX_PARAMETERS}",
                    n.map_or_else(|| "over 2^64".to_string(), |n| n.to_string())
                )))
            }
        }
        // 16M positions is 128x Phi-3's 128k; the bound keeps every size derived from a context
        // length (KV caches, session files) far from overflow.
        if self.max_position_embeddings == 0 || self.max_position_embeddings > MAX_POSITIONS {
            return Err(Error::model_format(format!(
                "max_position_embeddings = {} out of range [1, {MAX_POSITIONS}]",
                self.max_position_embeddings
            )));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(Error::model_format(format!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::model_format(format!("head_dim = {} must be even", self.head_dim)));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::model_format(format!(
                "rms_norm_eps = {} must be finite and > 0",
                self.rms_norm_eps
            )));
        }
        if self.sliding_window == Some(0) {
            return Err(Error::model_format("sliding_window must be > 0"));
        }
        let rope = &self.rope;
        if !(rope.theta.is_finite() && rope.theta > 1.0) {
            return Err(Error::model_format(format!(
                "rope_theta = {} must be finite and > 1",
                rope.theta
            )));
        }
        if rope.rotary_dim == 0
            || !rope.rotary_dim.is_multiple_of(2)
            || rope.rotary_dim > self.head_dim
        {
            return Err(Error::model_format(format!(
                "rotary dimension {} (head_dim x partial_rotary_factor) must be even and in [2, head_dim = {}]",
                rope.rotary_dim, self.head_dim
            )));
        }
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } = &rope.scaling
        {
            let want = rope.rotary_dim / 2;
            for (name, factors) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if factors.len() != want {
                    return Err(Error::model_format(format!(
                        "rope_scaling.{name} has {} entries, expected rotary_dim / 2 = {want}",
                        factors.len()
                    )));
                }
                if let Some((i, f)) =
                    factors.iter().enumerate().find(|(_, f)| !(f.is_finite() && **f > 0.0))
                {
                    return Err(Error::model_format(format!(
                        "rope_scaling.{name}[{i}] = {f} must be finite and > 0"
                    )));
                }
            }
            if *original_max_position_embeddings == 0 {
                return Err(Error::model_format("original_max_position_embeddings must be > 0"));
            }
            if !(attention_factor.is_finite() && *attention_factor > 0.0) {
                return Err(Error::model_format(format!(
                    "rope attention_factor = {attention_factor} must be finite and > 0"
                )));
            }
        }
        Ok(())
    }

    /// Number of query-head dimensions: `num_attention_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Number of key (or value) dimensions: `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Total parameter count, tied embeddings counted once. At most [`MAX_PARAMETERS`] for a
    /// config that passes [`ModelConfig::validate`]; `u64::MAX` for one whose count overflows.
    pub fn parameter_count(&self) -> u64 {
        self.checked_parameter_count().unwrap_or(u64::MAX)
    }

    /// The parameter count, or `None` when it (or a tensor's element count) overflows a u64.
    fn checked_parameter_count(&self) -> Option<u64> {
        let [vocab, h, inter, layers, heads, kv_heads, head_dim] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        ]
        .map(|x| x as u64);
        let q_dim = heads.checked_mul(head_dim)?;
        let kv_dim = kv_heads.checked_mul(head_dim)?;
        let qkv = kv_dim.checked_mul(2)?.checked_add(q_dim)?.checked_mul(h)?;
        let o = q_dim.checked_mul(h)?;
        let gate_up = inter.checked_mul(2)?.checked_mul(h)?;
        let down = inter.checked_mul(h)?;
        let norms = h.checked_mul(2)?;
        let per_layer = [o, gate_up, down, norms].into_iter().try_fold(qkv, u64::checked_add)?;
        let embed = vocab.checked_mul(h)?;
        let lm_head = if self.tie_word_embeddings { 0 } else { embed };
        [embed, lm_head, h].into_iter().try_fold(per_layer.checked_mul(layers)?, u64::checked_add)
    }
}

/// Deserialize JSON, naming the offending field in the error (e.g. "hidden_size: invalid type").
fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message =
            if path == "." { format!("invalid JSON: {inner}") } else { format!("{path}: {inner}") };
        Error::model_format(message).with_source(inner)
    })
}

/// Normalise the rope description of either config format.
fn parse_rope(raw: &RawConfig, head_dim: usize) -> Result<RopeConfig> {
    // transformers 5 keeps everything in rope_parameters; transformers 4 splits it between
    // top-level fields and rope_scaling. Fields found in rope_parameters win.
    let params = raw.rope_parameters.as_ref().filter(|v| !v.is_null());
    let scaling = raw.rope_scaling.as_ref().filter(|v| !v.is_null());
    for (name, value) in [("rope_parameters", params), ("rope_scaling", scaling)] {
        if let Some(v) = value {
            if !v.is_object() {
                return Err(Error::model_format(format!("{name} must be an object or null")));
            }
        }
    }
    let field =
        |key: &str| params.and_then(|p| p.get(key)).or_else(|| scaling.and_then(|s| s.get(key)));

    let theta = match field("rope_theta") {
        Some(v) => as_f64(v, "rope_parameters.rope_theta")?,
        None => raw.rope_theta.unwrap_or(10_000.0),
    };
    let partial = match field("partial_rotary_factor") {
        Some(v) => as_f64(v, "partial_rotary_factor")?,
        None => raw.partial_rotary_factor.unwrap_or(1.0),
    };
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(Error::model_format(format!(
            "partial_rotary_factor = {partial} must be in (0, 1]"
        )));
    }
    // HF: int(head_dim * partial_rotary_factor).
    let rotary_dim = (head_dim as f64 * partial) as usize;

    let rope_type = match field("rope_type").or_else(|| field("type")) {
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => {
            return Err(Error::model_format(format!("rope type must be a string, got {other}")))
        }
        None => None,
    };
    let scaling = match rope_type {
        None | Some("default") => RopeScaling::None,
        Some("longrope") | Some("su") => {
            let original_max = match field("original_max_position_embeddings") {
                Some(v) => as_usize(v, "original_max_position_embeddings")?,
                None => raw.original_max_position_embeddings.ok_or_else(|| {
                    Error::model_format("longrope needs original_max_position_embeddings")
                })?,
            };
            let factor_list = |key: &str| -> Result<Vec<f64>> {
                let v = field(key)
                    .ok_or_else(|| Error::model_format(format!("rope_scaling.{key} is missing")))?;
                let items = v.as_array().ok_or_else(|| {
                    Error::model_format(format!("rope_scaling.{key} must be a list of numbers"))
                })?;
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| as_f64(x, &format!("rope_scaling.{key}[{i}]")))
                    .collect()
            };
            let attention_factor = match field("attention_factor") {
                Some(v) if !v.is_null() => as_f64(v, "rope_scaling.attention_factor")?,
                _ => default_longrope_attention_factor(raw.max_position_embeddings, original_max),
            };
            RopeScaling::LongRope {
                short_factor: factor_list("short_factor")?,
                long_factor: factor_list("long_factor")?,
                original_max_position_embeddings: original_max,
                attention_factor,
            }
        }
        Some(other) => {
            return Err(Error::unsupported(format!(
            "rope type \"{other}\" is not supported (expected \"longrope\", \"su\" or \"default\")"
        )))
        }
    };
    Ok(RopeConfig { theta, rotary_dim, scaling })
}

/// HF `_compute_longrope_parameters`: Phi-3 derives the factor from max / original max positions.
fn default_longrope_attention_factor(max_pos: usize, original_max: usize) -> f64 {
    let factor = max_pos as f64 / original_max as f64;
    if factor <= 1.0 || original_max <= 1 {
        1.0
    } else {
        (1.0 + factor.ln() / (original_max as f64).ln()).sqrt()
    }
}

fn as_f64(v: &Value, name: &str) -> Result<f64> {
    v.as_f64().ok_or_else(|| Error::model_format(format!("{name} must be a number, got {v}")))
}

fn as_usize(v: &Value, name: &str) -> Result<usize> {
    v.as_u64().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| {
        Error::model_format(format!("{name} must be a non-negative integer, got {v}"))
    })
}

fn opt_id(id: Option<i64>, name: &str) -> Result<Option<u32>> {
    id.map(|x| {
        u32::try_from(x).map_err(|_| {
            Error::new(ErrorKind::ModelFormat, format!("{name} = {x} is not a valid token id"))
        })
    })
    .transpose()
}

fn push_ids(out: &mut Vec<u32>, ids: Option<&OneOrMany>, name: &str) -> Result<()> {
    let ids: Vec<i64> = match ids {
        None => return Ok(()),
        Some(OneOrMany::One(x)) => vec![*x],
        Some(OneOrMany::Many(xs)) => xs.clone(),
    };
    for x in ids {
        let id = opt_id(Some(x), name)?.unwrap_or_default();
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Map<String, Value> {
        serde_json::json!({
            "model_type": "phi3", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "original_max_position_embeddings": 16,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": 2, "bos_token_id": 1
        })
        .as_object()
        .cloned()
        .unwrap()
    }

    fn parse(map: serde_json::Map<String, Value>) -> Result<ModelConfig> {
        ModelConfig::from_json(&Value::Object(map).to_string())
    }

    #[test]
    fn plain_rope_defaults() {
        let c = parse(base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope.rotary_dim, 16);
        assert_eq!(c.rope.scaling, RopeScaling::None);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn longrope_v4_and_v5_formats_agree() {
        let factors: Vec<f64> = (0..8).map(|i| 1.0 + i as f64 * 0.1).collect();
        let mut v4 = base();
        v4.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "su", "short_factor": factors, "long_factor": factors}),
        );
        let mut v5 = base();
        v5.remove("rope_theta");
        v5.remove("original_max_position_embeddings");
        v5.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0,
                "original_max_position_embeddings": 16, "short_factor": factors, "long_factor": factors}),
        );
        let a = parse(v4).unwrap();
        let b = parse(v5).unwrap();
        assert_eq!(a.rope, b.rope);
        let RopeScaling::LongRope { attention_factor, .. } = a.rope.scaling else { panic!() };
        let expected = (1.0 + (4.0f64).ln() / (16.0f64).ln()).sqrt();
        assert!((attention_factor - expected).abs() < 1e-12);
    }

    #[test]
    fn errors_name_the_field() {
        let mut m = base();
        m.insert("model_type".into(), "llama".into());
        let e = parse(m).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("llama"));

        let mut m = base();
        m.insert("num_key_value_heads".into(), 3.into());
        let e = parse(m).unwrap_err();
        assert!(e.message().contains("num_key_value_heads"), "{e}");

        let mut m = base();
        m.insert("rope_scaling".into(), serde_json::json!({"type": "yarn", "factor": 2.0}));
        assert_eq!(parse(m).unwrap_err().kind(), ErrorKind::Unsupported);

        let mut m = base();
        m.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
        );
        let e = parse(m).unwrap_err();
        assert!(e.message().contains("short_factor"), "{e}");

        let e = ModelConfig::from_json("{not json").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        let mut m = base();
        m.remove("hidden_size");
        let e = parse(m).unwrap_err();
        assert!(e.message().contains("hidden_size"), "{e}");
    }

    #[test]
    fn generation_config_adds_eos_ids() {
        let mut c = parse(base()).unwrap();
        c.merge_generation_config(r#"{"eos_token_id": [2, 32000, 32007]}"#).unwrap();
        assert_eq!(c.eos_token_ids, vec![2, 32000, 32007]);
    }
}
