"""The routed experts as two grouped GEMMs in Triton (CUDA; the tests also run it in Triton's interpreter).

`align_blocks` sorts the T·k (token, choice) pairs into blocks of BLOCK_M rows that each belong
to one expert. One kernel then runs every block's rows against its expert's weights:

1. gate/up: `inter[pair] = x[pair // k] @ gate_up[e].T`  ([T k, 2 I]);
2. SiLU·mul of the two halves (the model's `silu_mul`, a fused kernel on CUDA);
3. down: `out[pair] = w[pair] * (act[pair] @ down[e].T)`  ([T k, H]), then the sum over the k choices.

Grids are sized by the padded bound, not by the routing: blocks past `num_used` return at once, so
a decode step's launch is the same whatever the tokens chose (CUDA graphs replay it). The weight
product rounds to the activation dtype first, as transformers does. `moe.experts_torch` is the twin.

fp8 experts (`fp8.Fp8Experts`): x is quantized per token and SiLU·mul's output per pair (its fused
kernel, `fp8=True`); the tiles multiply as fp8 (Hopper's fp8 tensor cores) and each result is scaled
by its row's activation scale and its column's weight scale before the rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from runner.engine.layers.fp8.torch import FP8, Fp8Experts
from runner.engine.layers.fp8.triton import quantize_rows_kernel

SiluMul = Callable[..., torch.Tensor]  # [R, 2 I] -> [R, I] (with fp8=True: `fp8.Fp8Activations`)


def align_blocks(
    ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, choice) pairs of `ids` [T, k] into blocks of `block_m` rows, each block holding
    pairs of one expert; all on the device, shapes fixed by (T, k, E, block_m) alone.

    Returns `pairs` [P_max] int32 (pair id `t * k + j` per row, `T * k` in padding rows), `block_expert`
    [P_max / block_m] int32 (the expert of each block; blocks past the used ones repeat the last
    expert) and `num_used` [1] int32 (rows in use, a multiple of block_m). P_max bounds the padding:
    at most min(E, T k) experts are used, each wasting fewer than block_m rows."""
    flat = ids.flatten()  # [P]
    num_pairs = flat.numel()
    p_max = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    p_max = -(-p_max // block_m) * block_m
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E] (bincount's output shape is data-dependent)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)  # [E]: end of each expert's rows
    order = torch.argsort(flat, stable=True)  # [P]: pair ids grouped by expert, in token order
    expert = flat[order]
    first = torch.cumsum(counts, 0) - counts  # [E]: index in `order` of each expert's first pair
    dest = (ends - padded)[expert] + torch.arange(num_pairs, device=dev) - first[expert]
    pairs = torch.full((p_max,), num_pairs, dtype=torch.int32, device=dev)
    pairs.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, p_max, block_m, device=dev)
    block_expert = torch.searchsorted(ends, starts, right=True).clamp_max_(num_experts - 1)
    return pairs, block_expert.to(torch.int32), ends[-1:].to(torch.int32)


