#!/usr/bin/env python3
"""Record HF's processed next-token distributions for phi3-core's sampler parity test.

Run from the repository root (needs torch and transformers >= 5; no model files):

    /root/oracle-venv/bin/python tests/oracle/make_sampler_fixtures.py

Writes tests/fixtures/sampler/hf_processors.json, checked by phi3-core/tests/sampler_parity.rs.
The run is deterministic: two runs write byte-identical files.

Reference: transformers' own processor classes, in the list and order that
`GenerationMixin._get_logits_processor` builds for `do_sample=True` (generation/utils.py):
RepetitionPenaltyLogitsProcessor -> TemperatureLogitsWarper -> TopKLogitsWarper ->
TopPLogitsWarper -> MinPLogitsWarper, then `softmax(dim=-1)` in float32 as `_sample` does before
`torch.multinomial`. The list is taken from a tiny `Phi3ForCausalLM`'s `_get_logits_processor`, so the
order and the skip rules (temperature 1.0, top_k 0, top_p 1.0 and min_p 0/None add no processor) are
HF's, not ours.

Our conventions applied before the processors (HF has none of these):
* ids >= `limit` (ids the tokenizer cannot decode, e.g. Phi-3's padding rows) are set to -inf first.
* option values are float32 values (SamplerOptions holds f32), passed to HF as the Python float of
  that f32, so `1 - top_p` and friends see the same numbers on both sides.

Checks made here so that the fixture does not test fp noise:
* every top-p / min-p decision has a relative margin >= MARGIN to its threshold, or lies exactly on
  it (an exact case, e.g. four equal logits and top_p 0.5: cumsum hits 0.5 exactly);
* no kept token sits where float32 exp() underflows into subnormals (x - max in [-110, -85]), so
  the set of zero probabilities does not depend on how exp rounds there;
* top-p cuts inside a group of equal logits are flagged `tie_sensitive`: torch.sort is not stable
  on the CPU, so HF does not define which of the tied ids survive. The Rust test then compares the
  sorted probabilities only (how many survive and with what mass), not the ids.
Random vectors are redrawn (seed + 1) until every case passes these checks.

Presence/frequency penalties and logit bias have no HF processor; sampler.rs tests them by hand.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import transformers
from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "sampler", "hf_processors.json")

# Relative distance a top-p cumsum or min-p probability must keep from its threshold.
# torch's float32 softmax (vectorised exp, float sum) and ours (f64 sum) differ by a few ulp,
# about 1e-7 relative; 1e-5 leaves two orders of magnitude.
MARGIN = 1e-5

F32 = np.float32


def f32(x: float) -> float:
    """The Python float of the nearest float32, as the Rust side holds the option."""
    return float(F32(x))


# Option combinations: each processor alone, then combined. Missing keys are "off".
OPTIONS = [
    {},
    {"temperature": 0.7},
    {"temperature": 1.5},
    {"temperature": 0.25},
    {"top_k": 1},
    {"top_k": 10},
    {"top_k": 1000},
    {"top_p": 0.9},
    {"top_p": 0.5},
    {"top_p": 0.75},
    {"top_p": 0.1},
    {"min_p": 0.05},
    {"min_p": 0.3},
    {"min_p": 1.0},
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.8},
    {"temperature": 0.7, "top_k": 10, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.3},
    {"temperature": 1.3, "top_p": 0.8, "repetition_penalty": 1.1},
    {"top_k": 20, "top_p": 0.95},
    {"temperature": 0.5, "min_p": 0.1},
    {"temperature": 0.9, "top_k": 5, "min_p": 0.2, "repetition_penalty": 1.2},
    {"temperature": 2.0, "top_k": 40, "top_p": 0.6, "min_p": 0.02},
]
DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


def make_vector(name: str, seed: int):
    """(values float32 [V], limit, history) for one named logits vector."""
    rng = np.random.default_rng(seed)
    if name == "normal64":
        # Model-like logits (std 3) with ties: the 10th largest value appears three times (a top-k
        # boundary tie) and the largest twice (an argmax tie).
        v = rng.normal(0, 3, 64).astype(F32)
        order = np.argsort(-v, kind="stable")
        v[order[10]] = v[order[9]]
        v[order[11]] = v[order[9]]
        v[order[1]] = v[order[0]]
        hist = [int(order[0]), int(order[0]), int(order[5])] + [int(i) for i in rng.integers(0, 64, 9)]
        hist.append(64 + 3)  # an id outside the logits (HF clamps and ignores it)
        return v, 64, hist
    if name == "ties128":
        # Heavy ties: values on a grid of 0.5.
        v = (np.round(rng.normal(0, 2, 128) * 2) / 2).astype(F32)
        hist = [int(i) for i in rng.integers(0, 128, 16)] + [int(np.argmax(v))]
        return v, 128, hist
    if name == "wide200":
        # Large spread: 60 live logits up to ~45 below the max, 140 hopelessly low (probability 0).
        v = np.empty(200, dtype=F32)
        live = rng.permutation(200)[:60]
        v[:] = (rng.uniform(-4000.0, -300.0, 200)).astype(F32)
        v[live] = (25.0 - rng.uniform(0, 45, 60) * rng.uniform(0, 1, 60)).astype(F32)
        hist = [int(i) for i in live[:8]] + [int(i) for i in rng.integers(0, 200, 6)]
        return v, 200, hist
    if name == "neginf96":
        # Mostly negative logits (repetition penalty multiplies them) and 16 -inf entries.
        v = rng.normal(-2, 3, 96).astype(F32)
        dead = rng.permutation(96)[:16]
        v[dead] = -np.inf
        hist = [int(i) for i in rng.integers(0, 96, 14)] + [int(dead[0])]
        return v, 96, hist
    if name == "flat100_limit90":
        # Nearly uniform (std 0.05): top-p keeps many ids. ids 90..99 are past the limit.
        v = rng.normal(0, 0.05, 100).astype(F32)
        hist = [int(i) for i in rng.integers(0, 100, 20)]
        return v, 90, hist
    if name == "offset80":
        # Large absolute values (1000 + N(0, 4)): softmax must subtract the max.
        v = (1000.0 + rng.normal(0, 2, 80)).astype(F32)
        hist = [int(i) for i in rng.integers(0, 80, 10)]
        return v, 80, hist
    if name == "uniform4_64":
        # Exact boundaries: four equal top logits (probabilities exactly 0.25), twelve -inf, the rest
        # so low that their probability is exactly 0. top_p 0.5 / 0.75 then cut at cumsum == 1 - top_p.
        v = np.full(64, -300.0, dtype=F32)
        v[[5, 17, 40, 63]] = 1.5
        v[[0, 1, 2, 3, 20, 21, 22, 23, 50, 51, 52, 53]] = -np.inf
        hist = [7, 8, 9, 7]
        return v, 64, hist
    raise ValueError(name)


VECTORS = [
    ("normal64", 100),
    ("ties128", 200),
    ("wide200", 300),
    ("neginf96", 400),
    ("flat100_limit90", 500),
    ("offset80", 600),
    ("uniform4_64", 700),
]


def hf_processor_list(model, opts):
    """The processors HF's generate() would build for these sampling options."""
    cfg = GenerationConfig(
        do_sample=True,
        temperature=opts["temperature"],
        top_k=opts["top_k"],
        top_p=opts["top_p"],
        min_p=opts["min_p"] if opts["min_p"] > 0 else None,
        repetition_penalty=opts["repetition_penalty"],
    )
    return model._get_logits_processor(
        generation_config=cfg,
        input_ids_seq_length=1,
        encoder_input_ids=None,
        prefix_allowed_tokens_fn=None,
        logits_processor=None,
        device="cpu",
        model_kwargs={},
    )


