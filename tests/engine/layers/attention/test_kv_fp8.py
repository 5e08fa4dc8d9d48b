"""The fp8 KV cache's kernels: rope_store's fp8 write is torch's conversion byte for byte, and the paged
attention over an fp8 cache equals the reference over the same K/V (kv_fp8_cases.py; in Triton's
interpreter in a subprocess without CUDA, on the GPU with `-m gpu`)."""

from __future__ import annotations

import pytest
import torch

from runner.engine.layers.fp8.format import FP8
from tests.engine.conftest import run_in_triton_interpreter
from tests.engine.layers.attention.kv_fp8_cases import ROPE_CASES, rope_store_mismatches
from tests.engine.layers.attention.triton_cases import CASES, relative_error


def test_fp8_kv_kernels_in_the_interpreter():
    out = run_in_triton_interpreter("tests.engine.layers.attention.kv_fp8_cases")
    assert out.count("0 fp8 bytes differ") == 2 * len(ROPE_CASES)
    assert out.count("fp8 cache case") == 2 * len(CASES)


def _needs_fp8_gpu() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with compute capability 8.9+")


@pytest.mark.gpu
@pytest.mark.parametrize("case", ROPE_CASES, ids=[str(c[0]) for c in ROPE_CASES])
def test_rope_store_fp8_write_on_cuda(case):
    _needs_fp8_gpu()
    assert rope_store_mismatches(case, "cuda", torch.float32) == 0
    assert rope_store_mismatches(case, "cuda", torch.bfloat16) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
def test_paged_attention_over_an_fp8_cache_on_cuda(case):
    _needs_fp8_gpu()
    assert relative_error(case, "cuda", torch.float32, kv_dtype=FP8) < 1e-5
    assert relative_error(case, "cuda", torch.bfloat16, kv_dtype=FP8) < 1e-2
