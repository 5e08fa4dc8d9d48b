"""Rotary position embeddings: the cos/sin tables and their application in plain torch.

Tables come from the model's own transformers rotary module, so every rope type that transformers
implements is honoured (a model loaded without transformers, `loading/hf_config.py`, gets the same module
from `rotary_of`, for the types in `ROPE_TYPES`): the static ones (default, linear, yarn, llama3)
through its `inv_freq` and `attention_scaling`; `dynamic` equals the default up to
`max_position_embeddings`; `longrope` takes its short factors up to
`original_max_position_embeddings`. Past those lengths the rope depends on the sequence's length
(transformers recomputes the whole cache of a Phi-3 sequence with the long factors once it crosses
`original_max_position_embeddings`), which a paged cache shared by a batch cannot follow, so
`rope_max_len` caps sequences there.

Partial rotary embeddings (`partial_rotary_factor` < 1: rope on the first R of D dims) use the same
full-width kernels: the model permutes the rows of its q and k projections with `partial_rotary_order`
(attention is unchanged by one permutation of q's and k's head dims) so that rotated pairs sit D/2
apart, and the tables give the passed-through dims cos 1, sin 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(slots=True, frozen=True)
class Rotary:
    """What `rope_tables` reads of a rotary module: the inverse frequencies as built and the scaling
    of cos and sin (yarn's attention factor)."""

    original_inv_freq: torch.Tensor  # [R/2] fp32
    attention_scaling: float


def rotary_of(rope: dict, head_dim: int, max_position_embeddings: int) -> Rotary:
    """The rotary module transformers builds for `rope` (transformers 5's `rope_parameters`: rope_type,
    rope_theta and the type's own keys), at construction, before any forward rescales it. `dynamic`
    is the default rope there (it rescales only past `max_position_embeddings`)."""
    kind = rope["rope_type"]
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [R/2]
    inv_freq = 1.0 / (rope["rope_theta"] ** exponents)
    if kind in ("default", "dynamic"):
        return Rotary(inv_freq, 1.0)
    if kind == "linear":
        return Rotary(inv_freq / rope["factor"], 1.0)
    if kind == "llama3":
        return Rotary(_llama3(inv_freq, rope), 1.0)
    if kind == "yarn":
        return _yarn(rope, dim, max_position_embeddings)
    raise ValueError(f"rope_type {kind!r} is not one of {ROPE_TYPES}")


def _llama3(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    """Llama 3.1's rope: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn(rope: dict, dim: int, max_position_embeddings: int) -> Rotary:
    """YaRN: interpolated frequencies below a band of dims, extrapolated above it, a linear ramp within,
    and cos/sin scaled by the attention factor."""
    base, old_len = rope["rope_theta"], rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_position_embeddings / old_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def band_edge(rotations: float) -> float:  # the dim that turns `rotations` times over old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = band_edge(rope.get("beta_fast") or 32), band_edge(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [R/2]
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    # the share of each frequency kept as trained (1 - (1 - ramp): as transformers rounds)
    extrapolated = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated
    return Rotary(inv_freq, attention)


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