def softmax_f32(scores):
    return torch.softmax(scores, dim=-1)


def run_case(model, values, limit, history, opts):
    """Apply HF's processors one by one; return (probs, tie_sensitive, exact, min_margin) or None
    when a decision is too close to its threshold (fp noise would decide it)."""
    scores = torch.from_numpy(values.copy()).reshape(1, -1)
    scores[:, limit:] = -math.inf
    input_ids = torch.tensor([history], dtype=torch.long)
    procs = hf_processor_list(model, opts)
    names = [type(p).__name__ for p in procs]
    expected = []
    if opts["repetition_penalty"] != 1.0:
        expected.append(RepetitionPenaltyLogitsProcessor)
    if opts["temperature"] != 1.0:
        expected.append(TemperatureLogitsWarper)
    if opts["top_k"] != 0:
        expected.append(TopKLogitsWarper)
    if opts["top_p"] < 1.0:
        expected.append(TopPLogitsWarper)
    if opts["min_p"] > 0:
        expected.append(MinPLogitsWarper)
    assert names == [c.__name__ for c in expected], (names, expected)

    tie_sensitive = False
    exact = False
    min_margin = math.inf
    for p in procs:
        if isinstance(p, TopPLogitsWarper):
            s, _ = torch.sort(scores, descending=False)
            cum = s.softmax(dim=-1).cumsum(dim=-1)[0].numpy()
            thr = F32(1 - p.top_p)
            for c in cum[:-1]:
                if c == thr:
                    exact = True
                elif thr > 0:
                    min_margin = min(min_margin, abs(float(c) - float(thr)) / float(thr))
        if isinstance(p, MinPLogitsWarper):
            probs = torch.softmax(scores, dim=-1)[0].numpy()
            thr = F32(p.min_p) * probs.max()
            for q in probs[probs > 0]:
                if q == thr:
                    exact = True
                else:
                    min_margin = min(min_margin, abs(float(q) - float(thr)) / float(thr))
        before = scores.clone()
        scores = p(input_ids, scores)
        if isinstance(p, TopPLogitsWarper):
            removed = torch.isinf(scores[0]) & torch.isfinite(before[0])
            kept = torch.isfinite(scores[0])
            removed_vals = set(before[0][removed].tolist())
            kept_vals = set(scores[0][kept].tolist())
            if removed_vals & kept_vals:
                tie_sensitive = True
    if min_margin < MARGIN:
        return None
    finite = scores[0][torch.isfinite(scores[0])].numpy()
    d = finite - finite.max()
    if np.any((d <= -85.0) & (d >= -110.0)):
        return None
    probs = softmax_f32(scores)[0].numpy()
    assert np.all(np.isfinite(probs))
    assert not np.any((probs > 0) & (probs < np.finfo(F32).tiny))
    return probs, tie_sensitive, exact, (None if math.isinf(min_margin) else min_margin), names


