"""Phi-3, Phi-3.5 and Phi-4-mini: the Llama decoder (`llama.PagedLlama`) with Phi's weights and ropes.

q/k/v come fused as `qkv_proj` and gate/up as `gate_up_proj` (taken as they are); a `sliding_window`
applies to every layer (the paged attention honours it, so sequences may run to
`max_position_embeddings`); with `longrope` sequences stop at `original_max_position_embeddings`
(`rope.rope_max_len`: past it transformers recomputes the whole cache with the long factors); a
partial rotary factor
(Phi-4-mini: 0.75) permutes the rows of q and k so that the full-width rope kernels apply
(`rope.partial_rotary_order`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from runner.engine.layers.fp8.torch import Fp8Linear
from runner.engine.layers.linear import DenseLinear, GatedMLP, fused_linear
from runner.engine.layers.rope import partial_rotary_order, rope_max_len
from runner.engine.models.base import ModelShape
from runner.engine.models.llama import PagedLlama, llama_shape


def phi3_shape(config) -> ModelShape:
    """Check that our forward implements a Phi-3 `config` and read its shape."""
    return replace(llama_shape(config), max_model_len=rope_max_len(config))  # windows are honoured


class PagedPhi3(PagedLlama):
    """Phi-3 / Phi-4-mini over the paged KV cache."""

    shape_of = staticmethod(phi3_shape)

    def read_settings(self, config, device: torch.device, dtype: torch.dtype) -> None:
        self.window = config.sliding_window or 0

    def qkv_of(self, att, device: torch.device, dtype: torch.dtype) -> DenseLinear | Fp8Linear:
        s = self.shape
        qkv = fused_linear([att.qkv_proj], device, dtype, self.fp8)
        rotary = int(s.head_dim * att.config.rope_parameters.get("partial_rotary_factor", 1.0))
        if rotary == s.head_dim:
            return qkv
        order = partial_rotary_order(s.head_dim, rotary)
        heads = s.num_heads + s.num_kv_heads  # q and k heads; v keeps its rows
        rows = torch.cat(
            [h * s.head_dim + order for h in range(heads)]
            + [torch.arange(heads * s.head_dim, qkv.weight.shape[0])]
        )
        return _permute_rows(qkv, rows.to(device))

    def mlp_of(self, layer, config, device: torch.device, dtype: torch.dtype):
        mlp = layer.mlp
        return GatedMLP(
            fused_linear([mlp.gate_up_proj], device, dtype, self.fp8),
            fused_linear([mlp.down_proj], device, dtype, self.fp8),
        )


def _permute_rows(linear: DenseLinear | Fp8Linear, rows: torch.Tensor) -> DenseLinear | Fp8Linear:
    """`linear` with its output channels in the order `rows` [N]."""
    linear.weight = linear.weight[rows].contiguous()
    if linear.bias is not None:
        linear.bias = linear.bias[rows]
    if isinstance(linear, Fp8Linear):
        linear.scale = linear.scale[:, rows].contiguous()
        if linear.dequantized is not None:
            linear.dequantized = linear.dequantized[rows]
    return linear
