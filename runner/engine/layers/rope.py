"""Rotary position embeddings: the cos/sin tables and their application in plain torch."""

from __future__ import annotations

import torch


def rope_tables(
    rotary, max_len: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, D] from a transformers rotary module (its `inv_freq` and `attention_scaling`),
    so every static rope scaling that transformers implements (llama3, linear, yarn, ...) is honoured."""
    positions = torch.arange(max_len, dtype=torch.float32)
    freqs = positions[:, None] * rotary.inv_freq.detach().float().cpu()[None, :]  # [L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [L, D]
    cos = (emb.cos() * rotary.attention_scaling).to(device=device, dtype=dtype)
    sin = (emb.sin() * rotary.attention_scaling).to(device=device, dtype=dtype)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, D] (halves repeated, as transformers lays them out)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
