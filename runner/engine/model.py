"""Our own forward for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM) over the paged KV cache.

Weights are taken from a loaded Hugging Face model (q/k/v and gate/up fused into one matrix each);
rotary tables come from the model's own rotary module, so every static rope scaling that
transformers implements (llama3, linear, yarn, ...) is honoured. Anything else raises
`UnsupportedModel`, and the caller falls back to the transformers backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runner.engine.attention import AttentionBatch, AttentionFn, write_kv
from runner.engine.config import UnsupportedModel
from runner.engine.layers.fp8 import Fp8Linear
from runner.engine.layers.fused_linear import DenseLinear, fused_linear

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(slots=True, frozen=True)
class ModelShape:
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_model_len: int  # positions the model can take (capped by a sliding window)


def model_shape(config) -> ModelShape:
    """Check that our forward implements `config`'s architecture and read its shape."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        raise UnsupportedModel(f"model_type {kind!r} is not in the fast path ({', '.join(SUPPORTED_TYPES)})")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config.hidden_act!r} (the fast path implements silu)")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModel("mlp_bias=True is not implemented in the fast path")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") in ("dynamic", "longrope"):
        raise UnsupportedModel(f"rope_type {rope['rope_type']!r} changes with sequence length")
    max_len = config.max_position_embeddings
    if getattr(config, "sliding_window", None):
        max_len = min(
            max_len, config.sliding_window
        )  # within the window, sliding attention is full attention
    heads = config.num_attention_heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
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
    gate_up: DenseLinear | Fp8Linear  # [2 I, hidden]
    down: DenseLinear | Fp8Linear  # [hidden, I]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as transformers' Llama does."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, D] (halves repeated, as transformers lays them out)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class TorchOps:
    """The small ops between the matmuls in plain torch (CPU; the oracle of `fused.py`'s kernels)."""

    @staticmethod
    def add_rms_norm(
        h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """`h += delta` (in place, when given), then RMSNorm(h) * weight. [T, N] -> [T, N]."""
        if delta is not None:
            h += delta
        return rms_norm(h, weight, eps)

    @staticmethod
    def rope_store(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        heads: int,
        q_norm: torch.Tensor | None,
        k_norm: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        """(QK-norm and) RoPE of q and k from qkv [T, (H + 2 Hkv) D]; stores k, v in the cache; returns
        q [T, H, D]."""
        kv_heads, dim = k_cache.shape[2:]
        q = qkv[:, : heads * dim].view(-1, heads, dim)
        k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(-1, kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim :].view(-1, kv_heads, dim)
        if q_norm is not None:
            q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(k_cache, v_cache, k, v, slot_mapping)
        return q

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up. [T, 2 I] -> [T, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def ops_for(device: torch.device):
    """The fused Triton kernels on CUDA (the `fused` module), plain torch elsewhere (`TorchOps`): both
    offer add_rms_norm, rope_store and silu_mul with the same signatures."""
    if device.type == "cuda":
        from runner.engine import fused

        return fused
    return TorchOps


class PagedLlama:
    """Forward of a Llama-family decoder over a ragged batch, reading and writing the paged KV cache."""

    def __init__(self, hf_model, device: torch.device, dtype: torch.dtype, fp8: bool = False) -> None:
        """Copy `hf_model`'s weights; `fp8`: quantize the decoder's linear weights (fp8 ones stay)."""
        config = hf_model.config
        self.shape = model_shape(config)
        s = self.shape

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype)

        inner = hf_model.model
        self.embed = w(inner.embed_tokens.weight)  # [V, hidden]
        self.lm_head = w(hf_model.lm_head.weight) if not config.tie_word_embeddings else self.embed
        self.norm = w(inner.norm.weight)
        self.layers = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            qk_norm = getattr(att, "q_norm", None) is not None
            self.layers.append(
                _Layer(
                    ln_attn=w(layer.input_layernorm.weight),
                    qkv=fused_linear([att.q_proj, att.k_proj, att.v_proj], device, dtype, fp8),
                    q_norm=w(att.q_norm.weight) if qk_norm else None,
                    k_norm=w(att.k_norm.weight) if qk_norm else None,
                    o=fused_linear([att.o_proj], device, dtype, fp8),
                    ln_mlp=w(layer.post_attention_layernorm.weight),
                    gate_up=fused_linear([mlp.gate_proj, mlp.up_proj], device, dtype, fp8),
                    down=fused_linear([mlp.down_proj], device, dtype, fp8),
                )
            )
        rotary = inner.rotary_emb
        positions = torch.arange(s.max_model_len, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.detach().float().cpu()[None, :]  # [L, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * rotary.attention_scaling).to(device=device, dtype=dtype)  # [L, D]
        self.sin = (emb.sin() * rotary.attention_scaling).to(device=device, dtype=dtype)
        self.scale = s.head_dim**-0.5
        self.device, self.dtype = device, dtype
        self.ops = ops_for(device)
        self.weight_bytes = sum(p.numel() for p in hf_model.parameters()) * self.embed.element_size()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [layers, 2, pages, page_size, Hkv, D]
        batch: AttentionBatch,
        logits_rows: torch.Tensor,  # [S] int64: token rows whose next-token logits are wanted
        attention: AttentionFn,
    ) -> torch.Tensor:
        """Run the decoder; returns fp32 logits [S, V] for `logits_rows`."""
        s, ops = self.shape, self.ops
        h = self.embed[input_ids]  # [T, hidden]: the residual stream, updated in place
        cos, sin = self.cos[positions], self.sin[positions]  # [T, D]
        delta = None  # the last layer's MLP output, not yet added to h
        for i, layer in enumerate(self.layers):
            x = ops.add_rms_norm(h, delta, layer.ln_attn, s.eps)
            qkv = layer.qkv(x)  # [T, (H + 2 Hkv) D]
            q = ops.rope_store(
                qkv, cos, sin, kv_cache[i, 0], kv_cache[i, 1], batch.slot_mapping,
                s.num_heads, layer.q_norm, layer.k_norm, s.eps,
            )  # fmt: skip
            o = attention(q, kv_cache[i, 0], kv_cache[i, 1], batch, self.scale)  # [T, H, D]
            x = ops.add_rms_norm(h, layer.o(o.flatten(1)), layer.ln_mlp, s.eps)
            delta = layer.down(ops.silu_mul(layer.gate_up(x)))
        h = h[logits_rows] + delta[logits_rows]  # [S, hidden]
        return F.linear(ops.add_rms_norm(h, None, self.norm, s.eps), self.lm_head).float()
