"""OLMo 2: a post-norm decoder (`sandwich.PagedSandwich`) whose q/k norms span all heads.

Attention and MLP read the residual stream itself (no input norms); their outputs are normalised
(`post_attention_layernorm`, `post_feedforward_layernorm`) before they join it. q and k are
RMS-normalised over the whole projection ([H D] and [Hkv D]) before rope, as OLMoE does.
"""

from __future__ import annotations

import torch

from runner.engine.layers.linear import GatedMLP, fused_linear, load
from runner.engine.layers.norm import rms_norm
from runner.engine.models.llama import llama_shape
from runner.engine.models.sandwich import PagedSandwich, SandwichLayer
from runner.engine.parallel.layers import SINGLE, TensorParallel


class PagedOlmo2(PagedSandwich):
    """OLMo 2 over the paged KV cache."""

    shape_of = staticmethod(llama_shape)

    def __init__(
        self,
        hf_model,
        device: torch.device,
        dtype: torch.dtype,
        fp8: bool = False,
        tp: TensorParallel = SINGLE,
    ) -> None:
        self.qk_norms = []  # per layer: q norm [H D], k norm [Hkv D]
        super().__init__(hf_model, device, dtype, fp8, tp)

    def layer_of(self, layer, index: int, config, device: torch.device, dtype: torch.dtype) -> SandwichLayer:
        att = layer.self_attn
        self.qk_norms.append((load(att.q_norm.weight, device, dtype), load(att.k_norm.weight, device, dtype)))
        return SandwichLayer(
            norm_in=None,
            qkv=fused_linear([att.q_proj, att.k_proj, att.v_proj], device, dtype, self.fp8),
            q_norm=None,
            k_norm=None,
            o=fused_linear([att.o_proj], device, dtype, self.fp8),
            norm_post_attn=load(layer.post_attention_layernorm.weight, device, dtype),
            norm_pre_mlp=None,
            mlp=GatedMLP.from_hf(layer.mlp, device, dtype, self.fp8),
            norm_post_mlp=load(layer.post_feedforward_layernorm.weight, device, dtype),
            window=0,
            rope=None,
        )

    def project_qkv(self, x: torch.Tensor, index: int, layer: SandwichLayer) -> torch.Tensor:
        s = self.shape
        qkv = layer.qkv(x)  # [T, (H + 2 Hkv) D]
        q_width, k_width = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q_norm, k_norm = self.qk_norms[index]
        q = rms_norm(qkv[:, :q_width], q_norm, s.eps)
        k = rms_norm(qkv[:, q_width : q_width + k_width], k_norm, s.eps)
        return torch.cat([q, k, qkv[:, q_width + k_width :]], dim=1)
