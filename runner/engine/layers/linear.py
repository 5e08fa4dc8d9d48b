"""Linear layers: weights taken from a loaded transformers model, projections fused, the gated MLP.

`fused_linear` builds one linear for one or several projections of the same input (q/k/v, gate/up),
in the model dtype (`DenseLinear`) or in fp8 (`fp8.Fp8Linear`):

- modules whose weights are fp8 (a stored fp8 checkpoint, `loading/loader.py`, or weights quantized as they
  loaded) give an `Fp8Linear` as they are;
- with `fp8=True`, high-precision weights are quantized per output channel (`Fp8Linear.quantize`);
- otherwise a `DenseLinear` in the model dtype.

Per-output-channel scales concatenate along with the rows, so fusing never changes a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from runner.engine.layers.fp8.torch import FP8, Fp8Activations, Fp8Linear, fp8_experts_supported

_STACKED_EXPERTS = (".experts.gate_up_proj", ".experts.down_proj")  # transformers 5's stacked MoE experts


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
class DenseLinear:
    """y = x @ weight.T (+ bias) in the model dtype."""

    weight: torch.Tensor  # [N, K]
    bias: torch.Tensor | None  # [N]
    fp8_input: ClassVar[bool] = False  # takes activations in the model dtype (`Fp8Linear.fp8_input`)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] -> [T, N]."""
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def fused_linear(
    modules: list[nn.Module], device: torch.device, dtype: torch.dtype, fp8: bool
) -> DenseLinear | Fp8Linear:
    """The projections of `modules` (nn.Linear-like: `weight` [N_i, K], `bias`, fp8 ones `weight_scale`)
    stacked into one [sum N_i, K] linear."""
    weights = [m.weight.detach() for m in modules]
    biases = [m.bias for m in modules]
    bias = None if biases[0] is None else torch.cat(biases).detach().to(device=device, dtype=dtype)
    stored = [w.dtype == FP8 for w in weights]
    if any(stored):
        if not all(stored):
            raise ValueError("fused projections mix fp8 and high-precision weights")
        scales = [_channel_scales(m) for m in modules]
        wq = torch.cat([w.to(device) for w in weights]) if len(weights) > 1 else weights[0].to(device)
        _share(modules, wq)
        return Fp8Linear.from_quantized(wq, torch.cat(scales), bias, device)
    if fp8:
        return Fp8Linear.quantize(torch.cat([w.to(device) for w in weights]), bias, device)
    return DenseLinear(torch.cat([w.to(device=device, dtype=dtype) for w in weights]), bias)


def engine_weight_bytes(model, device: torch.device, dtype: torch.dtype, fp8: bool) -> tuple[int, int]:
    """(bytes of weights the engine will hold, bytes of them it copies onto `device`) for a transformers
    model: fp8 weights count one byte each and are used in place when already on the device; with `fp8`,
    the decoder layers' linear weights and stacked experts count one byte (their quantized copy)."""
    quantized = set()
    if fp8:
        layers = (
            m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{name}"
        )
        quantized = {id(m.weight) for m in layers}
        if fp8_experts_supported(device):
            quantized |= {
                id(p)
                for name, p in model.named_parameters()
                if name.endswith(_STACKED_EXPERTS) and p.dim() == 3
            }
    held = copied = 0
    for p in model.parameters():
        one_byte = p.dtype == FP8 or id(p) in quantized
        size = p.numel() * (1 if one_byte else dtype.itemsize)
        held += size
        if id(p) in quantized or not _already_on(p, device, FP8 if p.dtype == FP8 else dtype):
            copied += size
    return held, copied


def _already_on(p: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `p` is on `device` in `dtype` already (the engine then uses it without a copy)."""
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    return p.dtype == dtype and p.device.type == device.type and p.device.index == index


def _channel_scales(module: nn.Module) -> torch.Tensor:
    """A stored fp8 module's scales as one fp32 value per output row ([N]); a per-tensor scale broadcast."""
    scale = getattr(module, "weight_scale", None)
    if scale is None:
        raise ValueError(f"an fp8 weight of shape {tuple(module.weight.shape)} has no weight_scale")
    scale = scale.detach().float().reshape(-1)
    n = module.weight.shape[0]
    return scale.expand(n) if scale.numel() == 1 else scale


def _share(modules: list[nn.Module], fused: torch.Tensor) -> None:
    """Point fp8 modules already on the device at their rows of `fused`, so that their own copies are freed
    and a big model (70B in fp8) does not hold its fused projections twice. Values do not change."""
    if len(modules) == 1 or modules[0].weight.device != fused.device:
        return
    start = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows


# transformers' `hidden_act` names -> the `ops` function that applies them to a fused gate/up output
ACTIVATIONS = {"silu": "silu_mul", "gelu_pytorch_tanh": "gelu_tanh_mul"}


@dataclass(slots=True)
class GatedMLP:
    """down(act(gate(x)) * up(x)) with gate and up fused into one matrix (Llama, Gemma, Phi-3, ...)."""

    gate_up: DenseLinear | Fp8Linear  # [2 I, hidden]
    down: DenseLinear | Fp8Linear  # [hidden, I]
    act: str = "silu_mul"  # a value of ACTIVATIONS

    @classmethod
    def from_hf(
        cls, mlp, device: torch.device, dtype: torch.dtype, fp8: bool = False, hidden_act: str = "silu"
    ) -> GatedMLP:
        """From a transformers MLP with `gate_proj`, `up_proj` and `down_proj` (no biases), maybe fp8."""
        gate_up = fused_linear([mlp.gate_proj, mlp.up_proj], device, dtype, fp8)
        return cls(gate_up, fused_linear([mlp.down_proj], device, dtype, fp8), ACTIVATIONS[hidden_act])

    @property
    def fp8_input(self) -> bool:
        """Whether its input comes quantized (`Fp8Activations`): gate/up is an fp8 linear that takes them."""
        return self.gate_up.fp8_input

    def activation_width(self) -> int:
        """Activation elements per token live in a call: gate/up [2 I] and act·mul [I]."""
        return 3 * self.down.weight.shape[1]

    def __call__(self, x: torch.Tensor | Fp8Activations, ops) -> torch.Tensor:
        """x: [T, hidden] (quantized when `fp8_input`) -> [T, hidden]; `ops` gives the activation (fused
        kernel or torch), which quantizes its output for an fp8 `down`."""
        return self.down(getattr(ops, self.act)(self.gate_up(x), fp8=self.down.fp8_input))
