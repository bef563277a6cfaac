#!/usr/bin/env python3
"""CPU benchmark: phi3-rs vs HF transformers on the same random Phi-3-mini-shaped weights.

What it does, in one run on one machine:
1. Writes (once) a Hugging Face folder with Phi-3-mini-4k-instruct's shapes (3.8B parameters)
   and random bf16 weights: config.json + sharded safetensors (about 7.6 GB on disk).
2. Runs `phi3 bench --json` on it (prefill of --prompt-tokens, then --gen-tokens decode steps).
3. Runs HF transformers (Phi3ForCausalLM, the same prompt ids, the same number of steps, KV
   cache, greedy) in bf16 and, with --hf-f32, in f32 (f32 needs 15 GB of RAM).
4. Prints a markdown table of tokens/s and the ratio ours / HF, ready for docs/PERF.md.

Usage (from the repository root, after `cargo build --release`):
    python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install torch transformers safetensors
    /tmp/bench-venv/bin/python bench/cpu_vs_hf.py --threads 2

Speed does not depend on the weight values, so random weights measure what real ones would.
The prompt is the token ids used by `phi3 bench`: 3 + (i mod (min(vocab, 1000) - 3)).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tests/fixtures/configs/Phi-3-mini-4k-instruct.config.json"


def tensor_specs(c):
    """(name, shape) of every Phi3ForCausalLM weight, in HF naming."""
    h, inter, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = h // heads
    specs = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.qkv_proj.weight", ((heads + 2 * kv) * hd, h)),
            (f"{p}.self_attn.o_proj.weight", (h, heads * hd)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_up_proj.weight", (2 * inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]
    return specs


def write_model(out: Path, seed: int = 0, shard_bytes: int = 2 << 30):
    """Random bf16 weights of Phi-3-mini shape, sharded like HF checkpoints."""
    import torch
    from safetensors.torch import save_file

    if (out / "model.safetensors.index.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(CONFIG.read_text())
    config["torch_dtype"] = "bfloat16"
    torch.manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, shape in tensor_specs(config):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        current[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * 2
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))


def prompt_ids(vocab: int, n: int):
    span = min(vocab, 1000) - 3
    return [3 + (i % span) for i in range(n)]


def run_ours(phi3: Path, model: Path, args):
    cmd = [str(phi3), "bench", "--model", str(model), "--device", "cpu",
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
           "--repeat", str(args.repeat), "--json"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_hf(model: Path, dtype_name: str, args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)
    m.eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(m.config.vocab_size, args.prompt_tokens)])
    with torch.inference_mode():
        # Same protocol as `phi3 bench --repeat N`: N runs, the median of each phase reported.
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = m(ids, use_cache=True)
            prefill_s = time.perf_counter() - t0
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(args.gen_tokens):
                out = m(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            decode_s = time.perf_counter() - t0
            runs.append((prefill_s, decode_s))
        prefill_s = sorted(r[0] for r in runs)[len(runs) // 2]
        decode_s = sorted(r[1] for r in runs)[len(runs) // 2]
    import transformers

    return {
        "impl": f"transformers {transformers.__version__} ({dtype_name}, torch {torch.__version__})",
        "load_s": load_s,
        "prefill_tokens_per_s": args.prompt_tokens / prefill_s,
        "decode_tokens_per_s": args.gen_tokens / decode_s,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/phi3-mini-random"))
    ap.add_argument("--phi3", type=Path, default=REPO / "target/release/phi3")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3, help="runs per implementation; the median is reported")
    ap.add_argument("--hf-f32", action="store_true", help="also run HF in float32 (needs 15 GB RAM)")
    args = ap.parse_args()

    write_model(args.model_dir)
    ours = run_ours(args.phi3, args.model_dir, args)
    rows = [("phi3-rs (bf16 weights, f32 compute)", ours)]
    for dtype in ["bfloat16"] + (["float32"] if args.hf_f32 else []):
        hf = run_hf(args.model_dir, dtype, args)
        rows.append((hf["impl"], hf))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} threads; commit {commit}; "
          f"prompt {args.prompt_tokens} tokens, {args.gen_tokens} decode steps, median of {args.repeat} runs; "
          "Phi-3-mini shapes, random bf16 weights\n")
    print("| implementation | prefill tok/s | decode tok/s | ours / it (prefill) | ours / it (decode) |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        rp = ours["prefill_tokens_per_s"] / r["prefill_tokens_per_s"]
        rd = ours["decode_tokens_per_s"] / r["decode_tokens_per_s"]
        print(f"| {name} | {r['prefill_tokens_per_s']:.2f} | {r['decode_tokens_per_s']:.3f} | {rp:.2f} | {rd:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
