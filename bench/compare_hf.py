#!/usr/bin/env python3
"""GPU benchmark: phi3-rs vs HF transformers at Phi-3-medium-128k shapes, same GPU, same script.

For each (prompt length, decode steps) case it measures, with random bf16 weights (speed does
not depend on the values, so no checkpoint is needed):
  * phi3-rs: `phi3 bench --device cuda --dummy-weights bf16 --json` on a folder holding only the
    committed Phi-3-medium-128k config.json (weights are generated on the device);
  * HF transformers, eager: Phi3ForCausalLM built from the same config on the GPU in bf16, prefill
    of the prompt, then greedy decode steps one at a time with its dynamic KV cache;
  * HF transformers, static cache + torch.compile (mode "reduce-overhead"): the same through
    `generate`, decode speed from the difference of a 1-token and an (N+1)-token generate;
and prints a markdown table: tokens/s for prefill and decode, ours / theirs, and our decode as a
fraction of the bandwidth bound (weight bytes + KV bytes read per step, at the copy bandwidth
measured here with a device-to-device copy of 2 GiB).

Batched mode (`--batched N:PROMPT:GEN ...`, continuous batching, issue 10) measures instead, per case:
  * phi3-rs: `phi3 bench --sessions N ... --json` (N sessions on N threads, each its own PROMPT-token
    prompt, decoding GEN tokens at once; through generate only when --tokenizer gives it a
    tokenizer.json, e.g. the demo model's that scripts/gpu-check uses), or the reports given
    with `--ours-json`;
  * HF transformers `generate` on a batch of N same-length prompts (the ids our sessions get: row i
    is our cycle started i x 101 ids further on; no padding), greedy with min_new_tokens=GEN;
    prefill = a 1-token generate, decode = a (GEN+1)-token generate minus it (as the compiled
    batch-1 run); attention "sdpa" by default (eager attention's fp32 scores of 64 x 2k
    sequences need ~40 GiB per layer); then the same with static cache + torch.compile unless
    --skip-compile;
and prints total decode tokens/s (N x GEN / decode time), the time per output token, the same at
batch 1 (one sequence, same context) and their ratio, ours / theirs, and the decode bound (weights
read once per step, plus N caches).

Usage, on a GPU machine with torch + transformers (after scripts/gpu-bundle; no Rust needed):
    python3 bench/compare_hf.py --phi3 gpu-carry/phi3 --cases 512:128 4096:32
    python3 bench/compare_hf.py --skip-compile          # eager HF only (faster)
    python3 bench/compare_hf.py --batched 32:1024:32 64:2048:32 --skip-compile
    python3 bench/compare_hf.py --batched 32:1024:32 --ours-json gpu-check-out/bench-sessions-32x1024.json
A smoke test of the script's own logic without a GPU (tiny demo shapes, CPU, f32):
    python3 bench/compare_hf.py --phi3 target/release/phi3 --device cpu --config tests/fixtures/mha-f32-tied/config.json --cases 16:4 --skip-compile
    python3 bench/compare_hf.py --phi3 target/release/phi3 --device cpu --config tests/fixtures/mha-f32-tied/config.json --batched 3:16:4 --skip-compile
Nothing here has been run on a GPU yet (see docs/PERF.md).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEDIUM = REPO / "tests/fixtures/configs/Phi-3-medium-128k-instruct.config.json"


def prompt_ids(vocab: int, n: int, index: int = 0):
    """The ids `phi3 bench` uses: 3 + (i mod (min(vocab, 1000) - 3)); with --sessions, session
    `index` starts its cycle index x 101 ids further on."""
    span = min(vocab, 1000) - 3
    return [3 + ((index * 101 + i) % span) for i in range(n)]


def our_reports(args, config_path: Path, shapes):
    """Our `phi3 bench --json` report for each (sessions, prompt, gen) of `shapes`: from
    --ours-json when given, else by running phi3 on the config with dummy weights."""
    if args.ours_json:
        given = load_ours(args.ours_json)
        missing = [s for s in shapes if s not in given]
        if missing:
            sys.exit(f"--ours-json has no report for {missing} (sessions, prompt, gen)")
        return {s: given[s] for s in shapes}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        shutil.copy(config_path, model_dir / "config.json")
        if args.tokenizer:
            shutil.copy(args.tokenizer, model_dir / "tokenizer.json")
        return {s: run_ours(args.phi3, model_dir, args.device, s[1], s[2], args.repeat, s[0])
                for s in shapes}


def run_ours(phi3: str, model_dir: Path, device: str, prompt: int, gen: int, repeat: int,
             sessions: int = 1):
    cmd = [phi3, "bench", "--model", str(model_dir), "--device", device,
           "--dummy-weights", "bf16" if device != "cpu" else "f32",
           "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--repeat", str(repeat),
           "--json"]
    if sessions > 1:
        cmd += ["--sessions", str(sessions)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def load_ours(paths):
    """`phi3 bench --json` reports from files, keyed by (sessions, prompt, gen)."""
    ours = {}
    for path in paths:
        o = json.loads(Path(path).read_text())
        ours[(o.get("sessions", 1), o["prompt_tokens"], o["gen_tokens"])] = o
    return ours


def sync(torch, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(torch, device):
    """Bytes/s of a device-to-device copy (read + write counted), best of 5."""
    if not device.startswith("cuda"):
        return None
    n = 1 << 30  # 2 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(torch, device)
        t = time.perf_counter()
        b.copy_(a)
        sync(torch, device)
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * 2 * n / best


def build_hf(config_path: Path, device: str, dtype_name: str, attn: str = "eager"):
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config.from_dict(json.loads(config_path.read_text()))
    config._attn_implementation = attn
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    # Built directly in `dtype`: Phi-3-medium in f32 first (56 GB) would not fit an 80 GB card.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    return model


def hf_eager(model, device: str, prompt: int, gen: int):
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([prompt_ids(model.config.vocab_size, prompt)], device=device)
    with torch.inference_mode():
        # Warm-up (kernels, allocator) on a short prompt.
        model(ids[:, :8], use_cache=True)
        sync(torch, device)
        cache = DynamicCache()
        t = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True)
        sync(torch, device)
        prefill_s = time.perf_counter() - t
        nxt = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(gen):
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        sync(torch, device)
        decode_s = time.perf_counter() - t
    return prompt / prefill_s, gen / decode_s


def generate_timings(model, device: str, ids, gen: int, warmups: int, reps: int):
    """(prefill s, decode s) of `model.generate` on the batch `ids`: the best 1-token generate, and
    the best (gen+1)-token one minus it. `warmups` rounds of both run first."""
    import torch

    mask = torch.ones_like(ids)

    def timed(n):
        sync(torch, device)
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)
        sync(torch, device)
        return time.perf_counter() - t

    with torch.inference_mode():
        for _ in range(warmups):
            timed(1)
            timed(gen + 1)
        first = min(timed(1) for _ in range(reps))
        total = min(timed(gen + 1) for _ in range(reps))
    return first, max(total - first, 1e-9)


def batch_ids(model, device: str, n: int, prompt: int):
    import torch

    vocab = model.config.vocab_size
    return torch.tensor([prompt_ids(vocab, prompt, i) for i in range(n)], device=device)


def compile_static(model):
    """Static cache + torch.compile (mode "reduce-overhead") from now on, for every generate."""
    import torch

    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)


def hf_compiled(model, device: str, prompt: int, gen: int):
    ids = batch_ids(model, device, 1, prompt)
    compile_static(model)
    # Two warm-up rounds compile and capture the graphs.
    first, decode_s = generate_timings(model, device, ids, gen, warmups=2, reps=2)
    return prompt / first, gen / decode_s


def hf_batched(model, device: str, n: int, prompt: int, gen: int, warmups: int, reps: int):
    """transformers' batched generate at (n, prompt, gen) and at batch 1 with the same context.
    Returns a dict like our --sessions report, or {"error": ...} when the device runs out of
    memory (the row then says so instead of ending the run)."""
    import torch

    try:
        with torch.inference_mode():  # first launches and allocations, on a small input
            model.generate(batch_ids(model, device, 1, 8), max_new_tokens=2, min_new_tokens=2,
                           do_sample=False)
        prefill_s, decode_s = generate_timings(model, device, batch_ids(model, device, n, prompt),
                                               gen, warmups, reps)
        _, single_decode_s = generate_timings(model, device, batch_ids(model, device, 1, prompt),
                                              gen, warmups, reps)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"error": f"out of memory ({str(e).splitlines()[0][:80]})"}
    tpot, single_tpot = decode_s / gen, single_decode_s / gen
    return {"prefill_s": prefill_s, "decode_tokens_per_s": n * gen / decode_s,
            "tpot_ms": tpot * 1e3, "single_tpot_ms": single_tpot * 1e3,
            "tpot_ratio": tpot / single_tpot}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phi3", default="gpu-carry/phi3", help="the phi3 binary (built here, carried there)")
    ap.add_argument("--config", default=str(MEDIUM), help="config.json giving the shapes")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke test")
    ap.add_argument("--cases", nargs="+", default=["512:128", "4096:32"],
                    help="PROMPT:GEN pairs: prefill PROMPT tokens, then GEN decode steps")
    ap.add_argument("--batched", nargs="+", metavar="N:PROMPT:GEN",
                    help="batched mode instead of --cases: N sessions / sequences of PROMPT tokens, "
                         "GEN decode steps each")
    ap.add_argument("--ours-json", nargs="+", metavar="FILE",
                    help="use these `phi3 bench [--sessions N] --json` reports instead of running "
                         "phi3 (matched to the cases by sessions, prompt and gen tokens)")
    ap.add_argument("--tokenizer", metavar="TOKENIZER_JSON",
                    help="a tokenizer.json put next to the config for our bench, so that --batched "
                         "sessions decode through generate (without one: one-token "
                         "append_tokens_greedy steps, which the scheduler does not wait for to fill a "
                         "batch)")
    ap.add_argument("--repeat", type=int, default=3, help="phi3 bench runs per case (median)")
    ap.add_argument("--attn", choices=["eager", "sdpa"],
                    help="HF attention (default: eager for --cases, sdpa for --batched)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="no static cache + torch.compile run")
    args = ap.parse_args()
    config_path = Path(args.config)
    config = json.loads(config_path.read_text())
    if args.batched:
        return main_batched(args, config_path, config)
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases]

    rows = []
    reports = our_reports(args, config_path, [(1, *c) for c in cases])
    ours = {c: reports[(1, *c)] for c in cases}

    import torch

    bandwidth = copy_bandwidth(torch, args.device)
    weight_bytes = next(iter(ours.values()))["weight_bytes_on_device"]
    kv_per_token = next(iter(ours.values()))["kv_bytes_per_token"]
    for c in cases:
        o = ours[c]
        bound = None
        if bandwidth:
            # A decode step at context L reads every weight once and the KV cache of L tokens;
            # the mean context over the GEN steps is PROMPT + GEN / 2.
            step_bytes = weight_bytes + kv_per_token * (c[0] + c[1] / 2)
            bound = bandwidth / step_bytes
        rows.append(("phi3-rs", c, o["prefill_tokens_per_s"], o["decode_tokens_per_s"], bound))

    if not args.skip_hf:
        dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
        model = build_hf(config_path, args.device, dtype, args.attn or "eager")
        for c in cases:
            p, d = hf_eager(model, args.device, *c)
            rows.append(("transformers eager", c, p, d, None))
        if not args.skip_compile:
            for c in cases:
                p, d = hf_compiled(model, args.device, *c)
                rows.append(("transformers static+compile", c, p, d, None))

    dev = next(iter(ours.values()))["device"]
    print(f"\nDevice: {dev}; copy bandwidth: "
          f"{bandwidth / 1e12:.2f} TB/s" if bandwidth else f"\nDevice: {dev}")
    print(f"Shapes: {config_path.name} ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}), "
          f"weights {weight_bytes / 1e9:.2f} GB on the device, KV {kv_per_token} B/token\n")
    print("| implementation | prompt:gen | prefill tok/s | decode tok/s | ours/it prefill | ours/it decode | decode / bound |")
    print("|---|---|---|---|---|---|---|")
    for name, c, p, d, bound in rows:
        op, od = ours[c]["prefill_tokens_per_s"], ours[c]["decode_tokens_per_s"]
        frac = f"{d / bound:.2f}" if bound else "—"
        print(f"| {name} | {c[0]}:{c[1]} | {p:,.1f} | {d:,.1f} | {op / p:.2f} | {od / d:.2f} | {frac} |")
    return 0


def main_batched(args, config_path: Path, config: dict):
    cases = [tuple(int(x) for x in c.split(":")) for c in args.batched]
    ours = our_reports(args, config_path, cases)

    import torch

    bandwidth = copy_bandwidth(torch, args.device)
    first = next(iter(ours.values()))
    weight_bytes, kv_per_token = first["weight_bytes_on_device"], first["kv_bytes_per_token"]
    rows = [("phi3-rs", c, ours[c]) for c in cases]
    if not args.skip_hf:
        dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
        attn = args.attn or "sdpa"
        model = build_hf(config_path, args.device, dtype, attn)
        for c in cases:
            rows.append((f"transformers generate ({attn})", c,
                         hf_batched(model, args.device, *c, warmups=0, reps=1)))
        if not args.skip_compile:
            compile_static(model)
            for c in cases:
                rows.append((f"transformers static+compile ({attn})", c,
                             hf_batched(model, args.device, *c, warmups=2, reps=2)))

    def bound(c):
        # A batched decode step reads every weight once and each of the N caches, at the mean
        # context PROMPT + GEN / 2; it yields N tokens.
        if not bandwidth:
            return None
        n, prompt, gen = c
        return n * bandwidth / (weight_bytes + n * kv_per_token * (prompt + gen / 2))

    print(f"\nDevice: {first['device']}; copy bandwidth: "
          f"{bandwidth / 1e12:.2f} TB/s" if bandwidth else f"\nDevice: {first['device']}")
    print(f"Shapes: {config_path.name} ({config['num_hidden_layers']} layers, hidden "
          f"{config['hidden_size']}), weights {weight_bytes / 1e9:.2f} GB on the device, KV "
          f"{kv_per_token} B/token per sequence; ours decodes via {first.get('decode_api', '?')}\n")
    print("| implementation | N x prompt:gen | prefill s (all) | decode tok/s (total) | ms/token "
          "| ms/token at batch 1 | ratio | ours/it decode | decode / bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, c, r in rows:
        shape = f"{c[0]} x {c[1]}:{c[2]}"
        if "error" in r:
            print(f"| {name} | {shape} | {r['error']} | | | | | | |")
            continue
        b = bound(c)
        frac = f"{r['decode_tokens_per_s'] / b:.2f}" if b else "—"
        vs = ours[c]["decode_tokens_per_s"] / r["decode_tokens_per_s"]
        print(f"| {name} | {shape} | {r['prefill_s']:.3f} | {r['decode_tokens_per_s']:,.1f} "
              f"| {r['tpot_ms']:.2f} | {r['single_tpot_ms']:.2f} | {r['tpot_ratio']:.2f} "
              f"| {vs:.2f} | {frac} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
