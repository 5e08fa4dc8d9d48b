"""OLMoE: a Llama-style decoder whose q/k norms span all heads, with routed-expert MLPs.

Unlike Qwen3's per-head q/k norms, OLMoE normalises the whole q projection ([H D]) and the whole k
projection ([Hkv D]) before rope, and can clip q, k and v (`clip_qkv`); both happen in
`project_qkv`, and rope then runs without a per-head norm. Routing: softmax, top-k, renormalised
when `norm_topk_prob`.
"""

from __future__ import annotations

import torch

from runner.engine.layers.moe.torch import SparseMoE
from runner.engine.layers.norm import rms_norm
from runner.engine.models.llama import PagedLlama


class PagedOlmoe(PagedLlama):
    """OLMoE over the paged KV cache."""

    def read_settings(self, config, device: torch.device, dtype: torch.dtype) -> None:
        self.clip = config.clip_qkv
        self.qk_norms = []  # per layer: q norm [H D], k norm [Hkv D]
        for layer in self.layers:  # the loader took them as Qwen3's per-head norms: move them here
            self.qk_norms.append((layer.q_norm, layer.k_norm))
            layer.q_norm = layer.k_norm = None

    def project_qkv(self, x: torch.Tensor, index: int, layer) -> torch.Tensor:
        s = self.shape
        qkv = super().project_qkv(x, index, layer)  # [T, (H + 2 Hkv) D]
        q_width, k_width = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q_norm, k_norm = self.qk_norms[index]
        q = rms_norm(qkv[:, :q_width], q_norm, s.eps)
        k = rms_norm(qkv[:, q_width : q_width + k_width], k_norm, s.eps)
        qkv = torch.cat([q, k, qkv[:, q_width + k_width :]], dim=1)
        if self.clip is not None:
            qkv = qkv.clamp_(-self.clip, self.clip)
        return qkv

    def mlp_of(self, layer, config, device: torch.device, dtype: torch.dtype):
        return SparseMoE.from_hf(
            layer.mlp, config.num_experts_per_tok, config.norm_topk_prob, device, dtype, fp8=self.fp8
        )
