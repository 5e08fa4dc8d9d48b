"""Triton kernel (CUDA; the tests also run it in Triton's interpreter): dynamic per-token fp8 quantization.

In plain torch the quantization of the activations before each fp8 GEMM is ~7 kernels (float, abs,
amax, div, clamp, div, cast) that each read or write [T, K]; here it is one program per token that
reads the row twice (amax, then scale and cast) and writes the fp8 row and its scale.
`fp8.quantize_rows` is the plain-torch twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runner.engine.layers.fp8.format import FP8, FP8_MAX, INV_FP8_MAX, MIN_SCALE


@triton.jit
def _quantize_rows_kernel(
    x_ptr,  # [T, K] bf16 / fp16 / fp32
    q_ptr,  # [T, K] float8_e4m3fn
    s_ptr,  # [T] fp32
    stride_x, stride_q, K,
    FMAX: tl.constexpr, INV_FMAX: tl.constexpr, SMIN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, K, BLOCK):
        ok = k + cols < K
        x = tl.load(x_ptr + t * stride_x + k + cols, mask=ok, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) * INV_FMAX, SMIN)
    tl.store(s_ptr + t, scale)
    inv = tl.div_rn(1.0, scale)  # IEEE division (Triton's `/` is approximate), once a row
    for k in range(0, K, BLOCK):
        ok = k + cols < K
        x = tl.load(x_ptr + t * stride_x + k + cols, mask=ok, other=0.0).to(tl.float32)
        q = tl.clamp(x * inv, -FMAX, FMAX)
        tl.store(q_ptr + t * stride_q + k + cols, q.to(q_ptr.dtype.element_ty), mask=ok)


def quantize_rows_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] -> (xq [T, K] float8_e4m3fn, scale [T, 1] fp32), as `fp8.quantize_rows`."""
    assert x.dim() == 2 and x.stride(-1) == 1
    t, k = x.shape
    q = torch.empty((t, k), dtype=FP8, device=x.device)
    s = torch.empty((t, 1), dtype=torch.float32, device=x.device)
    block = min(4096, triton.next_power_of_2(k))
    _quantize_rows_kernel[(t,)](
        x, q, s, x.stride(0), q.stride(0), k,
        FMAX=FP8_MAX, INV_FMAX=INV_FP8_MAX, SMIN=MIN_SCALE, BLOCK=block,
        num_warps=min(8, max(1, block // 512)),
    )  # fmt: skip
    return q, s
