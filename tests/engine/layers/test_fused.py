"""The fused Triton kernels equal their plain-torch twins (the ops the CPU path and the parity tests use).

Without CUDA the kernels run in Triton's interpreter, in a subprocess (see fused_cases.py); the
test skips when Triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import run_in_triton_interpreter
from tests.engine.layers.fused_cases import CASES, max_errors


def test_fused_kernels_match_torch_in_the_interpreter():
    assert run_in_triton_interpreter("tests.engine.layers.fused_cases").count("max errors") == len(CASES)


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
