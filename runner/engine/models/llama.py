"""Our own forward for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM) over the paged KV cache.

Weights are taken from a loaded Hugging Face model (q/k/v and gate/up fused into one matrix each);
rotary tables come from the model's own rotary module (`layers.rope`), so every rope type that
transformers implements is honoured. Anything else raises `UnsupportedModel`, and the caller falls
back to the transformers backend. Phi-3 and Granite are this decoder with their own weights and
multipliers (`embed_tokens`, `residual`, `logits` are the hooks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runner.engine.layers.attention.torch import AttentionBatch, AttentionFn
from runner.engine.layers.fp8.torch import Fp8Activations, Fp8Linear
from runner.engine.layers.linear import DenseLinear, GatedMLP, fused_linear, load
from runner.engine.layers.ops.torch import ops_for
from runner.engine.layers.rope import rope_max_len, rope_tables
from runner.engine.models.base import MLP, ModelShape, local_shape
from runner.engine.parallel.layers import SINGLE, TensorParallel, VocabSlice
from runner.engine.types import UnsupportedModel


def llama_shape(config) -> ModelShape:
    """Check that our forward implements `config`'s architecture and read its shape."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config.hidden_act!r} (the fast path implements silu)")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModel("mlp_bias=True is not implemented in the fast path")
    max_len = rope_max_len(config)
    if getattr(config, "sliding_window", None):
        max_len = min(
            max_len, config.sliding_window
        )  # within the window, sliding attention is full attention
    heads = config.num_attention_heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        eps=config.rms_norm_eps,
        max_model_len=max_len,
    )


@dataclass(slots=True)
class _Layer:
    ln_attn: torch.Tensor  # [hidden]
    qkv: DenseLinear | Fp8Linear  # [(H + 2 Hkv) D, hidden], with the q/k/v biases if any
    q_norm: torch.Tensor | None  # [D] (Qwen3)
    k_norm: torch.Tensor | None
    o: DenseLinear | Fp8Linear  # [hidden, H D]
    ln_mlp: torch.Tensor
    mlp: MLP  # GatedMLP, or SparseMoE in the MoE families


class PagedLlama:
    """Forward of a Llama-family decoder over a ragged batch, reading and writing the paged KV cache."""

    shape_of = staticmethod(llama_shape)

    def __init__(
        self,
        hf_model,
        device: torch.device,
        dtype: torch.dtype,
        fp8: bool = False,
        tp: TensorParallel = SINGLE,
    ) -> None:
        """Copy `hf_model`'s weights; `fp8`: quantize the decoder's linear weights (fp8 ones stay).
        `tp`: this rank's group, `hf_model`'s decoder layers already cut to its slice
        (`parallel/weight_split.py`)."""
        config = hf_model.config
        self.fp8 = fp8
        self.shape = local_shape(self.shape_of(config), tp)
        s = self.shape

        def w(t: torch.Tensor) -> torch.Tensor:
            return load(t, device, dtype)

        inner = hf_model.model
        self.embed = VocabSlice.load(inner.embed_tokens.weight, device, dtype, tp)  # [V / ranks, hidden]
        tied = config.tie_word_embeddings
        self.lm_head = self.embed if tied else VocabSlice.load(hf_model.lm_head.weight, device, dtype, tp)
        self.norm = w(inner.norm.weight)
        self.layers = []
        for layer in inner.layers:
            att = layer.self_attn
            qk_norm = getattr(att, "q_norm", None) is not None
            self.layers.append(
                _Layer(
                    ln_attn=w(layer.input_layernorm.weight),
                    qkv=self.qkv_of(att, device, dtype),
                    q_norm=w(att.q_norm.weight) if qk_norm else None,
                    k_norm=w(att.k_norm.weight) if qk_norm else None,
                    o=tp.reduced(fused_linear([att.o_proj], device, dtype, fp8)),
                    ln_mlp=w(layer.post_attention_layernorm.weight),
                    mlp=tp.reduced(self.mlp_of(layer, config, device, dtype)),
                )
            )
        self.cos, self.sin = rope_tables(
            inner.rotary_emb, s.head_dim, s.max_model_len, device, dtype
        )  # [L, D]
        self.scale = s.head_dim**-0.5
        self.window = 0  # a sliding window over every layer (Phi-3); 0: full attention
        self.device, self.dtype = device, dtype
        self.ops = ops_for(device)
        self.read_settings(config, device, dtype)

    def read_settings(self, config, device: torch.device, dtype: torch.dtype) -> None:
        """A family's own settings from `config`, once the weights are in (Granite's multipliers,
        Phi-3's window): none for Llama."""

    def activation_width(self) -> int:
        """Activation elements per token live in a forward: the residual stream and norms, q/k/v and
        attention output, and the widest layer's MLP (dense or MoE)."""
        s = self.shape
        qkv_width = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        return 4 * s.hidden + 2 * qkv_width + max(layer.mlp.activation_width() for layer in self.layers)

    def project_qkv(self, x: torch.Tensor | Fp8Activations, index: int, layer: _Layer) -> torch.Tensor:
        """q, k, v of layer `index` side by side: [T, hidden] (quantized when the qkv linear takes fp8
        input) -> [T, (H + 2 Hkv) D]."""
        return layer.qkv(x)

    def qkv_of(self, att, device: torch.device, dtype: torch.dtype) -> DenseLinear | Fp8Linear:
        """q, k and v of a transformers attention module as one linear (fp8 with `self.fp8`)."""
        return fused_linear([att.q_proj, att.k_proj, att.v_proj], device, dtype, self.fp8)

    def mlp_of(self, layer, config, device: torch.device, dtype: torch.dtype):
        """The MLP of a transformers decoder layer: gated here (fp8 with `self.fp8`); a sparse MoE in the
        MoE families (its experts fp8 with `self.fp8` too)."""
        return GatedMLP.from_hf(layer.mlp, device, dtype, self.fp8)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's start: [T] -> [T, hidden] (Granite scales it)."""
        return self.embed.embed(input_ids)

    def residual(self, delta: torch.Tensor) -> torch.Tensor:
        """What an attention or MLP output adds to the residual stream (Granite scales it). [T, hidden]"""
        return delta

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [S, V] (model dtype) of the last hidden states h [S, hidden] (Granite scales them)."""
        return self.lm_head.logits(self.ops.add_rms_norm(h, None, self.norm, self.shape.eps))

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
        h = self.embed_tokens(input_ids)  # [T, hidden]: the residual stream, updated in place
        cos, sin = self.cos[positions], self.sin[positions]  # [T, D]
        delta = None  # the last layer's MLP output, not yet added to h
        for i, layer in enumerate(self.layers):
            x = ops.add_rms_norm(h, delta, layer.ln_attn, s.eps, fp8=layer.qkv.fp8_input)
            qkv = self.project_qkv(x, i, layer)  # [T, (H + 2 Hkv) D]
            q = ops.rope_store(
                qkv, cos, sin, kv_cache[i, 0], kv_cache[i, 1], batch.slot_mapping,
                s.num_heads, layer.q_norm, layer.k_norm, s.eps,
            )  # fmt: skip
            o = attention(q, kv_cache[i, 0], kv_cache[i, 1], batch, self.scale, self.window, 0.0)  # [T, H, D]
            o = self.residual(layer.o(o.flatten(1)))  # [T, hidden]
            x = ops.add_rms_norm(h, o, layer.ln_mlp, s.eps, fp8=layer.mlp.fp8_input)
            delta = self.residual(layer.mlp(x, ops))
        return self.logits(h[logits_rows] + delta[logits_rows])  # [S, V]
