"""The fused Triton kernels (runner/engine/layers/ops/triton.py) against their plain-torch twins
(ops.torch.TorchOps).

Run as a module (`TRITON_INTERPRET=1 python -m tests.engine.layers.ops.triton_cases`) the checks execute in
Triton's interpreter on the CPU (ops/test_ops.py starts it in a subprocess, like attention/triton_cases.py).
"""

from __future__ import annotations

import torch

from runner.engine.layers.ops.torch import TorchOps

# (seed, tokens, heads, kv heads, head dim, hidden, intermediate, qk-norm)
CASES = [
    (0, 5, 4, 2, 16, 64, 128, False),
    (1, 3, 6, 2, 16, 96, 80, True),  # odd head counts, a hidden size that is no power of two
    (2, 7, 9, 3, 64, 576, 1536, False),  # SmolLM2's shape
    (3, 2, 8, 2, 80, 160, 200, True),  # head dim 80: RoPE halves padded inside the kernel
]


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| / max(|b|, 1): absolute for small values, relative for large ones."""
    return ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1.0)).max().item()


def max_errors(case, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Largest error (`_error`) of each fused op against its torch twin run on the same device."""
    from runner.engine.layers.ops import triton as fused

    seed, tokens, heads, kv_heads, dim, hidden, inter, qk_norm = case
    g = torch.Generator().manual_seed(seed)

    def rand(*shape) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    errors = {}
    h, delta, w = rand(tokens, hidden), rand(tokens, hidden), rand(hidden)
    h_fused, h_torch = h.clone(), h.clone()
    out_fused = fused.add_rms_norm(h_fused, delta, w, 1e-6)
    out_torch = TorchOps.add_rms_norm(h_torch, delta, w, 1e-6)
    errors["add_rms_norm"] = max(_error(out_fused, out_torch), _error(h_fused, h_torch))
    errors["rms_norm"] = _error(fused.add_rms_norm(h, None, w, 1e-6), TorchOps.add_rms_norm(h, None, w, 1e-6))

    qkv = rand(tokens, (heads + 2 * kv_heads) * dim)
    angles = torch.rand(tokens, dim // 2, generator=g) * 6.3
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(device, dtype)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(device, dtype)
    pages, page = 6, 4
    slots = torch.randperm(pages * page, generator=g)[:tokens].to(device)
    norms = (rand(dim), rand(dim)) if qk_norm else (None, None)
    results = []
    for ops, source in ((fused, qkv.clone()), (TorchOps, qkv.clone())):
        k_cache = torch.zeros(pages, page, kv_heads, dim, device=device, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        q = ops.rope_store(source, cos, sin, k_cache, v_cache, slots, heads, *norms, 1e-6)
        results.append((q, k_cache, v_cache))
    errors["rope_store"] = max(_error(a, b) for a, b in zip(*results, strict=True))

    gate_up = rand(tokens, 2 * inter)
    errors["silu_mul"] = _error(fused.silu_mul(gate_up), TorchOps.silu_mul(gate_up))
    errors["gelu_tanh_mul"] = _error(fused.gelu_tanh_mul(gate_up), TorchOps.gelu_tanh_mul(gate_up))
    return errors


def fp8_errors(case, device: str, dtype: torch.dtype) -> dict[str, float]:
    """The norm's and the activations' outputs quantized for an fp8 linear (`fp8=True`), fused against
    torch: the largest relative difference of the per-token scales, and (on CUDA) the share of fp8 values
    that differ. Triton's interpreter does not round fp32 -> fp8 as the hardware does
    (fp8/triton_cases.py), so
    there the values are only checked for shape and dtype."""
    from runner.engine.layers.fp8.torch import FP8
    from runner.engine.layers.ops import triton as fused

    seed, tokens, _, _, _, hidden, inter, _ = case
    g = torch.Generator().manual_seed(seed)

    def rand(*shape) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    h, delta, w = rand(tokens, hidden), rand(tokens, hidden), rand(hidden)
    h[0] = -delta[0]  # a row that is all zeros after the add: the smallest scale
    gate_up = rand(tokens, 2 * inter) * torch.logspace(-2, 2, tokens)[:, None].to(device, dtype)  # row ranges
    pairs = {
        "add_rms_norm": [ops.add_rms_norm(h.clone(), delta, w, 1e-6, fp8=True) for ops in (fused, TorchOps)],
        "silu_mul": [ops.silu_mul(gate_up, fp8=True) for ops in (fused, TorchOps)],
        "gelu_tanh_mul": [ops.gelu_tanh_mul(gate_up, fp8=True) for ops in (fused, TorchOps)],
    }
    errors = {}
    for name, (a, b) in pairs.items():
        assert a.q.dtype == b.q.dtype == FP8 and a.q.shape == b.q.shape and a.scale.shape == b.scale.shape
        assert a.dtype == b.dtype == dtype
        errors[f"{name} scale"] = ((a.scale - b.scale).abs() / b.scale).max().item()
        if device == "cuda":
            errors[f"{name} values"] = (a.q.float() != b.q.float()).float().mean().item()
    return errors


def main() -> None:
    for case in CASES:
        errors = max_errors(case, "cpu", torch.float32)
        print(f"case {case[0]}: max errors {errors}")
        assert max(errors.values()) < 1e-4, (case, errors)
        fp8 = fp8_errors(case, "cpu", torch.float32)
        print(f"case {case[0]}: fp8 scale errors {fp8}")
        assert max(fp8.values()) < 1e-5, (case, fp8)


if __name__ == "__main__":
    main()
