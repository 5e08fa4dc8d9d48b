"""Gemma 2: a post-norm decoder (`sandwich.PagedSandwich`) with Gemma's particulars.

RMSNorms scale by (1 + weight); embeddings are multiplied by sqrt(hidden) rounded to the model dtype;
attention scales by `query_pre_attn_scalar`^-0.5 and soft-caps its logits (`attn_logit_softcapping`),
the final logits are soft-capped too (`final_logit_softcapping`); layers alternate sliding-window
and full attention (`layer_types`); the MLP's activation is `gelu_pytorch_tanh`.
"""

from __future__ import annotations

import torch

from runner.engine.layers.linear import ACTIVATIONS, GatedMLP, fused_linear, load
from runner.engine.models.base import ModelShape
from runner.engine.models.sandwich import PagedSandwich, SandwichLayer
from runner.engine.types import UnsupportedModel


def gemma_shape(config) -> ModelShape:
    """Check that our forward implements a Gemma 2 / Gemma 3 text `config` and read its shape."""
    if config.hidden_activation not in ACTIVATIONS:
        raise UnsupportedModel(
            f"hidden_activation {config.hidden_activation!r} (the fast path: {', '.join(ACTIVATIONS)})"
        )
    if getattr(config, "use_bidirectional_attention", None):
        raise UnsupportedModel("use_bidirectional_attention=True (the fast path is causal)")
    return ModelShape(
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        vocab=config.vocab_size,
        eps=config.rms_norm_eps,
        max_model_len=config.max_position_embeddings,  # sliding layers honour their window
    )


class PagedGemma2(PagedSandwich):
    """Gemma 2 over the paged KV cache."""

    shape_of = staticmethod(gemma_shape)

    def read_settings(self, config, device: torch.device, dtype: torch.dtype) -> None:
        self.embed_scale = torch.tensor(config.hidden_size**0.5, dtype=dtype, device=device)
        self.scale = config.query_pre_attn_scalar**-0.5
        self.attn_softcap = config.attn_logit_softcapping or 0.0
        self.final_softcap = config.final_logit_softcapping or 0.0

    def norm_weight(self, norm, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return load(1.0 + norm.weight.detach().float(), device, dtype)

    def layer_of(self, layer, index: int, config, device: torch.device, dtype: torch.dtype) -> SandwichLayer:
        att = layer.self_attn
        sliding = config.layer_types[index] == "sliding_attention"
        return SandwichLayer(
            norm_in=self.norm_weight(layer.input_layernorm, device, dtype),
            qkv=fused_linear([att.q_proj, att.k_proj, att.v_proj], device, dtype, self.fp8),
            q_norm=None,
            k_norm=None,
            o=fused_linear([att.o_proj], device, dtype, self.fp8),
            norm_post_attn=self.norm_weight(layer.post_attention_layernorm, device, dtype),
            norm_pre_mlp=self.norm_weight(layer.pre_feedforward_layernorm, device, dtype),
            mlp=GatedMLP.from_hf(layer.mlp, device, dtype, self.fp8, config.hidden_activation),
            norm_post_mlp=self.norm_weight(layer.post_feedforward_layernorm, device, dtype),
            window=config.sliding_window if sliding else 0,
            rope=self.rope_of(config.layer_types[index]),
        )

    def rope_of(self, layer_type: str) -> str | None:
        """Which rope table a layer of `layer_type` uses: Gemma 2 has one."""
        return None
