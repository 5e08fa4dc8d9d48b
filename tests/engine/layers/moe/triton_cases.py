"""The Triton fused-MoE kernels (layers/moe/triton.py) against the torch twin (moe.experts_torch).

Run as a module (`TRITON_INTERPRET=1 python -m tests.engine.layers.moe.triton_cases`) the checks execute in
Triton's interpreter on the CPU (test_moe.py starts it in a subprocess, like the other kernel cases).
"""

from __future__ import annotations

import torch

from runner.engine.layers.fp8.torch import Fp8Experts, dequantize, quantize_rows
from runner.engine.layers.moe.torch import experts_torch, route

# (seed, tokens, hidden, intermediate, experts, top_k, fp32 routing weights)
CASES = [
    (0, 1, 64, 32, 8, 2, False),  # one decode token: most experts unused
    (1, 5, 48, 40, 4, 2, True),  # sizes that are no power of two, Mixtral's fp32 weights
    (2, 13, 64, 48, 8, 3, False),  # an expert block with padding rows
    (3, 100, 32, 48, 2, 2, False),  # ~100 pairs per expert: the 64-row prefill tiles
    (6, 300, 32, 24, 2, 2, False),  # ~300 pairs per expert: the 128-row tiles of a long prefill
    (4, 40, 32, 16, 16, 4, True),  # 10 pairs per expert (decode at a few hundred rows), K < a tile
    (5, 30, 32, 40, 2, 2, False),  # 30 pairs per expert: mid-size tiles
]


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| / max(|b|, 1)."""
    return ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1.0)).max().item()


def inputs(case, device: str, dtype: torch.dtype):
    seed, tokens, hidden, inter, experts, top_k, fp32_weights = case
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g)).to(device, dtype)

    x = rand(tokens, hidden)
    gate_up, down = rand(experts, 2 * inter, hidden, scale=0.2), rand(experts, hidden, inter, scale=0.2)
    logits = rand(tokens, experts, scale=2.0)
    weights, ids = route(
        logits, top_k, renormalize=fp32_weights, weight_dtype=torch.float32 if fp32_weights else dtype
    )
    return x, gate_up, down, weights, ids


def max_error(case, device: str, dtype: torch.dtype, silu_mul) -> float:
    from runner.engine.layers.moe.triton import fused_experts

    args = inputs(case, device, dtype)
    return _error(fused_experts(*args, silu_mul), experts_torch(*args, silu_mul))


def fp8_gemm_error(case, device: str) -> float:
    """The grouped GEMMs on fp8 experts (`Fp8Experts`) and activations quantized per row (in torch, which
    rounds to fp8 as the hardware does; Triton's interpreter does not,
    fp8/triton_cases.py), both scales applied,
    against the dequantized values multiplied in fp32: gate/up (rows shared by a token's k pairs) and
    down (a row per pair, times its routing weight)."""
    from runner.engine.layers.moe.triton import FP8, _blocks, _grouped_gemm, align_blocks

    x, gate_up, down, weights, ids = inputs(case, device, torch.float32)
    tokens, top_k = ids.shape
    blocks = _blocks(tokens * top_k, gate_up.shape[0], FP8)
    align = align_blocks(ids, gate_up.shape[0], blocks["BLOCK_M"])
    errors = []
    pair_rows = torch.randn(tokens * top_k, down.shape[2], generator=torch.Generator().manual_seed(case[0]))
    pair_weights = weights.flatten().float()
    for w, a, a_div, mul in ((gate_up, x, top_k, None), (down, pair_rows.to(device), 1, pair_weights)):
        experts = Fp8Experts.quantize(w)
        aq, a_scale = quantize_rows(a)
        out = torch.empty(tokens * top_k, w.shape[1], device=device)
        _grouped_gemm(aq, experts.weight, out, mul, align, a_div, blocks, (a_scale, experts.scale))
        values, rows = experts.values(), dequantize(aq, a_scale)
        pairs = torch.arange(tokens * top_k, device=device)
        expected = torch.einsum("pk,pnk->pn", rows[pairs // a_div], values[ids.flatten()])
        if mul is not None:
            expected = expected * mul[:, None]
        errors.append(_error(out, expected))
    return max(errors)


def _torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def main() -> None:
    for case in CASES:
        error = max_error(case, "cpu", torch.float32, _torch_silu_mul)
        # 16-bit: the interpreter's dot is wrong for bf16 (the paged-attention kernel's too), fp16 is fine
        half = max_error(case, "cpu", torch.float16, _torch_silu_mul)
        print(f"case {case[0]}: max error {error:.2e} (fp16 {half:.2e})")
        assert error < 1e-5 and half < 1e-2, (case, error, half)
        fp8 = fp8_gemm_error(case, "cpu")
        print(f"case {case[0]}: fp8 gemm error {fp8:.2e}")
        assert fp8 < 1e-5, (case, fp8)


if __name__ == "__main__":
    main()