@triton.jit(do_not_specialize=["num_pairs", "num_m"])  # they change with the batch: one compile
def _moe_gemm_kernel(
    a_ptr,  # [rows, K]: tokens (gate/up: row = pair // A_DIV) or pairs (down: A_DIV = 1)
    b_ptr,  # [E, N, K]
    c_ptr,  # [T k, N]: one row per pair
    w_ptr,  # [T k]: routing weights (MUL_WEIGHT only)
    a_scale_ptr,  # [rows] fp32: a's per-row scales (FP8 only)
    b_scale_ptr,  # [E, N] fp32: b's per-channel scales (FP8 only)
    pairs_ptr,  # [P_max] int32: pair per row, num_pairs in padding rows
    block_expert_ptr,  # [P_max / BLOCK_M] int32
    num_used_ptr,  # [1] int32: rows in use
    num_pairs, N, K, num_m,
    stride_a, stride_be, stride_bn, stride_c,
    A_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr, FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # groups of GROUP_M row blocks sweep the columns together: an expert's weight tile is read from L2
    # by its neighbouring blocks
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    if pid_m * BLOCK_M >= tl.load(num_used_ptr):
        return
    dtype = c_ptr.dtype.element_ty  # the activations' (a is fp8 under FP8)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + rows)  # [M]
    row_ok = pair < num_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_at = a_ptr + (pair // A_DIV).to(tl.int64)[:, None] * stride_a + ks[None, :]  # [M, BK]
    b_at = b_ptr + expert * stride_be + cols.to(tl.int64)[None, :] * stride_bn + ks[:, None]  # [BK, N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_at, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_at, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:  # noqa: SIM108 (a constexpr branch: one of the two is compiled)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_at += BLOCK_K
        b_at += BLOCK_K
    if FP8:
        a_scale = tl.load(a_scale_ptr + pair // A_DIV, mask=row_ok, other=0.0)
        b_scale = tl.load(b_scale_ptr + expert * N + cols, mask=col_ok, other=0.0)
        acc = acc * a_scale[:, None] * b_scale[None, :]
    if MUL_WEIGHT:
        w = tl.load(w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc.to(dtype).to(tl.float32) * w[:, None]
    out_at = c_ptr + pair.to(tl.int64)[:, None] * stride_c + cols[None, :]
    tl.store(out_at, acc.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


def _blocks(num_pairs: int, num_experts: int, dtype: torch.dtype) -> dict:
    """Tile sizes from the pairs per expert (a static function of the step's shape). Decode: an expert
    sees a few tokens, and a block should hold them all so that its weights are read once; prefill:
    large tiles, and row blocks grouped so that an expert's weight tiles are reused from L2."""
    per_expert = num_pairs / num_experts
    bk = 128 if dtype.itemsize <= 2 else 64  # fp32 tiles take twice the shared memory (fp8: half)
    if per_expert <= 6:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, GROUP_M=1, num_warps=4, num_stages=3)
    if per_expert <= 24:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=bk, GROUP_M=1, num_warps=4, num_stages=3)
    if per_expert <= 96:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk // 2, GROUP_M=4, num_warps=4, num_stages=3)
    if per_expert < 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=bk // 2, GROUP_M=8, num_warps=8, num_stages=3)
    # an 8192-token prefill of Qwen3-30B-A3B's shape (512 pairs per expert): 403 TFLOP/s on an H200
    # against 347 with 64-row blocks (scripts/results/moe-tiles.json)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk // 2, GROUP_M=8, num_warps=4, num_stages=3)


def _grouped_gemm(
    a: torch.Tensor,  # [rows, K]: the activations, or fp8 with `scales`
    b: torch.Tensor,  # [E, N, K]: a's dtype, or fp8 with `scales`
    out: torch.Tensor,  # [T k, N]
    weights: torch.Tensor | None,  # [T k]
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    a_div: int,
    blocks: dict,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # a's [rows, 1], b's [E, N] (fp32)
) -> None:
    pairs, block_expert, num_used = align
    n, k = b.shape[1:]
    assert a.stride(1) == 1 and b.stride(2) == 1 and out.is_contiguous()
    assert (a.dtype == b.dtype == FP8) == (scales is not None)
    num_m = block_expert.numel()
    grid = (num_m * triton.cdiv(n, blocks["BLOCK_N"]),)
    a_scale, b_scale = scales if scales is not None else (out, out)
    _moe_gemm_kernel[grid](
        a, b, out, weights if weights is not None else out, a_scale, b_scale, pairs, block_expert, num_used,
        out.shape[0], n, k, num_m, a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        A_DIV=a_div, MUL_WEIGHT=weights is not None, IEEE=a.dtype == torch.float32, FP8=scales is not None,
        **blocks,
    )  # fmt: skip


def fused_experts(
    x: torch.Tensor,  # [T, H]
    gate_up: torch.Tensor | Fp8Experts,  # [E, 2 I, H]
    down: torch.Tensor | Fp8Experts,  # [E, H, I]
    weights: torch.Tensor,  # [T, k]
    ids: torch.Tensor,  # [T, k]
    silu_mul: SiluMul,
) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) -> [T, H] (same contract as `moe.experts_torch`)."""
    tokens, top_k = ids.shape
    num_experts, two_inter, _ = gate_up.shape
    fp8 = isinstance(gate_up, Fp8Experts)
    blocks = _blocks(tokens * top_k, num_experts, FP8 if fp8 else x.dtype)
    align = align_blocks(ids, num_experts, blocks["BLOCK_M"])
    inter = torch.empty((tokens * top_k, two_inter), device=x.device, dtype=x.dtype)
    out = torch.empty((tokens * top_k, down.shape[1]), device=x.device, dtype=x.dtype)
    if fp8:
        xq, x_scale = quantize_rows_kernel(x)  # [T, H] fp8, [T, 1]
        _grouped_gemm(xq, gate_up.weight, inter, None, align, top_k, blocks, (x_scale, gate_up.scale))
        act = silu_mul(inter, fp8=True)  # [T k, I] fp8 and its scales
        _grouped_gemm(act.q, down.weight, out, weights.flatten(), align, 1, blocks, (act.scale, down.scale))
    else:
        _grouped_gemm(x, gate_up, inter, None, align, top_k, blocks)
        act = silu_mul(inter)  # [T k, I]
        _grouped_gemm(act, down, out, weights.flatten(), align, 1, blocks)
    return out.view(tokens, top_k, -1).sum(dim=1)
