"""Paged attention over a ragged batch: one interface, a plain reference and a batched SDPA version.

The batch packs sequences back to back: sequence i owns query tokens
`cu_seqlens_q[i]:cu_seqlens_q[i+1]`, which are the last `q_len` of its `kv_len` tokens (its K/V,
the new ones included, are already in the cache). Decoding sequences (q_len == 1) come first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionBatch:
    """Where each sequence's queries and cached K/V are. Device tensors plus their host copies."""

    cu_seqlens_q: torch.Tensor  # [B+1] int32
    kv_lens: torch.Tensor  # [B] int32
    page_table: torch.Tensor  # [B, max_pages] int32, rows padded with 0
    slot_mapping: torch.Tensor  # [T] int64: cache slot (page * page_size + offset) of each new token
    q_lens_host: list[int]
    kv_lens_host: list[int]
    num_decodes: int  # sequences [0, num_decodes) have q_len == 1


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionBatch, float], torch.Tensor]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
):
    """Store the new tokens' K/V. k_cache: [P, page, Hkv, D]; k: [T, Hkv, D]; slots: [T]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def _gather(cache: torch.Tensor, pages: torch.Tensor, kv_len: int) -> torch.Tensor:
    # cache: [P, page, Hkv, D]; pages: [n] -> [kv_len, Hkv, D]
    return cache[pages].flatten(0, 1)[:kv_len]


def reference_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """Plain per-sequence attention in fp32: the oracle. q: [T, H, D] -> [T, H, D]."""
    page = k_cache.shape[1]
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, kv_len) in enumerate(zip(batch.q_lens_host, batch.kv_lens_host, strict=True)):
        pages = batch.page_table[i, : -(-kv_len // page)]
        k = _gather(k_cache, pages, kv_len).float()  # [S, Hkv, D]
        v = _gather(v_cache, pages, kv_len).float()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [S, H, D]
        qi = q[start : start + q_len].float()  # [L, H, D]
        scores = torch.einsum("lhd,shd->hls", qi, k) * scale  # [H, L, S]
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        visible = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]  # [L, S]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[start : start + q_len] = torch.einsum("hls,shd->lhd", probs, v).to(q.dtype)
        start += q_len
    return out


def sdpa_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """All decodes in one padded SDPA call, each prefill chunk in its own. q: [T, H, D] -> [T, H, D]."""
    page = k_cache.shape[1]
    parts = []
    nd = batch.num_decodes
    if nd:
        max_pages = -(-max(batch.kv_lens_host[:nd]) // page)
        pt = batch.page_table[:nd, :max_pages]  # [Bd, Pm]
        k = k_cache[pt].flatten(1, 2).transpose(1, 2)  # [Bd, Hkv, S, D]
        v = v_cache[pt].flatten(1, 2).transpose(1, 2)
        visible = torch.arange(k.shape[2], device=q.device)[None, :] < batch.kv_lens[:nd, None]  # [Bd, S]
        o = F.scaled_dot_product_attention(
            q[:nd, :, None, :], k, v, attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=True
        )  # [Bd, H, 1, D]
        parts.append(o[:, :, 0, :])
    start = nd
    for i in range(nd, len(batch.q_lens_host)):
        q_len, kv_len = batch.q_lens_host[i], batch.kv_lens_host[i]
        pages = batch.page_table[i, : -(-kv_len // page)]
        k = _gather(k_cache, pages, kv_len).transpose(0, 1)  # [Hkv, S, D]
        v = _gather(v_cache, pages, kv_len).transpose(0, 1)
        qi = q[start : start + q_len].transpose(0, 1)  # [H, L, D]
        if q_len == kv_len:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
            visible = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]  # [L, S]
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
        parts.append(o.transpose(0, 1))
        start += q_len
    return torch.cat(parts) if len(parts) > 1 else parts[0]
