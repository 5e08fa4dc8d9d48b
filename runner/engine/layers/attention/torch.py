"""Paged attention over a ragged batch: the interface, the KV store, and the plain reference (CPU, oracle).

The batch packs sequences back to back: sequence i owns query tokens
`cu_seqlens_q[i]:cu_seqlens_q[i+1]`, which are the last `q_len` of its `kv_len` tokens (its K/V,
the new ones included, are already in the cache). Decoding sequences (q_len == 1) come first.
The CUDA kernels are in `attention/triton.py`; their decode launch runs one program per decode (W0's
shape: per pair of decodes), and their prefill launch one per block of `PREFILL_BLOCK_Q` queries. The
host orders both by their keys, most first (`decode_order`, `prefill_blocks`), so the GPU starts the
longest programs first instead of finishing on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from runner.engine.layers.fp8.format import FP8, FP8_MAX

PREFILL_BLOCK_Q = 16  # queries per prefill attention program (attention/triton.py)


@dataclass(slots=True)
class AttentionBatch:
    """Where each sequence's queries and cached K/V are (device tensors; `num_decodes` is a host int)."""

    cu_seqlens_q: torch.Tensor  # [B+1] int64
    kv_lens: torch.Tensor  # [B] int64
    page_table: torch.Tensor  # [S, W] int64: the pages of each slot's sequence (the engine's whole table)
    row_slot: torch.Tensor  # [B] int64: each sequence's row of `page_table`
    slot_mapping: torch.Tensor  # [T] int64: cache slot (page * page_size + offset) of each new token
    num_decodes: int  # sequences [0, num_decodes) have q_len == 1
    decode_seq: torch.Tensor  # [num_decodes] int64: the decodes longest first, the decode launch's grid
    block_seq: torch.Tensor  # [NB] int64: sequence of each prefill query block (kernel grid)
    block_start: torch.Tensor  # [NB] int64: first query, within its sequence, of each prefill block


def decode_order(kv_lens: np.ndarray) -> np.ndarray:
    """The decode launch's grid: the decodes of kv_lens [Bd] longest first, as indices [Bd] int64 (a
    launch of pairs runs the i-th longest and the i-th shortest in program i, `attention/triton.py`).

    The GPU deals programs to its SMs in grid order; in batch order an SM may get several long sequences
    and finish last while the others idle, longest first every SM ends on short ones. A decode launch
    on the H200 (`scripts/bench_attention.py`'s batches, one program a decode): W0 70.2 -> 64.1 µs (54.7
    for sequences of one length), W1 156.2 -> 149.8, W2 129.7 -> 126.8
    (scripts/results/attention-decode-order-sweep.*)."""
    return np.argsort(-kv_lens, kind="stable").astype(np.int64)


def prefill_blocks(
    q_lens: np.ndarray, kv_lens: np.ndarray, first_row: int, block_q: int = PREFILL_BLOCK_Q
) -> tuple[np.ndarray, np.ndarray]:
    """The prefill programs' grid: q_lens [R] and kv_lens [R] are the query and key counts of batch rows
    first_row.. (the prefill chunks, after the decodes). Returns (block_seq [NB], block_start [NB])
    int64: the batch row of each block of `block_q` queries and its first query within that row, the
    blocks that see the most keys first (W0's 16k-token step: 84.4 -> 77.2 µs a launch;
    `block_q`: other than the kernel's for scripts/sweep_attention_tiles.py only)."""
    blocks = -(-q_lens // block_q)  # [R] query blocks per prefill row
    row = np.repeat(np.arange(len(q_lens)), blocks)  # [NB]
    block_first = np.repeat(np.cumsum(blocks) - blocks, blocks)  # index of each row's first block
    block_start = (np.arange(len(row), dtype=np.int64) - block_first) * block_q
    order = np.argsort(-(kv_lens - q_lens)[row] - block_start, kind="stable")  # keys before each block
    return (row[order] + first_row).astype(np.int64), block_start[order]


# (q, k_cache, v_cache, batch, scale, window, softcap) -> out: `window` > 0 lets a query see only the last
# `window` positions (its own included; 0: all), `softcap` > 0 caps the scaled logits at softcap *
# tanh(logit / softcap) (0: none), as transformers' sliding-window masks and Gemma 2's soft-capping do.
AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionBatch, float, int, float], torch.Tensor
]


def visible_keys(q_pos: torch.Tensor, kv_len: int, window: int) -> torch.Tensor:
    """Which of a sequence's keys each query sees: causal, and within the last `window` positions when
    `window` > 0. q_pos: [L] -> [L, kv_len] bool."""
    k_pos = torch.arange(kv_len, device=q_pos.device)[None, :]
    visible = k_pos <= q_pos[:, None]
    if window:
        visible &= k_pos > q_pos[:, None] - window
    return visible


def soft_cap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """softcap * tanh(scores / softcap) when softcap > 0 (Gemma 2's attention and final logits)."""
    return torch.tanh(scores / softcap) * softcap if softcap else scores


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K or V as a KV cache of `dtype` stores them. fp8 (e4m3fn) has scale 1.0, as vLLM's fp8 KV cache
    for a checkpoint without KV scales: values are clamped to +-448 (e4m3fn has no infinity) and
    rounded to nearest even; every other dtype is the model's."""
    if dtype == FP8:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x.to(dtype)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
):
    """Store the new tokens' K/V (`to_cache`). k_cache: [P, page, Hkv, D]; k: [T, Hkv, D]; slots: [T]."""
    # indexed assignment, not index_copy_: the CPU has no index_copy_ for fp8
    k_cache.view(-1, *k_cache.shape[2:])[slots] = to_cache(k, k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = to_cache(v, v_cache.dtype)


def _gather(cache: torch.Tensor, pages: torch.Tensor, kv_len: int) -> torch.Tensor:
    # cache: [P, page, Hkv, D]; pages: [n] -> [kv_len, Hkv, D]
    return cache[pages].flatten(0, 1)[:kv_len]


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Plain per-sequence attention in fp32 (an fp8 cache's K/V upcast): the oracle.
    q: [T, H, D] -> [T, H, D]."""
    page = k_cache.shape[1]
    out = torch.empty_like(q)
    cu, kv_lens = batch.cu_seqlens_q.tolist(), batch.kv_lens.tolist()
    start = 0
    for i, kv_len in enumerate(kv_lens):
        q_len = cu[i + 1] - cu[i]
        pages = batch.page_table[batch.row_slot[i], : -(-kv_len // page)]
        k = _gather(k_cache, pages, kv_len).float()  # [S, Hkv, D]
        v = _gather(v_cache, pages, kv_len).float()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [S, H, D]
        qi = q[start : start + q_len].float()  # [L, H, D]
        scores = soft_cap(torch.einsum("lhd,shd->hls", qi, k) * scale, softcap)  # [H, L, S]
        visible = visible_keys(torch.arange(kv_len - q_len, kv_len, device=q.device), kv_len, window)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[start : start + q_len] = torch.einsum("hls,shd->lhd", probs, v).to(q.dtype)
        start += q_len
    return out
