"""Mixture-of-experts MLP: routing on the device, then the routed experts as one grouped computation.

A sparse block routes each token to `top_k` of `E` experts and sums their gated MLPs weighted by the
router: `y = sum_j w_j * down_e(SiLU(gate_e x) * up_e x)` with `e = ids[j]`. Expert weights are stacked
per layer, gate/up fused: `gate_up [E, 2 I, H]`, `down [E, H, I]` (transformers 5's own layout).

Routing (`route`): softmax over the router logits in fp32, top-k, optional renormalisation of the k
kept probabilities (`norm_topk_prob`; Mixtral always renormalises, which equals a softmax over the
top-k logits). The expert computation has two implementations with one signature:

- `experts_torch`: plain torch, one dense pass per expert with the routing weight as a mask (no
  gather, no `nonzero`, so no host sync on CUDA either); CPU path and the oracle of the kernel;
- `fused_moe.fused_experts` (CUDA): token/expert pairs sorted into expert blocks on the device
  (`fused_moe.align_blocks`, fixed upper bound on the padded size), two grouped GEMMs in Triton.

With `quantization: fp8` the stacked experts are `Fp8Experts` (each expert's rows quantized as a dense
fp8 linear's, `fp8.quantize_weight`) and run as the dense fp8 linears do: activations quantized per
token (the gate/up input per token, the down input per (token, expert) pair, by the SiLU·mul kernel),
fp8 x fp8 products (on Hopper accumulated by the tensor cores in reduced precision within a product,
as the dense fp8 GEMMs run), both scales applied to the result, which is rounded to the activation
dtype. `experts_torch` does it on the dequantized values (the reference); the router and a
shared expert's gate stay in the model dtype.

Nothing here depends on the step's data for a shape or a host decision, so decode steps with MoE
layers stay capturable in CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from runner.engine.layers.fp8.torch import Fp8Experts, dequantize, fp8_experts_supported, quantize_rows
from runner.engine.types import UnsupportedModel

SiluMul = Callable[..., torch.Tensor]  # [R, 2 I] -> [R, I] (with fp8=True: `fp8.Fp8Activations`)


def route(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool,
    weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] (in `weight_dtype`) and expert ids [T, k] (int64), as transformers
    computes them: softmax in fp32, top-k, optional renormalisation over the k."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(weight_dtype), ids


def experts_torch(
    x: torch.Tensor,  # [T, H]
    gate_up: torch.Tensor | Fp8Experts,  # [E, 2 I, H]
    down: torch.Tensor | Fp8Experts,  # [E, H, I]
    weights: torch.Tensor,  # [T, k]
    ids: torch.Tensor,  # [T, k]
    silu_mul: SiluMul,
) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) -> [T, H], in plain torch.

    Every expert runs over every token (E / k times the routed work) and tokens that did not pick
    it get weight 0: shapes never depend on the routing, so nothing waits for the device. Experts
    are added in ascending order, each product rounded to x's dtype first, as transformers does.
    fp8 experts: the quantized activations times the dequantized weights, in fp32."""
    fp8 = isinstance(gate_up, Fp8Experts)
    if fp8:
        gate_up, down = gate_up.values(), down.values()
        xq = dequantize(*quantize_rows(x))  # [T, H] fp32
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        w = (weights * (ids == e)).sum(dim=-1, dtype=weights.dtype)  # [T]: 0 where e is not chosen
        if fp8:
            act = silu_mul(F.linear(xq, gate_up[e]).to(x.dtype), fp8=True)
            y = F.linear(dequantize(act.q, act.scale), down[e]).to(x.dtype)  # [T, H]
        else:
            y = F.linear(silu_mul(F.linear(x, gate_up[e])), down[e])  # [T, H]
        out += (y * w[:, None]).to(x.dtype)
    return out


