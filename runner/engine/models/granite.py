"""Granite (IBM Granite 3.x dense): the Llama decoder (`llama.PagedLlama`) with four multipliers.

Embeddings are multiplied by `embedding_multiplier`, each attention and MLP output by
`residual_multiplier` before it joins the residual stream, attention logits are scaled by
`attention_multiplier` (instead of head_dim^-0.5), and the logits divided by `logits_scaling`, each
where transformers does it.
"""

from __future__ import annotations

import torch

from runner.engine.models.llama import PagedLlama


class PagedGranite(PagedLlama):
    """Granite over the paged KV cache."""

    def read_settings(self, config, device: torch.device, dtype: torch.dtype) -> None:
        self.embedding_multiplier = config.embedding_multiplier
        self.residual_multiplier = config.residual_multiplier
        self.scale = config.attention_multiplier
        self.logits_scaling = config.logits_scaling

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().embed_tokens(input_ids) * self.embedding_multiplier

    def residual(self, delta: torch.Tensor) -> torch.Tensor:
        return delta * self.residual_multiplier

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(h) / self.logits_scaling
