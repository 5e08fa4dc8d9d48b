"""The fp8 activation-quantization kernel against its torch twin; run as `python -m` under
TRITON_INTERPRET=1 (tests/engine/layers/fp8/test_fp8.py).

Triton 3.9's interpreter does not round fp32 -> float8e4nv as the hardware does (126.0 comes out as
64.0), so here the per-token scales are checked exactly and the fp8 values only on CUDA
(test_scaled_mm_matches_the_reference_on_cuda)."""

from __future__ import annotations

import torch

from runner.engine.layers.fp8.torch import quantize_rows
from runner.engine.layers.fp8.triton import quantize_rows_kernel

CASES = [(3, 64, torch.float32), (5, 576, torch.bfloat16), (2, 5000, torch.bfloat16)]  # T, K, dtype


def main() -> None:
    torch.manual_seed(0)
    for t, k, dtype in CASES:
        x = (torch.randn(t, k) * torch.logspace(-2, 2, t)[:, None]).to(dtype)
        x[0, : k // 2] = 0.0
        q, s = quantize_rows_kernel(x)
        rq, rs = quantize_rows(x)
        assert torch.equal(s, rs), (s, rs)
        assert q.dtype == rq.dtype and q.shape == rq.shape
        assert torch.equal(q.float() == 0, rq.float() == 0)  # the zeroed half of row 0, at least
        print("ok", t, k, dtype)


if __name__ == "__main__":
    main()
