"""Whole AWQ and GPTQ checkpoints of a fixture model, with HF logits of what they mean.

Takes the `mha-f32-tied` fixture, quantizes each decoder projection to int4 (groups of 32,
asymmetric, f16 scales, round to nearest), and writes it packed as AutoAWQ GEMM
(`tests/fixtures/quant/model-awq-g32/`) and as GPTQ v1 (`.../model-gptq-v1-g32/`) with the packers
of `make_quant_fixtures.py`; embeddings and norms are copied unchanged. Both folders get the same
`oracle.safetensors`: `tokens` (the fixture's) and `logits` [L, vocab], row i being the
last-position logits of HF `Phi3ForCausalLM` (float32, eager, no cache) over tokens[..=i] with
every projection replaced by its dequantized weight `scale * (q - zero)` computed by the
libraries' own dequantization (AutoAWQ's unpack order; GPTQModel's v1 -> v2 zero conversion).
So the Rust test checks loading + conversion + the int4 kernels against transformers end to end.

Run: /root/oracle-venv/bin/python tests/oracle/make_quant_models.py (deterministic, ~3 s).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import Phi3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_quant_fixtures import dequant_awq, dequant_gptq, pack_awq, pack_gptq  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SOURCE = os.path.join(ROOT, "tests", "fixtures", "mha-f32-tied")
OUT = os.path.join(ROOT, "tests", "fixtures", "quant")
GROUP = 32
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
SCHEMES = {
    "model-awq-g32": {
        "quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm",
        "zero_point": True, "modules_to_not_convert": None,
    },
    "model-gptq-v1-g32": {
        "quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq",
    },
}


def rtn_int4(w: torch.Tensor):
    """Round-to-nearest asymmetric int4 per group of GROUP columns: q, zeros, f16 scales."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // GROUP, GROUP)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).to(torch.float16)
    s = scales.float().clamp(min=1e-8)
    zeros = torch.round(-lo / s).clamp(0, 15).to(torch.int32)
    q = (torch.round(g / s[..., None]) + zeros[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(out_f, in_f), zeros, scales


@torch.no_grad()
def prefix_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return torch.stack([model(tokens[None, : i + 1]).logits[0, -1].float() for i in range(len(tokens))])


def main() -> None:
    dense = load_file(os.path.join(SOURCE, "model.safetensors"))
    tokens = load_file(os.path.join(SOURCE, "oracle.safetensors"))["tokens"]
    with open(os.path.join(SOURCE, "config.json")) as f:
        config = json.load(f)
    layers = config["num_hidden_layers"]
    packed = {name: {} for name in SCHEMES}
    deq = {name: {} for name in SCHEMES}
    for i in range(layers):
        for proj in PROJECTIONS:
            prefix = f"model.layers.{i}.{proj}"
            q, zeros, scales = rtn_int4(dense[f"{prefix}.weight"])
            for name, qc in SCHEMES.items():
                if qc["quant_method"] == "awq":
                    t = pack_awq(q, zeros, scales)
                    ref = dequant_awq(t, GROUP, torch.float32)
                else:
                    t = pack_gptq(q, zeros, scales, GROUP, v1=True)
                    ref = dequant_gptq(t, True, torch.float32)
                for part, tensor in t.items():
                    packed[name][f"{prefix}.{part}"] = tensor.contiguous()
                deq[name][f"{prefix}.weight"] = ref
    # Both schemes must mean the same weights (same q, zeros, scales).
    for key in deq["model-awq-g32"]:
        assert torch.equal(deq["model-awq-g32"][key], deq["model-gptq-v1-g32"][key]), key
    model = Phi3ForCausalLM.from_pretrained(SOURCE, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    state = {k: v.clone() for k, v in dense.items()}
    state.update(deq["model-awq-g32"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    logits = prefix_logits(model, tokens)
    for name, qc in SCHEMES.items():
        folder = os.path.join(OUT, name)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.makedirs(folder)
        tensors = {k: v for k, v in dense.items() if not any(f".{p}.weight" in k for p in PROJECTIONS)}
        tensors.update(packed[name])
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        save_file({"tokens": tokens, "logits": logits.contiguous()}, os.path.join(folder, "oracle.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**config, "quantization_config": qc}, f, indent=2, sort_keys=True)
            f.write("\n")
        shutil.copy(os.path.join(SOURCE, "generation_config.json"), folder)
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
        print(f"wrote {os.path.relpath(folder, ROOT)} ({size} bytes)")


if __name__ == "__main__":
    main()
