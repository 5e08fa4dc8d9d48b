"""Paged attention on the CPU: every decoding sequence in one batched op, prefill chunks one by one.

The per-sequence reference (attention.py) issues a dozen small ops per sequence and layer; with 32
decodes that is thousands of tiny ops a step, each an OpenMP fork/join that stalls whenever another
process holds a core. Here the decodes (q_len == 1, first in the batch) are one gather, one matmul,
one softmax and one matmul over the batch, padded to the longest sequence and masked; the math is the
reference's, in fp32 (the gathered pages of an fp8 cache are upcast). Prefill chunks are few and
large, so they keep the reference's loop.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from runner.engine.layers.attention.torch import AttentionBatch, reference_attention, soft_cap


def batched_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Same contract and result as `reference_attention`. q: [T, H, D] -> [T, H, D]."""
    nd = batch.num_decodes
    if nd == 0:
        return reference_attention(q, k_cache, v_cache, batch, scale, window, softcap)
    out = torch.empty_like(q)
    pages = batch.page_table[batch.row_slot[:nd]]  # [Bd, W]
    out[:nd] = decode_attention(q[:nd], k_cache, v_cache, pages, batch.kv_lens[:nd], scale, window, softcap)
    if batch.kv_lens.shape[0] > nd:
        cu = batch.cu_seqlens_q
        prefill = replace(
            batch,
            cu_seqlens_q=cu[nd:] - cu[nd],
            kv_lens=batch.kv_lens[nd:],
            row_slot=batch.row_slot[nd:],
            num_decodes=0,
        )
        out[nd:] = reference_attention(q[nd:], k_cache, v_cache, prefill, scale, window, softcap)
    return out


def decode_attention(
    q: torch.Tensor,  # [B, H, D]: one query per sequence, at its last position
    k_cache: torch.Tensor,  # [P, page, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, W]
    kv_lens: torch.Tensor,  # [B]
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """One query token per sequence against its cached keys (the last `window` of them when > 0; logits
    soft-capped when `softcap` > 0). -> [B, H, D]"""
    B, H, D = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    s_max = int(kv_lens.max())
    pages = page_table[:, : -(-s_max // page)]  # [B, n]
    k = k_cache[pages].flatten(1, 2)[:, :s_max].float()  # [B, S, Hkv, D]
    v = v_cache[pages].flatten(1, 2)[:, :s_max].float()
    k_pos = torch.arange(s_max, device=q.device)[None, :]
    valid = k_pos < kv_lens[:, None]  # [B, S]
    v = v.masked_fill(~valid[:, :, None, None], 0.0)  # padding slots may hold anything
    if window:
        valid &= k_pos >= kv_lens[:, None] - window
    qg = q.float().view(B, hkv, H // hkv, D)  # [B, Hkv, G, D]: query heads grouped by their KV head
    scores = soft_cap(torch.einsum("bkgd,bskd->bkgs", qg, k) * scale, softcap)  # [B, Hkv, G, S]
    probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bkgs,bskd->bkgd", probs, v).reshape(B, H, D).to(q.dtype)
