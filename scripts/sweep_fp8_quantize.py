"""SiLU·mul with the per-token fp8 quantization fused, one program a row, at W3's intermediate size
(14336): warps per program, and the quantization as an IEEE division per value (`div`) or a product
with the scale's reciprocal (`recip`, what the engine does), against the engine's kernels: fused
(`fused.silu_mul(fp8=True)`), and SiLU·mul followed by the quantization kernel. µs per call, timed
in a CUDA graph of 20 calls (`bench_gemm.graph_ms`).

    python scripts/sweep_fp8_quantize.py --out silu-fp8-variants.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.engine.layers.fp8.triton import quantize_rows_kernel  # noqa: E402
from runner.engine.layers.ops import triton as fused  # noqa: E402
from scripts.bench_gemm import graph_ms  # noqa: E402

INTER = 14336


@triton.jit
def _silu_mul_fp8(gu_ptr, out_ptr, s_ptr, stride_gu, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr,
                  RECIP: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < INTER
    g = tl.load(gu_ptr + t * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * stride_gu + INTER + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32)
    y = (act * u).to(tl.bfloat16).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(y), 0) * (1.0 / 448.0), 1e-12)
    tl.store(s_ptr + t, scale)
    if RECIP:  # noqa: SIM108 (constexpr)
        q = y * tl.div_rn(1.0, scale)
    else:
        q = tl.div_rn(y, scale)
    tl.store(out_ptr + t * stride_o + cols, tl.clamp(q, -448.0, 448.0).to(out_ptr.dtype.element_ty), mask=ok)


def variant(gate_up: torch.Tensor, warps: int, recip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = gate_up.shape[0]
    out = torch.empty(rows, INTER, device="cuda", dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, 1, device="cuda")
    _silu_mul_fp8[(rows,)](
        gate_up, out, scale, gate_up.stride(0), out.stride(0), INTER=INTER,
        BLOCK=triton.next_power_of_2(INTER), RECIP=recip, num_warps=warps,
    )  # fmt: skip
    return out, scale


def timings(gate_up: torch.Tensor) -> dict[str, float]:
    """µs per call of each variant and of the engine's kernels on `gate_up` [rows, 2 INTER]."""
    us = {
        "engine_fused": lambda: fused.silu_mul(gate_up, fp8=True),
        "engine_silu_mul_then_quantize": lambda: quantize_rows_kernel(fused.silu_mul(gate_up)),
        "engine_silu_mul_alone": lambda: fused.silu_mul(gate_up),
    }
    for warps in (8, 16, 32):
        for recip in (False, True):
            us[f"w{warps}_{'recip' if recip else 'div'}"] = lambda w=warps, r=recip: variant(gate_up, w, r)
    return {k: round(graph_ms(fn) * 1e3, 1) for k, fn in us.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    report = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "runs": []}
    for rows in (256, 1024, 8192):
        gate_up = torch.randn(rows, 2 * INTER, device="cuda", dtype=torch.bfloat16)
        run = {"rows": rows} | timings(gate_up)
        engine = fused.silu_mul(gate_up, fp8=True)
        q, scale = variant(gate_up, 8, recip=True)
        run["w8_recip_equals_engine"] = torch.equal(q.float(), engine.q.float()) and torch.equal(
            scale, engine.scale
        )
        print(json.dumps(run), flush=True)
        report["runs"].append(run)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
