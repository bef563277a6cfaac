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

Usage, on a GPU machine with torch + transformers (after scripts/gpu-bundle; no Rust needed):
    python3 bench/compare_hf.py --phi3 gpu-carry/phi3 --cases 512:128 4096:32
    python3 bench/compare_hf.py --skip-compile          # eager HF only (faster)
A smoke test of the script's own logic without a GPU (tiny demo shapes, CPU, f32):
    python3 bench/compare_hf.py --phi3 target/release/phi3 --device cpu --config tests/fixtures/mha-f32-tied/config.json --cases 16:4 --skip-compile
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


def prompt_ids(vocab: int, n: int):
    """The ids `phi3 bench` uses: 3 + (i mod (min(vocab, 1000) - 3))."""
    span = min(vocab, 1000) - 3
    return [3 + (i % span) for i in range(n)]


def run_ours(phi3: str, model_dir: Path, device: str, prompt: int, gen: int, repeat: int):
    cmd = [phi3, "bench", "--model", str(model_dir), "--device", device,
           "--dummy-weights", "bf16" if device != "cpu" else "f32",
           "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--repeat", str(repeat),
           "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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


def build_hf(config_path: Path, device: str, dtype_name: str):
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config.from_dict(json.loads(config_path.read_text()))
    config._attn_implementation = "eager"
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3ForCausalLM(config).to(dtype)
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


def hf_compiled(model, device: str, prompt: int, gen: int):
    import torch

    ids = torch.tensor([prompt_ids(model.config.vocab_size, prompt)], device=device)
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def timed(n):
        sync(torch, device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(torch, device)
        return time.perf_counter() - t

    with torch.inference_mode():
        for _ in range(2):  # compile and capture the graphs
            timed(1)
            timed(gen + 1)
        first = min(timed(1) for _ in range(2))
        total = min(timed(gen + 1) for _ in range(2))
    return prompt / first, gen / max(total - first, 1e-9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phi3", default="gpu-carry/phi3", help="the phi3 binary (built here, carried there)")
    ap.add_argument("--config", default=str(MEDIUM), help="config.json giving the shapes")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke test")
    ap.add_argument("--cases", nargs="+", default=["512:128", "4096:32"],
                    help="PROMPT:GEN pairs: prefill PROMPT tokens, then GEN decode steps")
    ap.add_argument("--repeat", type=int, default=3, help="phi3 bench runs per case (median)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="no static cache + torch.compile run")
    args = ap.parse_args()
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases]
    config_path = Path(args.config)
    config = json.loads(config_path.read_text())

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        shutil.copy(config_path, model_dir / "config.json")
        ours = {c: run_ours(args.phi3, model_dir, args.device, c[0], c[1], args.repeat) for c in cases}

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
        model = build_hf(config_path, args.device, dtype)
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


if __name__ == "__main__":
    sys.exit(main())
