"""The fused Triton kernels equal their plain-torch twins (the ops the CPU path and the parity tests use).

Without CUDA the kernels run in Triton's interpreter, in a subprocess (see ops/triton_cases.py); the
test skips when Triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import run_in_triton_interpreter
from tests.engine.layers.ops.triton_cases import CASES, fp8_errors, max_errors


def test_fused_kernels_match_torch_in_the_interpreter():
    out = run_in_triton_interpreter("tests.engine.layers.ops.triton_cases")
    assert out.count("max errors") == out.count("fp8 scale errors") == len(CASES), out


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
def test_fused_kernels_on_cuda(case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert max(max_errors(case, "cuda", torch.float32).values()) < 1e-4
    # bf16: the kernels round where torch does; sums in another order flip a rounding now and then,
    # which is one bf16 step (2^-8 relative) or two through the two roundings of a product
    bf16 = max_errors(case, "cuda", torch.bfloat16)
    assert max(bf16.values()) <= 2**-7, bf16


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_fp8_outputs_on_cuda(case, dtype):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with fp8 (compute capability 8.9+)")
    errors = fp8_errors(case, "cuda", dtype)
    # fp32: the same scales up to the sum order of the norm; bf16: a norm output one bf16 step apart
    # (test_fused_kernels_on_cuda) moves a row's amax by as much
    assert max(v for k, v in errors.items() if k.endswith("scale")) <= (
        1e-6 if dtype == torch.float32 else 2**-7
    )
    # a value on a rounding tie, or one bf16 step apart before quantizing, lands one fp8 step away
    assert max(v for k, v in errors.items() if k.endswith("values")) < 1e-2, errors
