"""FP8 (e4m3) linear layers: per-output-channel weight scales, dynamic per-token activation scales.

A weight [N, K] is stored as float8_e4m3fn with one fp32 scale per output row; at every call the
activations [T, K] are quantized per token (row amax / 448) and the product runs as

    y[t, n] = sum_k (xq[t, k] * sx[t]) * (wq[n, k] * sw[n])  =  sx[t] * sw[n] * (xq @ wq.T)[t, n]

- on Hopper (sm90+): `torch._scaled_mm` with row-wise scales (a = xq [T, K] row-major with scale
  [T, 1], b = wq.t() [K, N] column-major with scale [1, N], bf16 out) and fast accumulation (the
  tensor cores' own accumulator, not promoted to fp32 every few k-blocks, as vLLM's and torchao's fp8
  GEMMs run: 5-10% faster at W3's shapes, scripts/results/gemm-w3.json); the activation quantization
  is fused into the RMSNorm or SiLU·mul kernel that makes the input (`Fp8Activations`), else one
  Triton kernel (`fp8/triton.py`);
- elsewhere (the CPU, and GPUs without fp8 tensor cores): the same quantized values, dequantized to
  fp32 and multiplied with `F.linear` — the reference the tests check, with the same loader and layout.

An MoE's stacked experts [E, N, K] quantize the same way, expert by expert (`Fp8Experts`, run by
`moe.experts_torch` and `fused_moe.fused_experts`). Embeddings, norms, the LM head and an MoE's router
stay in the model dtype, and so does the KV cache (unless `kv_cache_dtype: fp8`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runner.engine.layers.fp8.format import FP8, FP8_MAX, INV_FP8_MAX, MIN_SCALE


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel quantization: w [N, K] -> (wq [N, K] fp8, scale [N] fp32)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) * INV_FP8_MAX).clamp(min=MIN_SCALE)  # [N]
    return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization (plain torch). x: [T, K] -> (xq [T, K] fp8, scale [T, 1] fp32).

    Each row is multiplied by its scale's reciprocal: one IEEE division a row, not one a value, which
    made the GPU kernels compute-bound (scripts/sweep_fp8_quantize.py)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) * INV_FP8_MAX).clamp(min=MIN_SCALE)  # [T, 1]
    return (xf * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of fp8 `q` [R, C] with `scale` broadcast over rows ([R, 1]) or columns ([1, C])."""
    return q.float() * scale


