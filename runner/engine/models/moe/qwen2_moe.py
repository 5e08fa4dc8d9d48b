"""Qwen2-MoE: Qwen2's decoder (q/k/v biases) with routed experts plus a shared expert.

Each sparse block adds a shared gated MLP to the routed experts' sum, scaled by a per-token sigmoid
gate: `y = moe(x) + sigmoid(x @ g) * shared(x)`. Layers kept dense (`mlp_only_layers`,
`decoder_sparse_step`) use the plain gated MLP.
"""

from __future__ import annotations

import torch

from runner.engine.layers.linear import GatedMLP
from runner.engine.layers.moe.torch import SparseMoE
from runner.engine.models.llama import PagedLlama


class PagedQwen2Moe(PagedLlama):
    """Qwen2-MoE over the paged KV cache."""

    def mlp_of(self, layer, config, device: torch.device, dtype: torch.dtype):
        block = layer.mlp
        if not hasattr(block, "experts"):
            return GatedMLP.from_hf(block, device, dtype, self.fp8)
        shared = GatedMLP.from_hf(block.shared_expert, device, dtype, self.fp8)
        return SparseMoE.from_hf(
            block,
            config.num_experts_per_tok,
            config.norm_topk_prob,
            device,
            dtype,
            shared=shared,
            fp8=self.fp8,
        )
