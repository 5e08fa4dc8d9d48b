"""Fused Triton kernels for the small ops between the matmuls (CUDA; the tests also run them in Triton's
interpreter).

Unfused, a layer's RMSNorms (fp32 casts, pow, mean, rsqrt, ...), RoPE (neg, cat, muls, adds), the
KV store and SiLU·mul are ~30 kernels that each read and write the activations. Here they are three:

- `add_rms_norm`: residual add (in place) and RMSNorm of the sum, one program per token;
- `rope_store`: (QK-norm,) RoPE of q in place and of k, and the store of k and v into the paged
  cache (converted to fp8 when the cache is fp8, as `attention.to_cache`), one program per token;
- `silu_mul` / `gelu_tanh_mul`: SiLU(gate) · up (GELU with the tanh approximation for Gemma) from
  the fused gate/up projection.

Each rounds to the activation dtype where transformers' Llama does (after the add, after the
normalisation, after each RoPE product), so bf16 results track transformers' closely. With `fp8=True`
the norm and the activation hand their output to an fp8 linear quantized per token (`Fp8Activations`:
the rounded row, its amax / 448 as the scale, the row times the scale's reciprocal, as
`fp8.quantize_rows`), which saves the quantization kernel's two reads and the bf16 write and read
between them.
`ops.TorchOps` is the plain-torch twin used on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runner.engine.layers.fp8.format import FP8, FP8_MAX, INV_FP8_MAX, MIN_SCALE
from runner.engine.layers.fp8.torch import Fp8Activations


@triton.jit
def _quantized(y, s_ptr, QUANT: tl.constexpr, FMAX: tl.constexpr, INV_FMAX: tl.constexpr, SMIN: tl.constexpr):
    """A row y (the activation dtype, masked lanes 0) as stored: itself, or with QUANT times the
    reciprocal of its scale max(amax / FMAX, SMIN), which goes to s_ptr, and clamped (as
    `fp8.quantize_rows`)."""
    if QUANT:
        yf = y.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(yf), 0) * INV_FMAX, SMIN)
        tl.store(s_ptr, scale)
        y = tl.clamp(yf * tl.div_rn(1.0, scale), -FMAX, FMAX)
    return y


def _fp8_output(x: torch.Tensor, width: int, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The output [T, width] (x's dtype, or fp8) and the per-token scales [T, 1] (fp8; else a stand-in)."""
    out = torch.empty((x.shape[0], width), device=x.device, dtype=FP8 if fp8 else x.dtype)
    scale = torch.empty((x.shape[0], 1), device=x.device, dtype=torch.float32) if fp8 else out
    return out, scale


@triton.jit
def _add_rms_norm_kernel(
    h_ptr,  # [T, N]: residual stream, updated in place when HAS_DELTA
    delta_ptr,  # [T, N]
    w_ptr,  # [N]
    out_ptr,  # [T, N]: h's dtype, or fp8 (QUANT)
    s_ptr,  # [T] fp32 (QUANT)
    eps,
    stride_h, stride_d, stride_o,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr,
    QUANT: tl.constexpr, FMAX: tl.constexpr, INV_FMAX: tl.constexpr, SMIN: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    dtype = h_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(h_ptr + t * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x = (x + tl.load(delta_ptr + t * stride_d + cols, mask=ok, other=0.0).to(tl.float32)).to(dtype)
        tl.store(h_ptr + t * stride_h + cols, x, mask=ok)
        x = x.to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(x * x, 0) / N + eps)
    y = (x * inv).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = _quantized((w * y).to(dtype), s_ptr + t, QUANT, FMAX, INV_FMAX, SMIN)
    tl.store(out_ptr + t * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, fp8: bool = False
) -> torch.Tensor | Fp8Activations:
    """`h += delta` (in place, when given), then RMSNorm(h) * weight. h, delta: [T, N] -> [T, N]
    (quantized for an fp8 linear with `fp8`)."""
    assert h.stride(-1) == 1 and (delta is None or delta.stride(-1) == 1)
    n = h.shape[-1]
    out, scale = _fp8_output(h, n, fp8)
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(h.shape[0],)](
        h, h if delta is None else delta, weight, out, scale, eps,
        h.stride(0), 0 if delta is None else delta.stride(0), out.stride(0),
        N=n, BLOCK=block, HAS_DELTA=delta is not None, QUANT=fp8, FMAX=FP8_MAX, INV_FMAX=INV_FP8_MAX,
        SMIN=MIN_SCALE, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return Fp8Activations(out, scale, h.dtype) if fp8 else out


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2, DTYPE: tl.constexpr):
    """RoPE of the two halves x1, x2 ([heads, D/2], fp32) with transformers' roundings."""
    o1 = (x1 * c1).to(DTYPE).to(tl.float32) + (-x2 * s1).to(DTYPE).to(tl.float32)
    o2 = (x2 * c2).to(DTYPE).to(tl.float32) + (x1 * s2).to(DTYPE).to(tl.float32)
    return o1.to(DTYPE), o2.to(DTYPE)


