#!/usr/bin/env python3
"""Build tiny random Phi-3 models with HF transformers and record reference fixtures.

Run from the repository root:

    /root/oracle-venv/bin/python tests/oracle/make_fixtures.py

It (re)writes, and only writes:
    tests/fixtures/<model>/            one HF model folder per entry of SPECS (+ oracle.safetensors)
    tests/fixtures/configs/            published-shape config.json files (config-only, no weights)

Everything is deterministic (fixed seeds).  See tests/oracle/README.md for the fixture format.

The DTYPE TRAP: a transformers model cast with `.to(torch.bfloat16)` (or f16) also rounds its
RoPE inv_freq buffers, and casting it back to f32 keeps them rounded.  So reference logits are
*always* computed by a freshly constructed float32 model (attn_implementation="eager") into which
the saved, already-rounded weights are loaded (upcast to f32).  `dtype_trap_demo` measures the
error the trap would have introduced.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")

# Every greedy step must have top1 - top2 >= MIN_MARGIN (in f32 logits), so that fp accumulation
# differences in another implementation cannot flip an argmax.  The brief asks for > 1e-2; we use
# a stricter bound to leave room for bf16/f16 compute on the GPU side.
MIN_MARGIN = 0.05
# Greedy continuations must contain at least this many distinct tokens (a continuation that
# repeats one token forever tests little).
MIN_DISTINCT_GREEDY = 5
MAX_ATTEMPTS = 200

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


@dataclass
class Spec:
    name: str
    description: str
    seed: int
    dtype: str  # bf16 | f16 | f32
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    rms_norm_eps: float
    rope_theta: float
    max_pos: int
    original_max_pos: int
    longrope: bool = False
    partial_rotary_factor: float = 1.0
    tied: bool = False
    sliding_window: int | None = None
    config_format: str = "v4"  # "v4": top-level rope_theta + rope_scaling; "v5": rope_parameters
    sharded: bool = False
    seq_len: int = 32  # length of `tokens` / `logits`
    prompt_len: int = 10  # greedy prompt P
    gen_len: int = 16  # greedy continuation G
    eos_token_id: int = 2
    gen_eos_token_id: list[int] | int = 2  # generation_config.json eos (Phi-3 style list allowed)
    pad_token_id: int = 0
    extra: dict = field(default_factory=dict)  # extra config.json fields (v4 hand-written only)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


# ----------------------------------------------------------------------------------------------
# Spec table
# ----------------------------------------------------------------------------------------------
SPECS = [
    Spec(
        name="gqa-longrope-bf16",
        description="GQA 8q/2kv heads, head_dim 16, longrope (orig 16, max 64), bf16, untied, "
        "sharded into 2 safetensors files, v4 config format (rope_theta + rope_scaling)",
        seed=1000,
        dtype="bf16",
        vocab=384,
        hidden=128,
        layers=2,
        heads=8,
        kv_heads=2,
        intermediate=112,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_pos=64,
        original_max_pos=16,
        longrope=True,
        sharded=True,
        seq_len=40,
        gen_eos_token_id=[2, 7],
        # Published 128k Phi-3 configs carry a sliding_window larger than any sequence; so do we:
        # it must have no effect here.
        sliding_window=128,
    ),
    Spec(
        name="mha-f32-tied",
        description="MHA 4 heads (kv == heads), head_dim 16, default RoPE theta 10000, "
        "tie_word_embeddings (no lm_head.weight), f32, v4 config format with rope_scaling null",
        seed=2000,
        dtype="f32",
        vocab=320,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=4,
        intermediate=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_pos=64,
        original_max_pos=64,
        tied=True,
        seq_len=32,
    ),
    Spec(
        name="partial-rotary-f16",
        description="GQA 4q/2kv heads, head_dim 32, partial_rotary_factor 0.5 (rotary dim 16, "
        "Phi-4-mini style), longrope (orig 16, max 64), f16, untied, 3 layers, "
        "v5 config format (rope_parameters, as written by transformers 5 save_pretrained)",
        seed=3000,
        dtype="f16",
        vocab=288,
        hidden=128,
        layers=3,
        heads=4,
        kv_heads=2,
        intermediate=96,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_pos=64,
        original_max_pos=16,
        longrope=True,
        partial_rotary_factor=0.5,
        config_format="v5",
        seq_len=40,
    ),
    Spec(
        name="sliding-window-f32",
        description="GQA 4q/2kv heads, head_dim 16, sliding_window 8 (HF applies it: query i sees "
        "keys j with i-8 < j <= i), default RoPE theta 5000, f32, untied, "
        "v5 config format (rope_parameters rope_type default)",
        seed=4000,
        dtype="f32",
        vocab=256,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=96,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        max_pos=64,
        original_max_pos=64,
        sliding_window=8,
        config_format="v5",
        seq_len=24,
    ),
]


# ----------------------------------------------------------------------------------------------
# Config writing
# ----------------------------------------------------------------------------------------------
def rope_factors(spec: Spec, gen: torch.Generator) -> tuple[list[float], list[float]]:
    """Distinct, non-trivial, ascending short (in [1, 1.5]) and long (in [1, 8]) factors."""
    n = spec.rotary_dim // 2
    u = torch.rand(n, generator=gen, dtype=torch.float64).sort().values
    v = torch.rand(n, generator=gen, dtype=torch.float64).sort().values
    short = [round(1.0 + 0.5 * float(x), 4) for x in u]
    long = [round(1.0 + 7.0 * float(x) ** 2, 4) for x in v]
    return short, long


def v4_config_dict(spec: Spec, short, long) -> dict:
    """Phi-3 config.json as published on the Hub (transformers-4 format)."""
    cfg = {
        "_name_or_path": f"phi3-rs-oracle/{spec.name}",
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embd_pdrop": 0.0,
        "eos_token_id": spec.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": spec.max_pos,
        "model_type": "phi3",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "original_max_position_embeddings": spec.original_max_pos,
        "pad_token_id": spec.pad_token_id,
        "resid_pdrop": 0.0,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": (
            {"long_factor": long, "short_factor": short, "type": "longrope"} if spec.longrope else None
        ),
        "rope_theta": spec.rope_theta,
        "sliding_window": spec.sliding_window,
        "tie_word_embeddings": spec.tied,
        "torch_dtype": DTYPE_NAMES[spec.dtype],
        "use_cache": True,
        "vocab_size": spec.vocab,
    }
    if spec.partial_rotary_factor != 1.0:
        cfg["partial_rotary_factor"] = spec.partial_rotary_factor
    cfg.update(spec.extra)
    return cfg


def v5_config(spec: Spec, short, long) -> Phi3Config:
    """Build a Phi3Config the transformers-5 way; its save_pretrained output is the fixture."""
    rope = {"rope_type": "longrope" if spec.longrope else "default", "rope_theta": spec.rope_theta}
    if spec.longrope:
        rope["short_factor"] = short
        rope["long_factor"] = long
    if spec.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = spec.partial_rotary_factor
    cfg = Phi3Config(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_pos,
        original_max_position_embeddings=spec.original_max_pos,
        rms_norm_eps=spec.rms_norm_eps,
        rope_parameters=rope,
        partial_rotary_factor=spec.partial_rotary_factor,
        sliding_window=spec.sliding_window,
        tie_word_embeddings=spec.tied,
        bos_token_id=1,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
    )
    cfg.architectures = ["Phi3ForCausalLM"]
    cfg.dtype = DTYPES[spec.dtype]
    return cfg


def write_configs(spec: Spec, out: str, short, long) -> None:
    if spec.config_format == "v4":
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(v4_config_dict(spec, short, long), f, indent=2, sort_keys=False)
            f.write("\n")
    elif spec.config_format == "v5":
        if not transformers.__version__.startswith("5."):
            # transformers 4 would write the v4 format; keep the fixture honest about that.
            raise RuntimeError("v5 config format requested but transformers is not 5.x")
        v5_config(spec, short, long).save_pretrained(out)
    else:
        raise ValueError(spec.config_format)
    GenerationConfig(
        bos_token_id=1, eos_token_id=spec.gen_eos_token_id, pad_token_id=spec.pad_token_id
    ).save_pretrained(out)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
def make_weights(spec: Spec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights with HF names, rounded to (and returned in) the target dtype.

    qkv_proj.weight rows: [Q (heads*hd) | K (kv*hd) | V (kv*hd)]; gate_up_proj.weight rows:
    [gate (I) | up (I)], and the MLP computes down(up * silu(gate)).
    """
    dt = DTYPES[spec.dtype]
    h, hd, i = spec.hidden, spec.head_dim, spec.intermediate

    def lin(out_f, in_f, gain=1.5):
        return torch.randn(out_f, in_f, generator=gen) * (gain / math.sqrt(in_f))

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    w = {"model.embed_tokens.weight": torch.randn(spec.vocab, h, generator=gen)}
    for l in range(spec.layers):
        p = f"model.layers.{l}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.qkv_proj.weight"] = lin((spec.heads + 2 * spec.kv_heads) * hd, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, spec.heads * hd)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_up_proj.weight"] = lin(2 * i, h)
        w[p + "mlp.down_proj.weight"] = lin(h, i)
    w["model.norm.weight"] = norm(h)
    if not spec.tied:
        w["lm_head.weight"] = lin(spec.vocab, h, gain=3.0)
    return {k: v.to(dt).contiguous() for k, v in w.items()}


