"""Gemma 3 (text): Gemma 2's decoder (`gemma2.PagedGemma2`) with per-head q/k norms and two ropes.

Sliding layers use the local rope (`rope_parameters["sliding_attention"]`, base 10k) and full layers
the global one (with its scaling); q and k are RMS-normalised per head, (1 + weight), before rope.
Soft-capping is usually off (`attn_logit_softcapping` / `final_logit_softcapping` None).
"""

from __future__ import annotations

import torch

from runner.engine.models.gemma2 import PagedGemma2
from runner.engine.models.sandwich import SandwichLayer


class PagedGemma3(PagedGemma2):
    """Gemma 3's text decoder over the paged KV cache."""

    def layer_of(self, layer, index: int, config, device: torch.device, dtype: torch.dtype) -> SandwichLayer:
        out = super().layer_of(layer, index, config, device, dtype)
        out.q_norm = self.norm_weight(layer.self_attn.q_norm, device, dtype)
        out.k_norm = self.norm_weight(layer.self_attn.k_norm, device, dtype)
        return out

    def rope_of(self, layer_type: str) -> str | None:
        return layer_type