def stacked_experts(experts, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [E, 2 I, H] and down [E, H, I] from a transformers experts module: transformers 5 stacks
    them already (`gate_up_proj`, `down_proj`; used as they are when device and dtype match, no copy),
    older versions keep a ModuleList of MLPs (`gate_proj`/`up_proj`/`down_proj`, Mixtral's `w1`/`w3`/`w2`)."""
    if hasattr(experts, "gate_up_proj"):
        if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
            raise UnsupportedModel("expert biases are not implemented in the fast path")
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if getattr(experts, "is_transposed", False):  # [E, H, 2 I] and [E, I, H]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    else:
        gate, up, proj = (
            ("gate_proj", "up_proj", "down_proj") if hasattr(experts[0], "gate_proj") else ("w1", "w3", "w2")
        )
        gate_up = torch.stack([torch.cat([getattr(m, gate).weight, getattr(m, up).weight]) for m in experts])
        down = torch.stack([getattr(m, proj).weight for m in experts])

    def load(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=dtype).contiguous()

    return load(gate_up), load(down)


def experts_for(device: torch.device):
    """The expert computation for `device`: the Triton kernels on CUDA, `experts_torch` elsewhere."""
    if device.type == "cuda":
        from runner.engine.layers.moe.triton import fused_experts

        return fused_experts
    return experts_torch


@dataclass(slots=True)
class SparseMoE:
    """A routed MoE block: router, stacked experts, and optionally a shared expert with a sigmoid gate
    (Qwen2-MoE), whose output is added to the routed experts' sum."""

    router: torch.Tensor  # [E, H]
    gate_up: torch.Tensor | Fp8Experts  # [E, 2 I, H]
    down: torch.Tensor | Fp8Experts  # [E, H, I]
    top_k: int
    renormalize: bool
    weight_dtype: torch.dtype  # routing weights: the activation dtype (Qwen, OLMoE) or fp32 (Mixtral)
    experts: Callable  # experts_torch or fused_moe.fused_experts
    shared: Callable | None = None  # (x, ops) -> [T, H]: the shared expert's MLP
    shared_gate: torch.Tensor | None = None  # [1, H]
    fp8_input: ClassVar[bool] = False  # the router reads x in the model dtype

    @classmethod
    def from_hf(
        cls,
        block,
        top_k: int,
        renormalize: bool,
        device: torch.device,
        dtype: torch.dtype,
        fp32_weights: bool = False,
        shared: Callable | None = None,
        fp8: bool = False,
    ) -> SparseMoE:
        """From a transformers sparse-MoE block (`gate`: the router, `experts`); `shared` is the shared
        expert's MLP already on the device, its gate read from `block.shared_expert_gate`. `fp8`: the
        experts quantized (`Fp8Experts`) where `fp8_experts_supported`; elsewhere they stay in `dtype`."""
        gate_up, down = stacked_experts(block.experts, device, dtype)
        if fp8 and fp8_experts_supported(device):
            gate_up, down = Fp8Experts.quantize(gate_up), Fp8Experts.quantize(down)
        shared_gate = None
        if shared is not None:
            shared_gate = block.shared_expert_gate.weight.detach().to(device=device, dtype=dtype)
        return cls(
            router=block.gate.weight.detach().to(device=device, dtype=dtype),
            gate_up=gate_up,
            down=down,
            top_k=top_k,
            renormalize=renormalize,
            weight_dtype=torch.float32 if fp32_weights else dtype,
            experts=experts_for(device),
            shared=shared,
            shared_gate=shared_gate,
        )

    def activation_width(self) -> int:
        """Activation elements per token live in a call: router logits [E], then per routed pair
        gate/up [2 I], SiLU·mul [I] and the expert's output [H] (`fused_experts`' buffers), plus the
        shared expert's."""
        num_experts, hidden, inter = self.down.shape
        shared = self.shared.activation_width() + 1 if self.shared is not None else 0
        return num_experts + self.top_k * (3 * inter + hidden) + shared

    def __call__(self, x: torch.Tensor, ops) -> torch.Tensor:
        """x: [T, H] -> [T, H]; `ops.silu_mul` is the activation (fused kernel or torch)."""
        weights, ids = route(F.linear(x, self.router), self.top_k, self.renormalize, self.weight_dtype)
        out = self.experts(x, self.gate_up, self.down, weights, ids, ops.silu_mul)
        if self.shared is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_gate)) * self.shared(x, ops)
        return out