def fp8_matmul_supported(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` with row-wise scales runs on `device` (CUDA, compute capability 9.0+)."""
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


@dataclass(slots=True)
class Fp8Activations:
    """Activations quantized per token for an fp8 linear (`Fp8Linear.fp8_input`), as the fused norm and
    activation kernels hand them on: the same values `quantize_rows` gives, without a bf16 round trip."""

    q: torch.Tensor  # [T, K] float8_e4m3fn
    scale: torch.Tensor  # [T, 1] fp32
    dtype: torch.dtype  # the activations' own dtype, which the linear's output takes


def _quantize_rows_cuda(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton twin of `quantize_rows` (imported on first use: Triton is only needed on CUDA)."""
    global _quantize_rows_cuda
    from runner.engine.layers.fp8.triton import quantize_rows_kernel

    _quantize_rows_cuda = quantize_rows_kernel
    return quantize_rows_kernel(x)


@dataclass(slots=True)
class Fp8Linear:
    """y = x @ W.T (+ bias) with W in fp8 and per-output-channel scales; called like `F.linear(x, W, b)`."""

    weight: torch.Tensor  # [N, K] float8_e4m3fn, row-major
    scale: torch.Tensor  # [1, N] fp32
    bias: torch.Tensor | None  # [N], model dtype
    fast: bool  # torch._scaled_mm (sm90+, aligned shapes) instead of the dequantizing reference
    # the reference path's dequantized weight [N, K] fp32: kept on the CPU (computed once), else made
    # per call so that a GPU without fp8 GEMMs holds only the fp8 copy
    dequantized: torch.Tensor | None = None

    @classmethod
    def from_quantized(
        cls, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, device: torch.device
    ) -> Fp8Linear:
        """From fp8 weights [N, K] and their scales ([N], [N, 1], or a single per-tensor scale)."""
        assert wq.dtype == FP8, wq.dtype
        n, k = wq.shape
        scale = scale.to(device=device, dtype=torch.float32).reshape(-1)
        scale = scale.expand(n) if scale.numel() == 1 else scale
        assert scale.numel() == n, f"{scale.numel()} scales for {n} output channels"
        fast = fp8_matmul_supported(device) and n % 16 == 0 and k % 16 == 0
        lin = cls(wq.to(device).contiguous(), scale.reshape(1, n).contiguous(), bias, fast)
        if device.type == "cpu":
            lin.dequantized = lin.dequantize()
        return lin

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> Fp8Linear:
        """Quantize a high-precision weight [N, K] (on `device`, so a big matrix never sits on the host)."""
        wq, scale = quantize_weight(w.detach().to(device))
        return cls.from_quantized(wq, scale, bias, device)

    @property
    def fp8_input(self) -> bool:
        """Whether callers hand it `Fp8Activations` (from a fused kernel) rather than [T, K] activations:
        where its GEMM runs in fp8, and on the CPU, whose reference path takes the same values (a GPU
        without fp8 GEMMs quantizes inside the call)."""
        return self.fast or self.weight.device.type == "cpu"

    def __call__(self, x: torch.Tensor | Fp8Activations) -> torch.Tensor:
        """x: [T, K] (or those activations quantized) -> [T, N] in the activations' dtype."""
        a = x if isinstance(x, Fp8Activations) else self.quantize_input(x)
        if not self.fast:
            w = self.dequantized if self.dequantized is not None else self.dequantize()
            y = F.linear(dequantize(a.q, a.scale), w)  # fp32
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(a.dtype)
        y = torch._scaled_mm(
            a.q, self.weight.t(), scale_a=a.scale, scale_b=self.scale, out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )  # fmt: skip
        if self.bias is not None:
            y += self.bias
        return y if a.dtype == torch.bfloat16 else y.to(a.dtype)

    def quantize_input(self, x: torch.Tensor) -> Fp8Activations:
        """x [T, K] quantized per token: by the Triton kernel where the GEMM is fp8, else in torch."""
        xq, scale = _quantize_rows_cuda(x) if self.fast else quantize_rows(x)
        return Fp8Activations(xq, scale, x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight's fp32 values [N, K]."""
        return dequantize(self.weight, self.scale.reshape(-1, 1))

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + 4 * self.scale.numel()


@dataclass(slots=True)
class Fp8Experts:
    """Stacked expert weights in fp8 e4m3, one scale per output channel of each expert."""

    weight: torch.Tensor  # [E, N, K] float8_e4m3fn
    scale: torch.Tensor  # [E, N] fp32
    dequantized: torch.Tensor | None = None  # [E, N, K] fp32 on the CPU (the reference path), else None

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Fp8Experts:
        """w: [E, N, K] in high precision, quantized one expert at a time on its device (no fp32 copy of
        the whole stack); the CPU keeps the dequantized values for `experts_torch`."""
        q = torch.empty(w.shape, dtype=FP8, device=w.device)
        scale = torch.empty(w.shape[:2], dtype=torch.float32, device=w.device)
        for e in range(w.shape[0]):
            q[e], scale[e] = quantize_weight(w[e])
        experts = cls(q, scale)
        if w.device.type == "cpu":
            experts.dequantized = experts.values()
        return experts

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def values(self) -> torch.Tensor:
        """The weights' fp32 values [E, N, K]."""
        if self.dequantized is not None:
            return self.dequantized
        return dequantize(self.weight, self.scale[:, :, None])


def fp8_experts_supported(device: torch.device) -> bool:
    """Whether the experts can run in fp8 on `device`: the CPU (reference) or a CUDA GPU whose tensor
    cores multiply fp8 (compute capability 8.9+), which Triton's fp8 dot needs."""
    return device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9)