@triton.jit
def _head_norm(x1, x2, w_ptr, eps, HALF: tl.constexpr, HALF_PAD: tl.constexpr, DTYPE: tl.constexpr):
    """Per-head RMSNorm over D of the halves x1, x2 ([heads, D/2], fp32) (Qwen3's q_norm / k_norm)."""
    inv = tl.math.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
    d = tl.arange(0, HALF_PAD)
    w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    y1 = (x1 * inv[:, None]).to(DTYPE).to(tl.float32)
    y2 = (x2 * inv[:, None]).to(DTYPE).to(tl.float32)
    return (w1[None, :] * y1).to(DTYPE).to(tl.float32), (w2[None, :] * y2).to(DTYPE).to(tl.float32)


@triton.jit
def _load_norm_rotate(
    at, ok, norm_ptr, eps, c1, c2, s1, s2,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, QK_NORM: tl.constexpr, DTYPE: tl.constexpr,
):  # fmt: skip
    """The heads whose first halves `at` points to ([heads, D/2]), (QK-normed and) rotated: two halves."""
    x1 = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(at + HALF, mask=ok, other=0.0).to(tl.float32)
    if QK_NORM:
        x1, x2 = _head_norm(x1, x2, norm_ptr, eps, HALF, HALF_PAD, DTYPE)
    return _rotate(x1, x2, c1, c2, s1, s2, DTYPE)


@triton.jit
def _to_cache(x, CACHE_DTYPE: tl.constexpr, FP8_KV: tl.constexpr, FMAX: tl.constexpr):
    """K or V as the cache stores them (`attention.to_cache`): fp8 with scale 1.0, clamped to +-FMAX."""
    if FP8_KV:
        x = tl.clamp(x.to(tl.float32), -FMAX, FMAX).to(CACHE_DTYPE, fp_downcast_rounding="rtne")
    return x


