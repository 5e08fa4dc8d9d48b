"""The decoder's GEMMs on the GPU at a workload's shapes: bf16 `F.linear` against fp8 `torch._scaled_mm`
with row-wise scales (with and without fast accumulation) and the per-token activation quantization
that precedes each fp8 GEMM; and the kernels that make a GEMM's fp8 input, RMSNorm and SiLU·mul, with
the quantization fused (`fp8=True`) and as a kernel of its own after them. Each is timed over 20 calls
in a CUDA graph; FLOP/s are beside the 8192^3 rates measured in the same process (`bench.measure_rates`).

    python scripts/bench_gemm.py --workload W3 --rows 256,1024,8192 --out gemm-w3.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.engine.layers.fp8.torch import quantize_weight  # noqa: E402
from runner.engine.layers.fp8.triton import quantize_rows_kernel  # noqa: E402
from runner.engine.layers.ops import triton as fused  # noqa: E402
from scripts.bench import WORKLOADS, measure_rates  # noqa: E402


def shapes(name: str) -> dict[str, tuple[int, int]]:
    """The (out, in) features of one decoder layer's linears and of the LM head."""
    w = WORKLOADS[name]
    return {
        "qkv": ((w.heads + 2 * w.kv_heads) * w.head_dim, w.hidden),
        "o": (w.hidden, w.heads * w.head_dim),
        "gate_up": (2 * w.inter, w.hidden),
        "down": (w.hidden, w.inter),
        "lm_head": (w.vocab, w.hidden),
    }


def graph_ms(fn, calls: int = 20) -> float:
    """Mean ms of `fn` replayed from a CUDA graph of `calls` calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (5 * calls)


def one(n: int, k: int, rows: int) -> dict:
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wq, ws = quantize_weight(w)
    wt, ws = wq.t(), ws.reshape(1, n)
    xq, xs = quantize_rows_kernel(x)
    flop = 2 * rows * n * k
    out = {"rows": rows, "n": n, "k": k}
    timings = {
        "bf16": lambda: F.linear(x, w),
        "fp8": lambda: torch._scaled_mm(xq, wt, scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16),
        "fp8_fast_accum": lambda: torch._scaled_mm(
            xq, wt, scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=True
        ),
        "quantize": lambda: quantize_rows_kernel(x),
    }
    for name, fn in timings.items():
        ms = graph_ms(fn)
        out[f"{name}_us"] = round(ms * 1e3, 1)
        if name != "quantize":
            out[f"{name}_tflops"] = round(flop / ms / 1e9, 1)
    return out


def producers(name: str, rows: int) -> dict:
    """µs of RMSNorm and SiLU·mul handing an fp8 GEMM its input: fused, and followed by the quantization."""
    w = WORKLOADS[name]
    h = torch.randn(rows, w.hidden, device="cuda", dtype=torch.bfloat16)
    norm = torch.randn(w.hidden, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(rows, 2 * w.inter, device="cuda", dtype=torch.bfloat16)
    timings = {
        "rms_norm_fp8_fused": lambda: fused.add_rms_norm(h, None, norm, 1e-6, fp8=True),
        "rms_norm_then_quantize": lambda: quantize_rows_kernel(fused.add_rms_norm(h, None, norm, 1e-6)),
        "silu_mul_fp8_fused": lambda: fused.silu_mul(gate_up, fp8=True),
        "silu_mul_then_quantize": lambda: quantize_rows_kernel(fused.silu_mul(gate_up)),
    }
    return {"rows": rows} | {f"{k}_us": round(graph_ms(fn) * 1e3, 1) for k, fn in timings.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="W3")
    ap.add_argument("--rows", default="256,1024,8192")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rates = measure_rates()
    report = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "rates": {"bf16_tflops": rates.bf16_flops / 1e12, "fp8_tflops": rates.fp8_flops / 1e12},
        "gemms": [],
        "producers": [],
    }
    for rows in (int(r) for r in args.rows.split(",")):
        report["producers"].append(producers(args.workload, rows))
        print(json.dumps(report["producers"][-1]), flush=True)
        for name, (n, k) in shapes(args.workload).items():
            r = {"linear": name} | one(n, k, rows)
            print(json.dumps(r), flush=True)
            report["gemms"].append(r)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
