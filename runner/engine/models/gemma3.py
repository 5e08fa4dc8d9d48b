"""Gemma 3 (text): Gemma 2's decoder (`gemma2.PagedGemma2`) with per-head q/k norms and two ropes.

Sliding layers use the local rope (`rope_parameters["sliding_attention"]`, base 10k) and full layers
the global one (with its scaling); q and k are RMS-normalised per head, (1 + weight), before rope.
Soft-capping is usually off (`attn_logit_softcapping` / `final_logit_softcapping` None).

An image-text `gemma3` checkpoint (Gemma3ForConditionalGeneration) runs its text tower here
(`PagedGemma3Tower`): prompts are text, so the vision tower is never run.
"""

from __future__ import annotations

import torch

from runner.engine.models.base import ModelShape
from runner.engine.models.gemma2 import PagedGemma2, gemma_shape
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


def tower_shape(config) -> ModelShape:
    """The shape of an image-text Gemma 3 `config`'s text tower."""
    return gemma_shape(config.text_config)


class PagedGemma3Tower(PagedGemma3):
    """The text tower of an image-text Gemma 3 checkpoint (`model.language_model`, the shared LM head)."""

    shape_of = staticmethod(tower_shape)

    @staticmethod
    def text_config(config):
        return config.text_config

    @staticmethod
    def decoder_of(hf_model):
        return hf_model.model.language_model
