"""Rotary position embeddings: the cos/sin tables and their application in plain torch.

Tables come from the model's own transformers rotary module, so every rope type that transformers
implements is honoured: the static ones (default, linear, yarn, llama3) through its `inv_freq` and
`attention_scaling`; `dynamic` equals the default up to `max_position_embeddings`; `longrope` takes its short
factors up to `original_max_position_embeddings`. Past those lengths the rope depends on the
sequence's length (transformers recomputes the whole cache of a Phi-3 sequence with the long factors
once it crosses `original_max_position_embeddings`), which a paged cache shared by a batch cannot
follow, so `rope_max_len` caps sequences there.

Partial rotary embeddings (`partial_rotary_factor` < 1: rope on the first R of D dims) use the same
full-width kernels: the model permutes the rows of its q and k projections with `partial_rotary_order`
(attention is unchanged by one permutation of q's and k's head dims) so that rotated pairs sit D/2
apart, and the tables give the passed-through dims cos 1, sin 0.
"""

from __future__ import annotations

import torch


def rope_max_len(config) -> int:
    """The longest sequence whose rope does not depend on its length: `max_position_embeddings`, or
    `original_max_position_embeddings` with longrope."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":
        return min(config.max_position_embeddings, rope["original_max_position_embeddings"])
    return config.max_position_embeddings


def rope_tables(
    rotary,
    head_dim: int,
    max_len: int,
    device: torch.device,
    dtype: torch.dtype,
    layer_type: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] (halves repeated, as transformers lays them out) from a transformers
    rotary module; `layer_type` picks one of Gemma 3's per-layer-type ropes."""
    prefix = f"{layer_type}_" if layer_type else ""
    # the inverse frequencies as built: a forward past a length may have rescaled `inv_freq` in place
    inv_freq = getattr(rotary, f"{prefix}original_inv_freq").detach().float().cpu()  # [R/2]
    scaling = getattr(rotary, f"{prefix}attention_scaling")
    positions = torch.arange(max_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [L, R/2]
    passed = head_dim // 2 - freqs.shape[1]  # dims per half that rope leaves alone
    cos = torch.cat([freqs.cos() * scaling, torch.ones(max_len, passed)], dim=1)  # [L, D/2]
    sin = torch.cat([freqs.sin() * scaling, torch.zeros(max_len, passed)], dim=1)
    return (
        torch.cat((cos, cos), dim=-1).to(device=device, dtype=dtype),
        torch.cat((sin, sin), dim=-1).to(device=device, dtype=dtype),
    )


def partial_rotary_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """The order of a head's dims that puts rope's pairs (i, i + R/2) at (j, j + D/2): the first rotated
    half, the first passed half, the second rotated half, the second passed half. [D] int64."""
    r, p = rotary_dim // 2, (head_dim - rotary_dim) // 2
    halves = [(0, r), (2 * r, 2 * r + p), (r, 2 * r), (2 * r + p, head_dim)]
    return torch.cat([torch.arange(a, b) for a, b in halves])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, D] (halves repeated, as transformers lays them out)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
