"""Qwen3-MoE: Qwen3's decoder (q/k norms) with routed-expert MLPs.

Attention, norms and rope are the Llama family's (`llama.PagedLlama`); only the MLP differs: a
`SparseMoE` (softmax router, top `num_experts_per_tok`, renormalised when `norm_topk_prob`) where
transformers built a sparse block, the dense gated MLP in the layers it keeps dense
(`mlp_only_layers`, `decoder_sparse_step`).
"""

from __future__ import annotations

import torch

from runner.engine.layers.linear import GatedMLP
from runner.engine.layers.moe.torch import SparseMoE
from runner.engine.models.llama import PagedLlama


class PagedQwen3Moe(PagedLlama):
    """Qwen3-MoE over the paged KV cache."""

    def mlp_of(self, layer, config, device: torch.device, dtype: torch.dtype):
        if not hasattr(layer.mlp, "experts"):
            return GatedMLP.from_hf(layer.mlp, device, dtype, self.fp8)
        return SparseMoE.from_hf(
            layer.mlp, config.num_experts_per_tok, config.norm_topk_prob, device, dtype, fp8=self.fp8
        )
