#!/usr/bin/env python3
"""Small AWQ and GPTQ int4 checkpoints with reference dequantized weights, for
phi3-core/tests/hub_quant.rs (phi3_core::loader::hub_quant).

Run from the repository root (needs torch, numpy, safetensors; no model files, no GPU):

    /root/oracle-venv/bin/python tests/oracle/make_quant_fixtures.py

Writes tests/fixtures/quant/<case>/{config.json, model.safetensors, oracle.safetensors} and
nothing else. Deterministic: two runs write byte-identical files.

Each case draws random int4 levels q [out, in], zero points [out, in / G] in 0..15 and f16
scales [out, in / G] (magnitudes from 2^-24, the smallest f16 subnormal, up to 1000), packs them
the way the quantizing libraries do (written here from the formats, independently of the Rust
reader), and records in oracle.safetensors, for each projection PREFIX:

    PREFIX.weight   f32 [out, in]   what the reference library's dequantization gives, computed
                                    with the scales widened to f32 (exact: |q - zero| <= 15)

The libraries themselves run that path in f16; the script checks that their f16 result is the f16
rounding of PREFIX.weight, and that PREFIX.weight is scale * (q - zero) of the drawn values.

Formats and the source they follow:

* AutoAWQ GEMM (casper-hansen/AutoAWQ): packing as awq/modules/linear/gemm.py
  WQLinear_GEMM.from_linear (qweight int32 [in, out/8], qzeros int32 [in/G, out/8], eight 4-bit
  fields per word, field k = bits 4k..4k+3 holding output 8c + [0,2,4,6,1,3,5,7][k];
  scales f16 [in/G, out]); dequantization as awq/utils/packing_utils.py unpack_awq ->
  reverse_awq_order -> dequantize_gemm: (iweight - izeros) * scales.
* GPTQ (AutoGPTQ/AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py; ModelCloud/GPTQModel
  gptqmodel/nn_modules/qlinear/__init__.py): qweight int32 [in/8, out], field k of word (r, o) =
  q[o, 8r + k]; qzeros int32 [in/G, out/8], field k of word (g, c) = zero of output 8c + k;
  scales f16 [in/G, out]; g_idx int32 [in] = i // G; weight = scales[g_idx] * (w - zeros[g_idx]).
  "gptq_v2" stores the zeros as they are. "gptq" (v1) stores zero - 1: GPTQModel writes it by
  subtracting 0x11111111 from each int32 word (gptqmodel/utils/model.py
  convert_gptq_v2_to_v1_format_module, borrows between fields when a zero is 0) and reads it by
  adding 0x11111111 back (convert_gptq_v1_to_v2_format_module). The v1 case has zeros of 0 next to
  15s, so borrows and carries are exercised. For the symmetric v1 case (all zeros 8, stored 7) the
  script also runs AutoGPTQ's reader ((field & 15) + 1) and checks that it agrees.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "quant")

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # field k of a word holds output 8c + AWQ_PACK_ORDER[k]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
V1_OFFSET = 0x11111111

# name -> quantization_config and projections (prefix, out, in, zero pattern)
CASES = {
    "awq-g32": {
        "quantization_config": {
            "quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4,
            "version": "gemm", "modules_to_not_convert": None,
        },
        "projections": [
            ("model.layers.0.self_attn.qkv_proj", 48, 64, "random"),
            ("model.layers.0.mlp.down_proj", 48, 128, "random"),
        ],
    },
    "awq-g64": {
        "quantization_config": {
            "quant_method": "awq", "zero_point": True, "group_size": 64, "bits": 4,
            "version": "gemm", "modules_to_not_convert": None,
        },
        "projections": [("model.layers.0.mlp.gate_up_proj", 48, 128, "random")],
    },
    "gptq-v1-g32": {
        "quantization_config": {
            "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
            "true_sequential": True, "static_groups": False, "damp_percent": 0.01,
            "checkpoint_format": "gptq",
        },
        "projections": [
            ("model.layers.0.self_attn.qkv_proj", 48, 64, "edges"),
            ("model.layers.0.self_attn.o_proj", 48, 128, "random"),
        ],
    },
    "gptq-v1-g128-sym": {
        "quantization_config": {
            "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True,
            "true_sequential": True, "static_groups": True, "damp_percent": 0.01,
            "checkpoint_format": "gptq",
        },
        "projections": [("model.layers.0.mlp.down_proj", 48, 128, "sym")],
    },
    "gptq-v2-g64": {
        "quantization_config": {
            "quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": False,
            "lm_head": False, "format": "gptq_v2", "pack_dtype": "int32",
            "meta": {"quantizer": ["gptqmodel"]},
        },
        "projections": [("model.layers.0.mlp.gate_up_proj", 48, 128, "edges")],
    },
}


def draw(gen: torch.Generator, out_f: int, in_f: int, group: int, zeros_kind: str):
    """Levels q [out, in] int32, zeros [out, in/G] int32, scales [out, in/G] f16."""
    ng = in_f // group
    q = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.int32)
    q[0, :16] = torch.arange(16, dtype=torch.int32)  # every level appears
    if zeros_kind == "sym":
        zeros = torch.full((out_f, ng), 8, dtype=torch.int32)
    else:
        zeros = torch.randint(0, 16, (out_f, ng), generator=gen, dtype=torch.int32)
        if zeros_kind == "edges":
            # Zeros 0 and 15 side by side in one packed word (outputs 0..7 of group 0): a v1
            # word then borrows across fields.
            zeros[0:8, 0] = torch.tensor([0, 15, 0, 0, 15, 15, 0, 1], dtype=torch.int32)
            zeros[8:16, 0] = 0
            zeros[16:24, 0] = 15
    # Scales: 2^e * (1 + u), e in [-14, 9], as f16; plus fixed extremes.
    e = torch.randint(-14, 10, (out_f, ng), generator=gen).to(torch.float32)
    u = torch.rand((out_f, ng), generator=gen)
    scales = (torch.exp2(e) * (1 + u)).to(torch.float16)
    extremes = torch.tensor([2.0**-24, 2.0**-14, 6.1e-5, 1000.0, 0.0], dtype=torch.float16)
    scales.view(-1)[: len(extremes)] = extremes
    return q, zeros, scales


def u32_to_i32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint32).view(np.int32).copy())


def pack_awq(q, zeros, scales):
    """AutoAWQ WQLinear_GEMM.from_linear layout."""
    intweight = q.t().numpy().astype(np.uint32)  # [in, out]
    z = zeros.t().numpy().astype(np.uint32)  # [G, out]
    qweight = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    qzeros = np.zeros((z.shape[0], z.shape[1] // 8), dtype=np.uint32)
    for col in range(qweight.shape[1]):
        for k in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_PACK_ORDER[k]] << (4 * k)
            qzeros[:, col] |= z[:, col * 8 + AWQ_PACK_ORDER[k]] << (4 * k)
    return {
        "qweight": u32_to_i32(qweight),
        "qzeros": u32_to_i32(qzeros),
        "scales": scales.t().contiguous(),
    }


def dequant_awq(t, group, dtype):
    """AutoAWQ unpack_awq -> reverse_awq_order -> dequantize_gemm; result [out, in]."""
    shifts = torch.arange(0, 32, 4)
    iw = torch.bitwise_right_shift(t["qweight"][:, :, None], shifts[None, None, :]).to(torch.int8)
    iw = iw.view(iw.shape[0], -1)
    iz = torch.bitwise_right_shift(t["qzeros"][:, :, None], shifts[None, None, :]).to(torch.int8)
    iz = iz.view(iz.shape[0], -1)
    order = torch.arange(iz.shape[-1]).view(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
    iw, iz = iw[:, order], iz[:, order]
    iw, iz = torch.bitwise_and(iw, 15), torch.bitwise_and(iz, 15)
    scales = t["scales"].to(dtype).repeat_interleave(group, dim=0)
    iz = iz.repeat_interleave(group, dim=0)
    return ((iw - iz) * scales).t().contiguous()


def pack_gptq(q, zeros, scales, group, v1):
    """GPTQ layout: qweight packs along in, qzeros along out; v1 subtracts 0x11111111 per word."""
    intweight = q.t().numpy().astype(np.uint32)  # [in, out]
    z = zeros.t().numpy().astype(np.uint32)  # [G, out]
    qweight = np.zeros((intweight.shape[0] // 8, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for k in range(8):
            qweight[row] |= intweight[row * 8 + k] << (4 * k)
    qzeros = np.zeros((z.shape[0], z.shape[1] // 8), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for k in range(8):
            qzeros[:, col] |= z[:, col * 8 + k] << (4 * k)
    if v1:
        # GPTQModel: module.qzeros.data -= 0b0001...0001 on int32 words (wraps; borrows).
        qzeros = (qzeros.astype(np.int64) - V1_OFFSET) & 0xFFFFFFFF
    in_f = q.shape[1]
    return {
        "qweight": u32_to_i32(qweight),
        "qzeros": u32_to_i32(qzeros),
        "scales": scales.t().contiguous(),
        "g_idx": torch.tensor([i // group for i in range(in_f)], dtype=torch.int32),
    }


def dequant_gptq(t, v1, dtype):
    """GPTQModel: v1 -> v2 by adding 0x11111111 per int32 word, then dequantize_weight."""
    qzeros = t["qzeros"]
    if v1:
        # module.qzeros.data += 0b0001...0001 on int32 (wraps); done in int64 and masked.
        qzeros = u32_to_i32((qzeros.numpy().view(np.uint32).astype(np.int64) + V1_OFFSET) & 0xFFFFFFFF)
    wf = torch.arange(0, 32, 4, dtype=torch.int32)
    scales = t["scales"].to(dtype)
    zeros = torch.bitwise_right_shift(qzeros[:, :, None].expand(-1, -1, 8), wf[None, None, :])
    zeros = torch.bitwise_and(zeros.to(torch.int8), 15).reshape(scales.shape)
    weight = torch.bitwise_right_shift(t["qweight"][:, None, :].expand(-1, 8, -1), wf[None, :, None])
    weight = torch.bitwise_and(weight.to(torch.int8), 15)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    g = t["g_idx"].long()
    return (scales[g] * (weight - zeros[g])).t().contiguous()


def dequant_autogptq_v1(t, group, dtype):
    """AutoGPTQ qlinear_cuda_old torch path: zeros = (field & 15) + 1 per field."""
    wf = torch.arange(0, 32, 4, dtype=torch.int32)
    zeros = torch.bitwise_right_shift(t["qzeros"][:, :, None].expand(-1, -1, 8), wf[None, None, :])
    zeros = torch.bitwise_and(zeros.to(torch.int8), 15) + 1
    zeros = zeros.reshape(-1, 1, zeros.shape[1] * zeros.shape[2])
    scales = t["scales"].to(dtype).reshape(-1, 1, t["scales"].shape[-1])
    weight = torch.bitwise_right_shift(t["qweight"][:, None, :].expand(-1, 8, -1), wf[None, :, None])
    weight = torch.bitwise_and(weight.to(torch.int8), 15)
    weight = weight.reshape(-1, group, weight.shape[2])
    w = scales * (weight - zeros)
    return w.reshape(w.shape[0] * w.shape[1], w.shape[2]).t().contiguous()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        (a.view(torch.int16 if a.dtype == torch.float16 else torch.int32)
         == b.view(torch.int16 if b.dtype == torch.float16 else torch.int32)).all()
    )


def main() -> None:
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    gen = torch.Generator().manual_seed(20240531)
    total = 0
    for case, spec in CASES.items():
        qc = spec["quantization_config"]
        group, awq = qc["group_size"], qc["quant_method"] == "awq"
        v1 = not awq and qc.get("checkpoint_format", qc.get("format")) == "gptq"
        model, oracle = {}, {}
        for prefix, out_f, in_f, zeros_kind in spec["projections"]:
            q, zeros, scales = draw(gen, out_f, in_f, group, zeros_kind)
            t = pack_awq(q, zeros, scales) if awq else pack_gptq(q, zeros, scales, group, v1)
            if awq:
                ref32, ref16 = (dequant_awq(t, group, d) for d in (torch.float32, torch.float16))
            else:
                ref32, ref16 = (dequant_gptq(t, v1, d) for d in (torch.float32, torch.float16))
            # The definition, from the drawn values: scale * (q - zero), exact in f32.
            s = scales.float().repeat_interleave(group, dim=1)
            z = zeros.repeat_interleave(group, dim=1)
            assert same_bits(ref32, s * (q - z).float()), f"{case}/{prefix}: unpacking is off"
            assert same_bits(ref16, ref32.half()), f"{case}/{prefix}: f16 path is not f32 rounded"
            if zeros_kind == "sym":
                old = dequant_autogptq_v1(t, group, torch.float32)
                assert same_bits(old, ref32), f"{case}/{prefix}: AutoGPTQ reader disagrees"
            if zeros_kind == "edges" and v1:
                fields = (t["qzeros"][0, 0].item() & 0xFFFFFFFF)
                assert any((fields >> (4 * k)) & 15 == 15 for k in range(8)), "no wrap exercised"
            for part, tensor in t.items():
                model[f"{prefix}.{part}"] = tensor.contiguous()
            oracle[f"{prefix}.weight"] = ref32
        folder = os.path.join(OUT, case)
        os.makedirs(folder)
        config = {"model_type": "phi3", "torch_dtype": "float16", "quantization_config": qc}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        save_file(model, os.path.join(folder, "model.safetensors"))
        save_file(oracle, os.path.join(folder, "oracle.safetensors"))
        # Read back with the library as a check on the files.
        back = load_file(os.path.join(folder, "model.safetensors"))
        assert set(back) == set(model)
        for name in os.listdir(folder):
            total += os.path.getsize(os.path.join(folder, name))
    print(f"wrote {len(CASES)} cases to {os.path.relpath(OUT, ROOT)} ({total} bytes)")


if __name__ == "__main__":
    main()
