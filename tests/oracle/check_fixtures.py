#!/usr/bin/env python3
"""Independent float64 NumPy re-implementation of the Phi-3 forward, used to check that the
fixtures mean what tests/oracle/README.md says they mean.  It reads only the fixture files
(config.json in either format, safetensors shards) -- no transformers -- so it doubles as a
compact executable spec for the Rust implementation.

    /root/oracle-venv/bin/python tests/oracle/check_fixtures.py

(torch is used only to read bf16 safetensors, which NumPy cannot represent.)
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
from safetensors.torch import load_file

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
MODELS = ["gqa-longrope-bf16", "mha-f32-tied", "partial-rotary-f16", "sliding-window-f32"]


def load_model(d: str):
    cfg = json.load(open(os.path.join(d, "config.json")))
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    w = {}
    for f in files:
        w.update({k: v.double().numpy() for k, v in load_file(os.path.join(d, f)).items()})
    return cfg, w


def rope_params(cfg: dict) -> dict:
    """Accept both the transformers-4 (rope_theta + rope_scaling) and -5 (rope_parameters) formats."""
    rp = cfg.get("rope_parameters") or {}
    rs = cfg.get("rope_scaling") or {}
    scaling = rp or rs
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "su" or kind == "yarn":  # legacy names HF maps to longrope for Phi-3
        kind = "longrope"
    return {
        "type": kind,
        "theta": float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        "partial": float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))),
        "short": scaling.get("short_factor"),
        "long": scaling.get("long_factor"),
        "orig": int(cfg.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings")
                    or cfg["max_position_embeddings"]),
        "max": int(cfg["max_position_embeddings"]),
    }


def inv_freq_f32(theta: float, rot: int, factors) -> np.ndarray:
    """HF's formula in float32: exponent 2i/rot in f32, pow rounded to f32, f32 multiply by the
    factor, f32 reciprocal.  torch's f32 pow is not correctly rounded (within 1 ulp of it), so a
    correctly rounded pow (here: f64 pow, then round) may differ from torch by 1 ulp in ~1% of
    entries; the oracle stores torch's exact tables."""
    shape = np.arange(0, rot, 2, dtype=np.int64).astype(np.float32) / np.float32(rot)
    base = np.power(np.float64(theta), shape.astype(np.float64)).astype(np.float32)
    f = np.ones(rot // 2, np.float32) if factors is None else np.asarray(factors, dtype=np.float32)
    return (np.float32(1.0) / (f * base)).astype(np.float32)


def forward(cfg, w, tokens: np.ndarray) -> np.ndarray:
    """Logits for every position of ONE no-cache forward over `tokens`."""
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = D // H
    I = cfg["intermediate_size"]
    eps = cfg["rms_norm_eps"]
    win = cfg.get("sliding_window")
    rp = rope_params(cfg)
    rot = int(hd * rp["partial"])
    L = len(tokens)

    if rp["type"] == "longrope":
        # Factor set chosen by the LENGTH of this forward (max position + 1) vs original_max.
        factors = rp["long"] if L > rp["orig"] else rp["short"]
        scale = rp["max"] / rp["orig"]
        af = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(rp["orig"]))
    else:
        factors, af = None, 1.0
    inv = inv_freq_f32(rp["theta"], rot, factors).astype(np.float64)
    ang = np.arange(L)[:, None] * inv[None, :]  # [L, rot/2]
    cos = np.concatenate([np.cos(ang)] * 2, -1) * af  # [L, rot], attention factor on cos AND sin
    sin = np.concatenate([np.sin(ang)] * 2, -1) * af

    def rope(x):  # x [heads, L, hd]; rotate the first `rot` dims (rotate_half pairs i, i+rot/2)
        xr, xp = x[..., :rot], x[..., rot:]
        half = rot // 2
        rh = np.concatenate([-xr[..., half:], xr[..., :half]], -1)
        return np.concatenate([xr * cos + rh * sin, xp], -1)

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    i_idx, j_idx = np.arange(L)[:, None], np.arange(L)[None, :]
    allowed = j_idx <= i_idx
    if win is not None:
        allowed &= j_idx > i_idx - win

    x = w["model.embed_tokens.weight"][tokens]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, w[p + "input_layernorm.weight"])
        qkv = h @ w[p + "self_attn.qkv_proj.weight"].T
        q = qkv[:, : H * hd].reshape(L, H, hd).transpose(1, 0, 2)
        k = qkv[:, H * hd : (H + KV) * hd].reshape(L, KV, hd).transpose(1, 0, 2)
        v = qkv[:, (H + KV) * hd :].reshape(L, KV, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        rep = H // KV  # query head h uses kv head h // rep
        k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.where(allowed, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(L, H * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gu = h @ w[p + "mlp.gate_up_proj.weight"].T
        gate, up = gu[:, :I], gu[:, I:]
        x = x + (up * gate / (1 + np.exp(-gate))) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])  # tied when absent
    return x @ head.T


def check(name: str) -> bool:
    d = os.path.join(FIXTURES, name)
    cfg, w = load_model(d)
    o = {k: v.numpy() for k, v in load_file(os.path.join(d, "oracle.safetensors")).items()}
    tokens = o["tokens"]
    ok = True

    ref = o["logits"].astype(np.float64)
    mine = np.stack([forward(cfg, w, tokens[: i + 1])[-1] for i in range(len(tokens))])
    err = np.abs(mine - ref).max()
    rel = err / np.abs(ref).max()
    ok &= rel < 1e-4
    msg = f"{name}: per-prefix logits max|diff| {err:.2e} (rel {rel:.1e})"
    if "logits_full_forward" in o:
        full = forward(cfg, w, tokens)
        e2 = np.abs(full - o["logits_full_forward"]).max()
        ok &= e2 / np.abs(ref).max() < 1e-4
        msg += f", full-forward {e2:.2e}"

    ids = list(o["greedy_prompt"])
    for t in o["greedy_tokens"]:
        nxt = int(np.argmax(forward(cfg, w, np.array(ids))[-1]))
        ok &= nxt == int(t)
        ids.append(nxt)
    msg += f", greedy {'ok' if list(ids[len(o['greedy_prompt']):]) == list(o['greedy_tokens']) else 'MISMATCH'}"

    rp = rope_params(cfg)
    rot = int(cfg["hidden_size"] // cfg["num_attention_heads"] * rp["partial"])
    if rp["type"] == "longrope":
        for kind in ("short", "long"):
            mine_if = inv_freq_f32(rp["theta"], rot, rp[kind])
            ulps = np.abs(mine_if.view(np.int32) - o[f"rope_inv_freq_{kind}"].view(np.int32)).max()
            msg += f", inv_freq_{kind} max ulp diff {ulps}"
    else:
        mine_if = inv_freq_f32(rp["theta"], rot, None)
        msg += f", inv_freq max ulp diff {np.abs(mine_if.view(np.int32) - o['rope_inv_freq'].view(np.int32)).max()}"
    print(("OK   " if ok else "FAIL ") + msg)
    return bool(ok)


def main() -> int:
    results = [check(n) for n in MODELS]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