@triton.jit
def _rope_store_kernel(
    qkv_ptr,  # [T, (H + 2 Hkv) D]: q is rotated in place
    cos_ptr,  # [T, D]
    sin_ptr,
    k_cache_ptr,  # [slots, Hkv, D]: the model dtype, or fp8 (FP8_KV)
    v_cache_ptr,
    slot_ptr,  # [T]
    q_norm_ptr,  # [D] (QK_NORM only)
    k_norm_ptr,
    eps,
    stride_t, stride_c, stride_slot,
    H: tl.constexpr, HKV: tl.constexpr, H_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, QK_NORM: tl.constexpr, FP8_KV: tl.constexpr,
    FMAX: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    dtype = qkv_ptr.dtype.element_ty
    kv_dtype = k_cache_ptr.dtype.element_ty
    d = tl.arange(0, HALF_PAD)
    d_ok = d < HALF
    row = qkv_ptr + t * stride_t
    c1 = tl.load(cos_ptr + t * stride_c + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * stride_c + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * stride_c + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * stride_c + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]

    hq = tl.arange(0, H_PAD)[:, None]
    q_at = row + hq * (2 * HALF) + d[None, :]
    q_ok = (hq < H) & d_ok[None, :]
    q1, q2 = _load_norm_rotate(q_at, q_ok, q_norm_ptr, eps, c1, c2, s1, s2, HALF, HALF_PAD, QK_NORM, dtype)
    tl.store(q_at, q1, mask=q_ok)
    tl.store(q_at + HALF, q2, mask=q_ok)

    hk = tl.arange(0, HKV_PAD)[:, None]
    k_at = row + H * 2 * HALF + hk * (2 * HALF) + d[None, :]
    k_ok = (hk < HKV) & d_ok[None, :]
    k1, k2 = _load_norm_rotate(k_at, k_ok, k_norm_ptr, eps, c1, c2, s1, s2, HALF, HALF_PAD, QK_NORM, dtype)
    slot = tl.load(slot_ptr + t)
    cache_at = slot * stride_slot + hk * (2 * HALF) + d[None, :]
    tl.store(k_cache_ptr + cache_at, _to_cache(k1, kv_dtype, FP8_KV, FMAX), mask=k_ok)
    tl.store(k_cache_ptr + cache_at + HALF, _to_cache(k2, kv_dtype, FP8_KV, FMAX), mask=k_ok)
    v_at = k_at + HKV * 2 * HALF
    v1, v2 = tl.load(v_at, mask=k_ok), tl.load(v_at + HALF, mask=k_ok)
    tl.store(v_cache_ptr + cache_at, _to_cache(v1, kv_dtype, FP8_KV, FMAX), mask=k_ok)
    tl.store(v_cache_ptr + cache_at + HALF, _to_cache(v2, kv_dtype, FP8_KV, FMAX), mask=k_ok)


def rope_store(
    qkv: torch.Tensor,  # [T, (H + 2 Hkv) D]
    cos: torch.Tensor,  # [T, D]
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [P, page, Hkv, D]: the model dtype, or fp8
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]
    heads: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Rotate q in place and store rotated k and v at their cache slots (as `attention.to_cache`);
    returns q as [T, H, D]."""
    _, page, kv_heads, dim = k_cache.shape
    assert qkv.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert cos.is_contiguous() and sin.is_contiguous() and dim % 2 == 0
    _rope_store_kernel[(qkv.shape[0],)](
        qkv, cos, sin, k_cache, v_cache, slot_mapping,
        q_norm if q_norm is not None else cos, k_norm if k_norm is not None else cos, eps,
        qkv.stride(0), cos.stride(0), kv_heads * dim,
        H=heads, HKV=kv_heads, H_PAD=triton.next_power_of_2(heads),
        HKV_PAD=triton.next_power_of_2(kv_heads), HALF=dim // 2,
        HALF_PAD=triton.next_power_of_2(dim // 2), QK_NORM=q_norm is not None,
        FP8_KV=k_cache.dtype == FP8, FMAX=FP8_MAX, num_warps=4,
    )  # fmt: skip
    return qkv[:, : heads * dim].view(-1, heads, dim)


@triton.jit
def _silu_mul_kernel(
    gu_ptr,  # [T, 2 I]
    out_ptr,  # [T, I]: gu's dtype, or fp8 (QUANT: BLOCK covers the row)
    s_ptr,  # [T] fp32 (QUANT)
    stride_gu, stride_o,
    INTER: tl.constexpr, BLOCK: tl.constexpr, GELU: tl.constexpr,
    QUANT: tl.constexpr, FMAX: tl.constexpr, INV_FMAX: tl.constexpr, SMIN: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < INTER
    dtype = gu_ptr.dtype.element_ty
    g = tl.load(gu_ptr + t * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * stride_gu + INTER + cols, mask=ok, other=0.0).to(tl.float32)
    if GELU:  # noqa: SIM108 (constexpr) 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), tanh(x) = 2 sigmoid(2x) - 1
        act = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    else:
        act = g / (1.0 + tl.exp(-g))
    act = act.to(dtype).to(tl.float32)
    y = _quantized((act * u).to(dtype), s_ptr + t, QUANT, FMAX, INV_FMAX, SMIN)
    tl.store(out_ptr + t * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Activations:
    """SiLU(gate) * up of the fused projection's output [T, 2 I] -> [T, I] (quantized with `fp8`)."""
    return _act_mul(gate_up, gelu=False, fp8=fp8)


def gelu_tanh_mul(gate_up: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Activations:
    """GELU(gate) (tanh approximation, transformers' `gelu_pytorch_tanh`) * up: [T, 2 I] -> [T, I]
    (quantized with `fp8`)."""
    return _act_mul(gate_up, gelu=True, fp8=fp8)


def _act_mul(gate_up: torch.Tensor, gelu: bool, fp8: bool) -> torch.Tensor | Fp8Activations:
    assert gate_up.stride(1) == 1
    inter = gate_up.shape[1] // 2
    out, scale = _fp8_output(gate_up, inter, fp8)
    # a quantized row is one program (its amax; 8 warps for W3's 14336, scripts/bench_gemm.py); else
    # blocks of 1024 spread a few rows over the GPU
    block = triton.next_power_of_2(inter) if fp8 else min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(inter, block))](
        gate_up, out, scale, gate_up.stride(0), out.stride(0), INTER=inter, BLOCK=block, GELU=gelu,
        QUANT=fp8, FMAX=FP8_MAX, INV_FMAX=INV_FP8_MAX, SMIN=MIN_SCALE,
        num_warps=min(32, max(4, block // 2048)),
    )  # fmt: skip
    return Fp8Activations(out, scale, gate_up.dtype) if fp8 else out