def save_weights(spec: Spec, out: str, w: dict[str, torch.Tensor]) -> None:
    meta = {"format": "pt"}
    if not spec.sharded:
        save_file(w, os.path.join(out, "model.safetensors"), metadata=meta)
        return
    # Shard 1: embeddings + first half of the layers; shard 2: the rest, final norm, lm_head.
    half = spec.layers // 2
    names = list(w.keys())

    def shard_of(n):
        if n == "model.embed_tokens.weight":
            return 1
        if n.startswith("model.layers."):
            return 1 if int(n.split(".")[2]) < half else 2
        return 2

    files = {1: "model-00001-of-00002.safetensors", 2: "model-00002-of-00002.safetensors"}
    weight_map = {}
    for s in (1, 2):
        part = {n: w[n] for n in names if shard_of(n) == s}
        save_file(part, os.path.join(out, files[s]), metadata=meta)
        weight_map.update({n: files[s] for n in part})
    total = sum(t.numel() * t.element_size() for t in w.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_safetensors_sorted(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Byte-reproducible safetensors writer (the safetensors library writes metadata keys in
    random order, which makes regenerated files differ byte-wise).  Same format: u64 LE header
    length, JSON header (space padded to 8 bytes), then the raw little-endian tensor data."""
    header = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, off = [], 0
    # Largest element size first (as the safetensors library does) so every tensor stays aligned.
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        t = tensors[name].contiguous().cpu()
        raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)
    back = load_file(path)  # round-trip check with the real library
    assert all(torch.equal(back[k], tensors[k]) for k in tensors) and set(back) == set(tensors)


def read_weights(out: str) -> dict[str, torch.Tensor]:
    idx = os.path.join(out, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    w = {}
    for fn in files:
        w.update(load_file(os.path.join(out, fn)))
    return w


# ----------------------------------------------------------------------------------------------
# Reference model (f32, eager, freshly constructed)
# ----------------------------------------------------------------------------------------------
def load_reference(out: str, spec: Spec) -> Phi3ForCausalLM:
    """The reference: HF loads the fixture folder as float32 (eager attention).

    Cross-checked against a model built from the config with Phi3ForCausalLM(config) into which
    the saved weights are loaded by hand (upcast to f32): logits must be bit-identical.
    """
    model = Phi3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32

    # --- manual construction cross-check ---
    cfg = Phi3Config.from_pretrained(out)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    manual = Phi3ForCausalLM(cfg).to(torch.float32).eval()
    sd = {k: v.to(torch.float32) for k, v in read_weights(out).items()}
    missing, unexpected = manual.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if spec.tied else set()), missing
    if spec.tied:
        assert manual.lm_head.weight.data_ptr() == manual.model.embed_tokens.weight.data_ptr()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(3, 3 + min(spec.seq_len, spec.max_pos))[None] % spec.vocab
    with torch.no_grad():
        a = model(ids).logits
        b = manual(ids).logits
    assert torch.equal(a, b), f"from_pretrained vs manual mismatch: {(a - b).abs().max()}"

    # Check that HF read the config the way we meant it.
    rp = model.config.rope_parameters
    assert rp["rope_type"] == ("longrope" if spec.longrope else "default"), rp
    assert float(rp["rope_theta"]) == spec.rope_theta, rp
    assert float(rp.get("partial_rotary_factor", 1.0)) == spec.partial_rotary_factor, rp
    if spec.longrope:
        assert rp["original_max_position_embeddings"] == spec.original_max_pos, rp
    assert model.config.sliding_window == spec.sliding_window
    return model


@torch.no_grad()
def last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids[None]).logits[0, -1].float()


@torch.no_grad()
def prefix_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Row i = last-position logits of a full forward (no cache) of tokens[:i+1]."""
    return torch.stack([last_logits(model, tokens[: i + 1]) for i in range(len(tokens))])


@torch.no_grad()
def greedy_full_forward(model, prompt: torch.Tensor, n: int):
    """Greedy without KV cache: re-run the whole sequence each step."""
    ids = prompt.clone()
    toks, margins = [], []
    for _ in range(n):
        lg = last_logits(model, ids)
        top = torch.topk(lg, 2)
        toks.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        ids = torch.cat([ids, top.indices[:1]])
    return torch.tensor(toks, dtype=torch.int64), torch.tensor(margins, dtype=torch.float32)


@torch.no_grad()
def hf_generate(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(
        prompt[None],
        attention_mask=torch.ones_like(prompt)[None],
        do_sample=False,
        max_new_tokens=n,
    )
    return out[0, len(prompt) :]


# ----------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def dtype_trap_demo(out: str, spec: Spec, ref, tokens) -> str:
    """Measure the trap: (a) from_pretrained in the low dtype then .float(); (b) the f32 reference
    cast with .to(low dtype) and back to f32 (this one rounds the RoPE buffers)."""
    if spec.dtype == "f32":
        return ""
    low = DTYPES[spec.dtype]
    a = Phi3ForCausalLM.from_pretrained(out, dtype=low, attn_implementation="eager")
    a_buf = str(a.model.rotary_emb.original_inv_freq.dtype)
    a = a.to(torch.float32).eval()
    b = copy.deepcopy(ref).to(low).to(torch.float32).eval()
    if hasattr(b.model.rotary_emb, "long_inv_freq"):
        del b.model.rotary_emb.long_inv_freq  # plain attribute: recomputed in f32 on next long forward
    lens = sorted({min(8, len(tokens)), spec.original_max_pos, len(tokens)})
    parts = []
    for tag, m in (("from_pretrained(low).float()", a), (".to(low).to(f32)", b)):
        inv = (ref.model.rotary_emb.original_inv_freq - m.model.rotary_emb.original_inv_freq.float()).abs().max().item()
        ds = [(n, (last_logits(ref, tokens[:n]) - last_logits(m, tokens[:n])).abs().max().item()) for n in lens]
        parts.append(
            f"{tag}: max|d inv_freq(short)| {inv:.3e}, max|d logits| "
            + ", ".join(f"L={n}: {d:.3e}" for n, d in ds)
        )
    s = f"  dtype trap ({DTYPE_NAMES[spec.dtype]}; from_pretrained keeps RoPE buffers in {a_buf}): " + "; ".join(parts)
    print(s)
    return s


@torch.no_grad()
def sliding_window_check(out: str, spec: Spec, ref, tokens) -> str:
    """Verify empirically that HF applies sliding_window and which keys a query sees."""
    w = spec.sliding_window
    res = ref(tokens[None], output_attentions=True)
    L = len(tokens)
    q = torch.arange(L)[:, None]
    k = torch.arange(L)[None, :]
    expected = (k <= q) & (k > q - w)
    for layer_attn in res.attentions:
        seen = layer_attn[0] > 0  # [heads, L, L]
        assert torch.equal(seen, expected.expand_as(seen)), "sliding-window pattern differs from i-w < j <= i"
    # Same weights without the window: logits must agree for i < w and differ after.
    cfg = Phi3Config.from_pretrained(out)
    cfg.sliding_window = None
    cfg._attn_implementation = "eager"
    nowin = Phi3ForCausalLM(cfg).eval()
    nowin.load_state_dict({k2: v.float() for k2, v in read_weights(out).items()}, strict=not spec.tied)
    a = ref(tokens[None]).logits[0]
    b = nowin(tokens[None]).logits[0]
    d = (a - b).abs().amax(-1)
    assert d[:w].max() == 0, d
    assert d[w:].min() > 1e-3, d
    s = (
        f"  sliding window: query i attends keys j with i-{w} < j <= i ({w} keys incl. itself), "
        f"verified on attention probabilities of every layer; logits vs no-window: rows <{w} identical, "
        f"rows >={w} differ by >= {d[w:].min():.3e}"
    )
    print(s)
    return s


@torch.no_grad()
def longrope_check(spec: Spec, ref, tokens, logits) -> str:
    """Show that a single forward over all tokens differs from per-prefix forwards for short prefixes."""
    full = ref(tokens[None]).logits[0]
    o = spec.original_max_pos
    d_short = (full[:o] - logits[:o]).abs().max().item()
    d_long = (full[o:] - logits[o:]).abs().max().item()
    s = (
        f"  longrope: one {len(tokens)}-token forward vs per-prefix forwards: rows <{o} differ by "
        f"{d_short:.3e} (long vs short factors), rows >={o} by {d_long:.3e} (fp noise)"
    )
    print(s)
    return s


# ----------------------------------------------------------------------------------------------
# One model
# ----------------------------------------------------------------------------------------------
def build_one(spec: Spec) -> dict:
    out = os.path.join(FIXTURES, spec.name)
    for attempt in range(MAX_ATTEMPTS):
        seed = spec.seed + attempt
        gen = torch.Generator().manual_seed(seed)
        short, long = rope_factors(spec, gen) if spec.longrope else (None, None)
        weights = make_weights(spec, gen)
        tokens = torch.randint(3, spec.vocab, (spec.seq_len,), generator=gen, dtype=torch.int64)

        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        write_configs(spec, out, short, long)
        save_weights(spec, out, weights)
        model = load_reference(out, spec)

        prompt = tokens[: spec.prompt_len].clone()
        g_toks, g_margin = greedy_full_forward(model, prompt, spec.gen_len)
        eos = spec.gen_eos_token_id if isinstance(spec.gen_eos_token_id, list) else [spec.gen_eos_token_id]
        bad = set(eos) | {spec.eos_token_id, spec.pad_token_id}
        ok = (
            g_margin.min().item() >= MIN_MARGIN
            and not (set(g_toks.tolist()) & bad)
            and len(set(g_toks.tolist())) >= MIN_DISTINCT_GREEDY
        )
        if ok:
            break
        print(
            f"  seed {seed} rejected: min margin {g_margin.min().item():.4f}, "
            f"distinct {len(set(g_toks.tolist()))}, eos/pad hit {bool(set(g_toks.tolist()) & bad)}"
        )
    else:
        raise RuntimeError(f"{spec.name}: no acceptable seed in {MAX_ATTEMPTS} attempts")

    logits = prefix_logits(model, tokens)
    assert torch.equal(logits[spec.prompt_len - 1].argmax(), g_toks[0])

    with torch.no_grad():
        logits_full = model(tokens[None]).logits[0].float().contiguous()

    # HF generate (KV cache) vs full-forward greedy.
    gen_toks = hf_generate(model, prompt, spec.gen_len)
    gen_match = torch.equal(gen_toks, g_toks)

    notes = []
    if spec.longrope:
        notes.append(longrope_check(spec, model, tokens, logits))
    if spec.sliding_window is not None and spec.sliding_window < spec.seq_len:
        notes.append(sliding_window_check(out, spec, model, tokens))
    notes.append(dtype_trap_demo(out, spec, model, tokens))

    rot = model.model.rotary_emb
    tensors = {
        "tokens": tokens.contiguous(),
        "logits": logits.contiguous(),
        "greedy_prompt": prompt.contiguous(),
        "greedy_tokens": g_toks.contiguous(),
        "greedy_margin": g_margin.contiguous(),
        "rope_attention_scaling": torch.tensor([rot.attention_scaling], dtype=torch.float32),
    }
    if spec.longrope:
        # One forward over all tokens uses the long factors for every position (differs from `logits`
        # for rows < original_max); without longrope it equals `logits`, so it is not stored.
        tensors["logits_full_forward"] = logits_full
    else:
        assert torch.allclose(logits_full, logits, atol=1e-4, rtol=1e-5), (logits_full - logits).abs().max()
    if spec.longrope:
        # original_inv_freq = short factors; long_inv_freq is set by the first forward > original_max.
        tensors["rope_inv_freq_short"] = rot.original_inv_freq.detach().float().contiguous()
        tensors["rope_inv_freq_long"] = rot.long_inv_freq.detach().float().contiguous()
    else:
        tensors["rope_inv_freq"] = rot.inv_freq.detach().float().contiguous()
    if not gen_match:
        tensors["hf_generate_tokens"] = gen_toks.contiguous()

    meta = {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "safetensors_version": safetensors.__version__,
        "seed": str(seed),
        "description": spec.description,
        "config_format": spec.config_format,
        "weights_dtype": DTYPE_NAMES[spec.dtype],
        "reference_compute": "float32, attn_implementation=eager, from_pretrained(dtype=float32)",
        "logits": "row i = last-position logits of a full no-cache forward of tokens[:i+1]",
        "logits_full_forward": (
            "row i = position-i logits of ONE no-cache forward of all tokens"
            if spec.longrope
            else "not stored: equals logits (max |diff| %.3e)" % (logits_full - logits).abs().max().item()
        ),
        "greedy": "greedy_tokens = argmax continuation of greedy_prompt by repeated full no-cache forwards",
        "min_greedy_margin": repr(g_margin.min().item()),
        "hf_generate_matches_full_forward_greedy": str(gen_match),
        "rope_attention_scaling_f64": repr(float(rot.attention_scaling)),
    }
    write_safetensors_sorted(os.path.join(out, "oracle.safetensors"), tensors, meta)
    print(
        f"{spec.name}: seed {seed}, min greedy margin {g_margin.min().item():.4f}, "
        f"HF generate == full-forward greedy: {gen_match}, attention scaling {rot.attention_scaling!r}"
    )
    return {"name": spec.name, "seed": seed, "min_margin": g_margin.min().item(), "gen_match": gen_match, "notes": notes}


# ----------------------------------------------------------------------------------------------
# Config-only fixtures with published shapes
# ----------------------------------------------------------------------------------------------
def approx_factors(n: int, short_top: float, long_top: float) -> tuple[list[float], list[float]]:
    """Plausible ascending factor curves (NOT the published values; only the length matters)."""
    t = np.linspace(0.0, 1.0, n)
    short = 1.0 + (short_top - 1.0) * t**2
    s = t * t * (3 - 2 * t)  # smoothstep
    long = 1.0 + (long_top - 1.0) * s
    return [round(float(x), 4) for x in short], [round(float(x), 4) for x in long]


def published_configs() -> dict[str, dict]:
    auto_map = {
        "AutoConfig": "configuration_phi3.Phi3Config",
        "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
    }

    def base(**kw):
        d = {
            "architectures": ["Phi3ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "embd_pdrop": 0.0,
            "eos_token_id": 32000,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "model_type": "phi3",
            "pad_token_id": 32000,
            "resid_pdrop": 0.0,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": 32064,
        }
        d.update(kw)
        return dict(sorted(d.items()))

    s48, l48 = approx_factors(48, 2.84, 64.84)
    s64, l64 = approx_factors(64, 2.5, 64.0)
    s48b, l48b = approx_factors(48, 3.0, 60.0)
    return {
        "Phi-3-mini-4k-instruct": base(
            _name_or_path="Phi-3-mini-4k-instruct", auto_map=auto_map, attention_bias=False,
            hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
            rope_scaling=None, sliding_window=2047,
        ),
        "Phi-3-mini-128k-instruct": base(
            _name_or_path="Phi-3-mini-128k-instruct", auto_map=auto_map, attention_bias=False,
            hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=131072, original_max_position_embeddings=4096,
            rope_scaling={"long_factor": l48, "short_factor": s48, "type": "longrope"}, sliding_window=262144,
        ),
        "Phi-3-medium-128k-instruct": base(
            _name_or_path="Phi-3-medium-128k-instruct", auto_map=auto_map, attention_bias=False,
            hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
            num_key_value_heads=10, max_position_embeddings=131072, original_max_position_embeddings=4096,
            rope_scaling={"long_factor": l64, "short_factor": s64, "type": "longrope"}, sliding_window=131072,
        ),
        "Phi-3.5-mini-instruct": base(
            _name_or_path="Phi-3.5-mini-instruct", auto_map=auto_map, attention_bias=False,
            hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=131072, original_max_position_embeddings=4096,
            rope_scaling={"long_factor": l48b, "short_factor": s48b, "type": "longrope"}, sliding_window=262144,
        ),
        "Phi-4": base(
            hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
            num_key_value_heads=10, max_position_embeddings=16384, original_max_position_embeddings=16384,
            rope_scaling=None, rope_theta=250000, sliding_window=None, vocab_size=100352,
            bos_token_id=100257, eos_token_id=100265, pad_token_id=100349,
        ),
        "Phi-4-mini-instruct": base(
            _name_or_path="Phi4mini", auto_map=auto_map, attention_bias=False, full_attn_mod=1,
            lm_head_bias=False, mlp_bias=False, hidden_size=3072, intermediate_size=8192,
            num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
            max_position_embeddings=131072, original_max_position_embeddings=4096,
            partial_rotary_factor=0.75,
            rope_scaling={"long_factor": l48b, "short_factor": s48, "type": "longrope"},
            sliding_window=262144, tie_word_embeddings=True, vocab_size=200064,
            bos_token_id=199999, eos_token_id=199999, pad_token_id=199999,
        ),
    }


def build_configs() -> list[str]:
    out = os.path.join(FIXTURES, "configs")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    lines = []
    for name, cfg in published_configs().items():
        path = os.path.join(out, f"{name}.config.json")
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        c = Phi3Config.from_pretrained(path)  # must be accepted (validates factor lengths)
        rp = c.rope_parameters
        hd = c.hidden_size // c.num_attention_heads
        nf = len(rp.get("short_factor") or [])
        line = (
            f"  {name}: accepted by Phi3Config; head_dim {hd}, rope_type {rp['rope_type']}, "
            f"partial_rotary_factor {rp.get('partial_rotary_factor')}, factors {nf}, "
            f"sliding_window {c.sliding_window}"
        )
        print(line)
        lines.append(line)
    return lines


def main() -> int:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, safetensors {safetensors.__version__}")
    if len(sys.argv) > 1:
        only = set(sys.argv[1:])
        specs = [s for s in SPECS if s.name in only]
    else:
        specs = SPECS
    results = [build_one(s) for s in specs]
    if len(sys.argv) <= 1 or "configs" in sys.argv[1:]:
        build_configs()
    for r in results:
        print(f"{r['name']}: seed {r['seed']} min margin {r['min_margin']:.4f} generate==greedy {r['gen_match']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
