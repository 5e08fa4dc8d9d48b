"""The fp8 linear layer: the dequantizing reference path, the quantizers, and on CUDA torch._scaled_mm."""

from __future__ import annotations

import pytest
import torch

from runner.engine.layers.fp8.torch import FP8, Fp8Activations, Fp8Linear, quantize_rows, quantize_weight
from runner.engine.layers.linear import DenseLinear, GatedMLP
from runner.engine.layers.ops.torch import TorchOps
from tests.engine.conftest import run_in_triton_interpreter

CPU = torch.device("cpu")


def _plain_fp8(t: torch.Tensor) -> torch.Tensor:
    """Row-wise fp8 round trip written out in plain torch: scale = row amax / 448, cast, multiply back."""
    scale = (t.abs().amax(dim=1, keepdim=True) * (1 / 448.0)).clamp(min=1e-12)
    return (t / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale


def test_reference_path_equals_dequantized_weight_times_quantized_activation():
    torch.manual_seed(0)
    x, w, b = 3 * torch.randn(7, 64), torch.randn(48, 64), torch.randn(48)
    x[2] = 0.0  # an all-zero token row
    lin = Fp8Linear.quantize(w, b, CPU)
    assert lin.weight.dtype == FP8 and lin.scale.shape == (1, 48) and not lin.fast
    expected = _plain_fp8(x) @ _plain_fp8(w).T + b
    assert torch.equal(lin(x), expected)
    # and it is a good approximation of the fp32 product
    exact = x @ w.T + b
    assert (lin(x) - exact).norm() / exact.norm() < 0.05
    assert torch.equal(lin(x)[2], b)


def test_reference_path_keeps_the_activation_dtype():
    torch.manual_seed(0)
    x, w = torch.randn(5, 32, dtype=torch.bfloat16), torch.randn(16, 32)
    lin = Fp8Linear.quantize(w, None, CPU)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (_plain_fp8(x.float()) @ _plain_fp8(w).T).to(torch.bfloat16))


def test_quantizers_round_trip_within_fp8_precision():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different ranges
    wq, scale = quantize_weight(w)
    assert wq.dtype == FP8 and scale.shape == (64,)
    err = (wq.float() * scale[:, None] - w).abs()
    assert (err <= w.abs().amax(dim=1, keepdim=True) * 2**-4).all()  # e4m3: 3 mantissa bits
    xq, xs = quantize_rows(w)
    assert xs.shape == (64, 1) and torch.equal(xs[:, 0], scale) and torch.equal(xq, wq)


def test_per_tensor_and_column_scales_load_as_per_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    wq = (w / 2**-6).clamp(-448, 448).to(FP8)
    one = Fp8Linear.from_quantized(wq, torch.tensor(2**-6), None, CPU)
    col = Fp8Linear.from_quantized(wq, torch.full((16, 1), 2**-6, dtype=torch.bfloat16), None, CPU)
    assert one.scale.shape == col.scale.shape == (1, 16)
    x = torch.randn(3, 32)
    assert torch.equal(one(x), col(x))


def test_quantize_kernel_matches_torch_in_the_interpreter():
    out = run_in_triton_interpreter("tests.engine.layers.fp8.triton_cases")
    assert out.count("ok") >= 3, out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scaled_mm_matches_the_reference_on_cuda(dtype):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a CUDA GPU with compute capability 9.0+")
    from runner.engine.layers.fp8.triton import quantize_rows_kernel

    dev = torch.device("cuda")
    torch.manual_seed(0)
    for t, k, n in [(1, 4096, 6144), (37, 576, 960), (300, 14336, 4096)]:
        x = torch.randn(t, k, device=dev, dtype=dtype)
        lin = Fp8Linear.quantize(torch.randn(n, k, device=dev), torch.randn(n, device=dev, dtype=dtype), dev)
        assert lin.fast
        xq, xs = quantize_rows_kernel(x)
        rq, rs = quantize_rows(x)
        assert torch.equal(xs, rs)
        assert (xq.float() != rq.float()).float().mean() < 1e-3  # a rare tie rounded the other way
        ref = Fp8Linear(lin.weight, lin.scale, lin.bias, fast=False)(x).float()  # dequantized per call
        got = lin(x).float()
        assert got.dtype == torch.float32 and lin(x).dtype == dtype
        assert (got - ref).norm() / ref.norm() < 1e-2


def test_prequantized_activations_give_the_same_output_as_the_activations():
    """What the fused norm / SiLU·mul kernels hand an fp8 linear (`Fp8Activations`) is what the linear would
    make of the activations itself; GatedMLP quantizes SiLU·mul's output for an fp8 `down`."""
    torch.manual_seed(0)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    lin = Fp8Linear.quantize(torch.randn(32, 64), torch.randn(32), CPU)
    assert lin.fp8_input
    a = Fp8Activations(*quantize_rows(x), x.dtype)
    assert torch.equal(lin(a), lin(x)) and lin(a).dtype == torch.bfloat16

    gate_up, down = (Fp8Linear.quantize(torch.randn(n, k), None, CPU) for n, k in ((128, 64), (64, 64)))
    mlp = GatedMLP(gate_up, down)
    assert mlp.fp8_input and not GatedMLP(DenseLinear(torch.randn(128, 64), None), down).fp8_input
    expected = down(TorchOps.silu_mul(gate_up(x)))
    assert torch.equal(mlp(a, TorchOps), expected) and torch.equal(mlp(x, TorchOps), expected)
