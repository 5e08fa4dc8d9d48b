"""Decoders whose attention and MLP outputs are normalised before they join the residual stream
(Gemma 2 and 3, OLMo 2), on the shared layers.

A layer: x = norm_in(h); h += norm_post_attn(attn(x)); x = norm_pre_mlp(h); h += norm_post_mlp(mlp(x)),
where OLMo 2 has no `norm_in` / `norm_pre_mlp` (None: the layer reads h itself). Each layer may have
its own sliding window (Gemma's `layer_types`), its own rope table (Gemma 3's local and global ropes)
and q/k norms; the model may scale its embeddings and soft-cap attention and final logits. A family
file reads its transformers model into `SandwichLayer`s (`layer_of`) and the settings below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runner.engine.layers.attention.torch import AttentionBatch, AttentionFn, soft_cap
from runner.engine.layers.fp8.torch import Fp8Linear
from runner.engine.layers.linear import DenseLinear, load
from runner.engine.layers.ops.torch import ops_for
from runner.engine.layers.rope import rope_tables
from runner.engine.models.base import MLP, local_shape
from runner.engine.parallel.layers import SINGLE, TensorParallel, VocabSlice


@dataclass(slots=True)
class SandwichLayer:
    norm_in: torch.Tensor | None  # [hidden]; None: attention reads the residual stream itself
    qkv: DenseLinear | Fp8Linear  # [(H + 2 Hkv) D, hidden]
    q_norm: torch.Tensor | None  # [D]: per-head q/k norms applied with rope (Gemma 3)
    k_norm: torch.Tensor | None
    o: DenseLinear | Fp8Linear  # [hidden, H D]
    norm_post_attn: torch.Tensor  # [hidden]
    norm_pre_mlp: torch.Tensor | None
    mlp: MLP
    norm_post_mlp: torch.Tensor
    window: int  # sliding window (0: full attention)
    rope: str | None  # which rope table: a Gemma 3 layer type, or None for the model's one rope


class PagedSandwich:
    """Forward of a post-norm ("sandwich") decoder over a ragged batch and the paged KV cache. A family
    sets `shape`, `layers` (via `layer_of`), `embed`, `lm_head`, `norm`, `scale` and the options below."""

    embed_scale: torch.Tensor | None = None  # 0-dim, model dtype: what embeddings are multiplied by (Gemma)
    attn_softcap: float = 0.0
    final_softcap: float = 0.0

    def __init__(
        self,
        hf_model,
        device: torch.device,
        dtype: torch.dtype,
        fp8: bool = False,
        tp: TensorParallel = SINGLE,
    ) -> None:
        """Copy `hf_model`'s weights; `fp8`: quantize the decoder's linear weights (fp8 ones stay)."""
        tied = hf_model.config.tie_word_embeddings
        config = self.text_config(hf_model.config)
        self.fp8 = fp8
        self.shape = s = local_shape(self.shape_of(hf_model.config), tp)
        self.device, self.dtype = device, dtype
        self.ops = ops_for(device)
        inner = self.decoder_of(hf_model)
        self.embed = VocabSlice.load(inner.embed_tokens.weight, device, dtype, tp)  # [V / ranks, hidden]
        self.lm_head = self.embed if tied else VocabSlice.load(hf_model.lm_head.weight, device, dtype, tp)
        self.norm = self.norm_weight(inner.norm, device, dtype)
        self.layers = [self.layer_of(layer, i, config, device, dtype) for i, layer in enumerate(inner.layers)]
        for layer in self.layers:  # their outputs are partial sums over the ranks
            layer.o, layer.mlp = tp.reduced(layer.o), tp.reduced(layer.mlp)
        self.tables = {  # rope name -> (cos, sin) [L, D]
            name: rope_tables(inner.rotary_emb, s.head_dim, s.max_model_len, device, dtype, name)
            for name in {layer.rope for layer in self.layers}
        }
        self.scale = s.head_dim**-0.5
        self.read_settings(config, device, dtype)

    def read_settings(self, config, device: torch.device, dtype: torch.dtype) -> None:
        """A family's own settings from its (text) `config`, once the weights are in (Gemma's scalings and
        soft-caps): none here."""

    @staticmethod
    def text_config(config):
        """The decoder's settings in a transformers `config` (an image-text checkpoint's `text_config`)."""
        return config

    @staticmethod
    def decoder_of(hf_model):
        """The transformers decoder (embeddings, layers, final norm, rotary module) of a causal LM."""
        return hf_model.model

    def norm_weight(self, norm, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The multiplier of a transformers RMSNorm (Gemma's scale by 1 + weight)."""
        return load(norm.weight, device, dtype)

    def layer_of(self, layer, index: int, config, device: torch.device, dtype: torch.dtype) -> SandwichLayer:
        """One decoder layer's weights and settings."""
        raise NotImplementedError

    def activation_width(self) -> int:
        """Activation elements per token live in a forward: the residual stream and norms, q/k/v and
        attention output, and the widest MLP."""
        s = self.shape
        qkv_width = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        return 5 * s.hidden + 2 * qkv_width + max(layer.mlp.activation_width() for layer in self.layers)

    def project_qkv(self, x: torch.Tensor, index: int, layer: SandwichLayer) -> torch.Tensor:
        """q, k, v of layer `index` side by side: [T, hidden] -> [T, (H + 2 Hkv) D] (OLMo 2 norms q, k)."""
        return layer.qkv(x)

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None):
        if weight is not None:
            return self.ops.add_rms_norm(h, delta, weight, self.shape.eps)
        if delta is not None:
            h += delta
        return h

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [layers, 2, pages + 1, page_size, Hkv, D]
        batch: AttentionBatch,
        logits_rows: torch.Tensor,  # [S] int64: token rows whose next-token logits are wanted
        attention: AttentionFn,
    ) -> torch.Tensor:
        """Run the decoder; returns the logits [S, V] (model dtype) for `logits_rows`."""
        s, ops = self.shape, self.ops
        h = self.embed.embed(input_ids)  # [T, hidden]: the residual stream, updated in place
        if self.embed_scale is not None:
            h *= self.embed_scale
        rope = {name: (cos[positions], sin[positions]) for name, (cos, sin) in self.tables.items()}  # [T, D]
        delta = None  # the last layer's normalised MLP output, not yet added to h
        for i, layer in enumerate(self.layers):
            x = self._add_norm(h, delta, layer.norm_in)
            qkv = self.project_qkv(x, i, layer)  # [T, (H + 2 Hkv) D]
            cos, sin = rope[layer.rope]
            q = ops.rope_store(
                qkv, cos, sin, kv_cache[i, 0], kv_cache[i, 1], batch.slot_mapping,
                s.num_heads, layer.q_norm, layer.k_norm, s.eps,
            )  # fmt: skip
            o = attention(
                q, kv_cache[i, 0], kv_cache[i, 1], batch, self.scale, layer.window, self.attn_softcap
            )
            attn = ops.add_rms_norm(layer.o(o.flatten(1)), None, layer.norm_post_attn, s.eps)  # [T, hidden]
            x = self._add_norm(h, attn, layer.norm_pre_mlp)
            delta = ops.add_rms_norm(layer.mlp(x, ops), None, layer.norm_post_mlp, s.eps)
        h = h[logits_rows] + delta[logits_rows]  # [S, hidden]
        logits = self.lm_head.logits(ops.add_rms_norm(h, None, self.norm, s.eps))
        return soft_cap(logits, self.final_softcap)
