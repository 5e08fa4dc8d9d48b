"""Linear layers: weights taken from a loaded transformers model, projections fused, the gated MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def load(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A copy of a transformers parameter on the engine's device and dtype."""
    return t.detach().to(device=device, dtype=dtype)


def fused_rows(
    weights: list[torch.Tensor | None], device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """Several projections' weights (or biases) stacked into one (q/k/v, gate/up): one matmul instead of
    several. None when they are None (no bias)."""
    if weights[0] is None:
        return None
    return load(torch.cat(weights), device, dtype)


@dataclass(slots=True)
class GatedMLP:
    """down(SiLU(gate(x)) * up(x)) with gate and up fused into one matrix (Llama, Mistral, Qwen, ...)."""

    gate_up: torch.Tensor  # [2 I, hidden]
    down: torch.Tensor  # [hidden, I]

    @classmethod
    def from_hf(cls, mlp, device: torch.device, dtype: torch.dtype) -> GatedMLP:
        """From a transformers MLP with `gate_proj`, `up_proj` and `down_proj` (no biases)."""
        gate_up = fused_rows([mlp.gate_proj.weight, mlp.up_proj.weight], device, dtype)
        return cls(gate_up=gate_up, down=load(mlp.down_proj.weight, device, dtype))

    def activation_width(self) -> int:
        """Activation elements per token live in a call: gate/up [2 I] and SiLU·mul [I]."""
        return 3 * self.down.shape[1]

    def __call__(self, x: torch.Tensor, ops) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]; `ops.silu_mul` is the activation (fused kernel or torch)."""
        return F.linear(ops.silu_mul(F.linear(x, self.gate_up)), self.down)