def num(x) -> str:
    """A float32 as the shortest JSON number that reads back to it."""
    x = F32(x)
    if x == 0:
        return "0"
    s = np.format_float_scientific(x, unique=True, trim="-")
    return s.replace("e+", "e")


def logit(x) -> str:
    """A logit as an exact JSON number (the f32 value printed as a double), or a string for inf."""
    x = F32(x)
    if np.isneginf(x):
        return '"-inf"'
    assert np.isfinite(x)
    return repr(float(x))


def main():
    torch.manual_seed(0)
    cfg = Phi3Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = Phi3ForCausalLM(cfg).eval()

    vectors = []
    cases = []
    for name, base_seed in VECTORS:
        for attempt in range(200):
            values, limit, history = make_vector(name, base_seed + attempt)
            results = []
            for o in OPTIONS:
                opts = {k: f32(o.get(k, DEFAULTS[k])) if k != "top_k" else o.get(k, 0) for k in DEFAULTS}
                r = run_case(model, values, limit, history, opts)
                if r is None:
                    break
                results.append((opts, r))
            else:
                break
            assert name != "uniform4_64", "the fixed vector must pass"
        else:
            raise RuntimeError(f"{name}: no seed passed the margin checks")
        vectors.append((name, base_seed + attempt, values, limit, history))
        for opts, (probs, tie, exact, margin, names) in results:
            cases.append((name, opts, probs, tie, exact, margin, names))

    n_tie = sum(1 for c in cases if c[3])
    n_exact = sum(1 for c in cases if c[4])
    lines = ["{"]
    lines.append('  "description": ' + json.dumps(
        "HF transformers processors (RepetitionPenalty -> Temperature -> TopK -> TopP -> MinP, as "
        "_get_logits_processor builds them for do_sample=True) applied to each logits vector, then "
        "float32 softmax. Ids >= limit are set to -inf before the processors. Written by "
        "tests/oracle/make_sampler_fixtures.py; see its docstring.") + ",")
    lines.append('  "versions": ' + json.dumps(
        {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        sort_keys=True) + ",")
    lines.append(f'  "margin": {MARGIN},')
    lines.append('  "vectors": [')
    for i, (name, seed, values, limit, history) in enumerate(vectors):
        sep = "," if i + 1 < len(vectors) else ""
        lines.append(
            f'    {{"name": "{name}", "seed": {seed}, "limit": {limit}, "history": {json.dumps(history)}, '
            f'"logits": [{", ".join(logit(x) for x in values)}]}}{sep}'
        )
    lines.append("  ],")
    lines.append('  "cases": [')
    for i, (name, opts, probs, tie, exact, margin, names) in enumerate(cases):
        sep = "," if i + 1 < len(cases) else ""
        o = ", ".join(f'"{k}": {json.dumps(opts[k])}' for k in sorted(opts))
        m = "null" if margin is None else num(margin)
        lines.append(
            f'    {{"vector": "{name}", "options": {{{o}}}, "hf_processors": {json.dumps(names)}, '
            f'"tie_sensitive": {json.dumps(tie)}, "exact_boundary": {json.dumps(exact)}, '
            f'"min_margin": {m}, "probs": [{", ".join(num(x) for x in probs)}]}}{sep}'
        )
    lines.append("  ]")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    json.loads(text)  # well-formed
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT}: {len(vectors)} vectors, {len(cases)} cases "
          f"({n_tie} tie-sensitive, {n_exact} with an exact boundary), {len(text)} bytes")
    for name, seed, *_ in vectors:
        print(f"  {name}: seed {seed}")


if __name__ == "__main__":
    main()
