"""The fp8 KV cache's kernels: `fused.rope_store` writes the same fp8 bytes as `TorchOps.rope_store`, and
the paged attention over an fp8 cache equals the reference over the same (rounded, upcast) K/V.

Run as a module (`TRITON_INTERPRET=1 python -m tests.engine.layers.attention.kv_fp8_cases`) the checks
execute in
Triton's interpreter (test_kv_fp8.py starts it in a subprocess, like attention/triton_cases.py). Triton 3.9's
interpreter does not round fp32 -> float8e4nv as the GPU does (subnormals flush to zero, a rounding
carry is lost: fp8/triton_cases.py says the same), so under the interpreter that one conversion is replaced
by the GPU's (`cvt.rn.satfinite`: round to nearest even, saturate), which is torch's cast after a clamp.
The kernels' own work (what is clamped, converted, and stored where; the upcast reads) is what is
checked; on CUDA the same checks run unpatched (test_kv_fp8.py, `-m gpu`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from runner.engine.layers.attention.torch import to_cache
from runner.engine.layers.fp8.format import FP8, FP8_MAX
from runner.engine.layers.ops.torch import TorchOps
from tests.engine.layers.attention.triton_cases import CASES, relative_error

# (seed, tokens, heads, kv heads, head dim, qk-norm, K/V magnitude): the last one puts values past
# e4m3's +-448 (clamped) and under its smallest normal 2^-6 (subnormals)
ROPE_CASES = [
    (0, 5, 4, 2, 16, False, 1.0),
    (1, 9, 6, 2, 64, True, 1.0),
    (2, 7, 8, 2, 80, False, 300.0),  # head dim 80: halves padded inside the kernel
    (3, 6, 4, 4, 32, False, 1e-3),
]


def use_gpu_fp8_rounding() -> None:
    """Make the interpreter convert fp32 -> float8e4nv as the GPU does (see the module docstring)."""
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    RTNE = interpreter._ir.ROUNDING_MODE.RTNE

    def gpu_convert(data, input_dtype, output_dtype, rounding_mode):
        if (input_dtype, output_dtype, rounding_mode) == (tl.float32, tl.float8e4nv, RTNE):
            x = torch.from_numpy(np.frombuffer(data.tobytes(), dtype=np.float32).copy())
            return x.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8).numpy().reshape(data.shape)
        return convert(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = gpu_convert


def rope_store_mismatches(case, device: str, dtype: torch.dtype) -> int:
    """fp8 cache bytes that `fused.rope_store` writes otherwise than `to_cache` of what it writes into a
    cache of the model dtype; in fp32, where the kernel and torch round alike, also otherwise than
    `TorchOps.rope_store` (in bf16 they may differ by a rounding before the cast: ops/test_ops.py)."""
    from runner.engine.layers.ops import triton as fused

    seed, tokens, heads, kv_heads, dim, qk_norm, magnitude = case
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g) * magnitude).to(device, dtype)
    angles = torch.rand(tokens, dim // 2, generator=g) * 6.3
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(device, dtype)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(device, dtype)
    pages, page = 4, 4
    slots = torch.randperm(pages * page, generator=g)[:tokens].to(device)
    norms = (torch.randn(dim, generator=g).to(device, dtype),) * 2 if qk_norm else (None, None)

    def store(ops, cache_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache = torch.zeros(pages, page, kv_heads, dim, device=device, dtype=cache_dtype)
        v_cache = torch.zeros_like(k_cache)
        ops.rope_store(qkv.clone(), cos, sin, k_cache, v_cache, slots, heads, *norms, 1e-6)
        return k_cache, v_cache

    got = [c.view(torch.uint8) for c in store(fused, FP8)]  # K, V bytes
    wants = [[to_cache(c, FP8).view(torch.uint8) for c in store(fused, dtype)]]
    if dtype == torch.float32:
        wants.append([c.view(torch.uint8) for c in store(TorchOps, FP8)])
    assert got[0].count_nonzero() > 0 and ((got[0] & 0x7F) != 0x7F).all()  # stored; no NaN (0x7F, 0xFF)
    return sum(int((g != w).sum()) for want in wants for g, w in zip(got, want, strict=True))


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        use_gpu_fp8_rounding()
    for case in ROPE_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            bad = rope_store_mismatches(case, "cpu", dtype)
            print(f"rope_store case {case[0]} {dtype}: {bad} fp8 bytes differ")
            assert bad == 0, (case, dtype)
    for case in CASES:  # bf16 queries: the dots run in fp16 (paged_attention.half_dot)
        for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            err = relative_error(case, "cpu", dtype, kv_dtype=FP8)
            print(f"fp8 cache case {case[0]} {dtype}: relative error {err:.2e}")
            assert err < bound, (case, dtype)


if __name__ == "__main__":
    main()
