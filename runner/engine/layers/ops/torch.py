"""The small ops between the matmuls, in plain torch (`TorchOps`), and the choice of implementation.

`TorchOps` is the CPU path and the oracle of `fused.py`'s Triton kernels, which offer the same
functions with the same signatures; `ops_for(device)` picks the kernels on CUDA, torch elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runner.engine.layers.attention.torch import write_kv
from runner.engine.layers.fp8.torch import Fp8Activations, quantize_rows
from runner.engine.layers.norm import rms_norm
from runner.engine.layers.rope import apply_rope


class TorchOps:
    """The small ops between the matmuls in plain torch (CPU; the oracle of `fused.py`'s kernels)."""

    @staticmethod
    def add_rms_norm(
        h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, fp8: bool = False
    ) -> torch.Tensor | Fp8Activations:
        """`h += delta` (in place, when given), then RMSNorm(h) * weight. [T, N] -> [T, N] (quantized for
        an fp8 linear with `fp8`)."""
        if delta is not None:
            h += delta
        return _maybe_quantized(rms_norm(h, weight, eps), fp8)

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
    def silu_mul(gate_up: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Activations:
        """SiLU(gate) * up. [T, 2 I] -> [T, I] (quantized for an fp8 linear with `fp8`)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return _maybe_quantized(F.silu(gate) * up, fp8)

    @staticmethod
    def gelu_tanh_mul(gate_up: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Activations:
        """GELU(gate) with the tanh approximation (`gelu_pytorch_tanh`) * up. [T, 2 I] -> [T, I]
        (quantized for an fp8 linear with `fp8`)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return _maybe_quantized(F.gelu(gate, approximate="tanh") * up, fp8)


def _maybe_quantized(x: torch.Tensor, fp8: bool) -> torch.Tensor | Fp8Activations:
    """x [T, K], or with `fp8` its per-token quantization (`fp8.quantize_rows`)."""
    return Fp8Activations(*quantize_rows(x), x.dtype) if fp8 else x


def ops_for(device: torch.device):
    """The fused Triton kernels on CUDA (the `fused` module), plain torch elsewhere (`TorchOps`): both
    offer add_rms_norm, rope_store, silu_mul and gelu_tanh_mul with the same signatures."""
    if device.type == "cuda":
        from runner.engine.layers.ops import triton as fused

        return fused
    return TorchOps
