//! HF state-dict names of Phi3ForCausalLM and the shape each tensor must have.
//!
//! Names mirror `modeling_phi3.py` module paths (`model.layers.{i}.self_attn.qkv_proj.weight`).
//! Shapes are `nn.Linear` weights: [out_features, in_features].

use crate::config::ModelConfig;

/// Token embeddings, `[vocab, hidden]`.
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// Final RMSNorm weight, `[hidden]`.
pub const FINAL_NORM: &str = "model.norm.weight";
/// Output projection, `[vocab, hidden]`; absent when the embeddings are tied.
pub const LM_HEAD: &str = "lm_head.weight";

/// Prefix of layer `i`'s tensors.
fn layer(i: usize) -> String {
    format!("model.layers.{i}")
}

/// Layer `i`'s RMSNorm weight before attention, `[hidden]`.
pub fn input_layernorm(i: usize) -> String {
    format!("{}.input_layernorm.weight", layer(i))
}
/// Layer `i`'s fused query/key/value projection, `[q_dim + 2 * kv_dim, hidden]`.
pub fn qkv_proj(i: usize) -> String {
    format!("{}.self_attn.qkv_proj.weight", layer(i))
}
/// Layer `i`'s attention output projection, `[hidden, q_dim]`.
pub fn o_proj(i: usize) -> String {
    format!("{}.self_attn.o_proj.weight", layer(i))
}
/// Layer `i`'s RMSNorm weight before the MLP, `[hidden]`.
pub fn post_attention_layernorm(i: usize) -> String {
    format!("{}.post_attention_layernorm.weight", layer(i))
}
/// Layer `i`'s fused gate/up projection, `[2 * intermediate, hidden]`.
pub fn gate_up_proj(i: usize) -> String {
    format!("{}.mlp.gate_up_proj.weight", layer(i))
}
/// Layer `i`'s MLP output projection, `[hidden, intermediate]`.
pub fn down_proj(i: usize) -> String {
    format!("{}.mlp.down_proj.weight", layer(i))
}

/// Every tensor the forward pass reads, with its expected shape, in load order.
pub fn expected_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = c.hidden_size;
    let mut out = vec![(EMBED_TOKENS.to_string(), vec![c.vocab_size, h])];
    for i in 0..c.num_hidden_layers {
        out.push((input_layernorm(i), vec![h]));
        out.push((qkv_proj(i), vec![c.q_dim() + 2 * c.kv_dim(), h]));
        out.push((o_proj(i), vec![h, c.q_dim()]));
        out.push((post_attention_layernorm(i), vec![h]));
        out.push((gate_up_proj(i), vec![2 * c.intermediate_size, h]));
        out.push((down_proj(i), vec![h, c.intermediate_size]));
    }
    out.push((FINAL_NORM.to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push((LM_HEAD.to_string(), vec![c.vocab_size, h]));
    }
    out
}
