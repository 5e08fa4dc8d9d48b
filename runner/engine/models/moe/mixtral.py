"""Mixtral: Mistral's decoder with a routed-expert MLP in every layer.

Routing renormalises the top-k probabilities always (a softmax over the top-k logits) and keeps the
weights in fp32, as transformers does. transformers 5 names the block `mlp`, older versions
`block_sparse_moe` (experts `w1`/`w3`/`w2`); both load.
"""

from __future__ import annotations

import torch

from runner.engine.layers.moe.torch import SparseMoE
from runner.engine.models.llama import PagedLlama


class PagedMixtral(PagedLlama):
    """Mixtral over the paged KV cache."""

    def mlp_of(self, layer, config, device: torch.device, dtype: torch.dtype):
        block = layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe
        return SparseMoE.from_hf(
            block, config.num_experts_per_tok, True, device, dtype, fp32_weights=True, fp8=self.fp8
        )
