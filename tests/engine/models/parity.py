"""The parity tests every model-family module runs on its own `case` fixture (model, prompts, max_new
per prompt, transformers' tokens): roomy and tiny (chunking, preempting) KV pools on the CPU, and on
CUDA (marked gpu). A test module imports them and defines `case`."""

from __future__ import annotations

import pytest
import torch

from runner.engine import EngineConfig
from tests.engine.test_greedy_parity import check, check_cuda, run_engine

TINY_POOL = dict(kv_cache_tokens=120, page_size=8, max_batch_tokens=24, max_seqs=8)


def test_roomy_pool(case):
    model, prompts, max_new, reference = case
    done, stats = run_engine(model, prompts, max_new, EngineConfig(device="cpu", kv_cache_tokens=8192))
    check(done, prompts, max_new, reference)
    assert stats["preemptions"] == 0


def test_tiny_pool_chunks_and_preempts(case):
    model, prompts, max_new, reference = case
    done, stats = run_engine(model, prompts, max_new, EngineConfig(device="cpu", **TINY_POOL))
    check(done, prompts, max_new, reference)
    assert stats["partial_prefill_chunks"] > 0 and stats["preemptions"] > 0, stats


@pytest.mark.gpu
def test_cuda_fp32_roomy_and_tiny(case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, prompts, max_new, reference = case
    for config in (
        EngineConfig(device="cuda", dtype="float32", kv_cache_tokens=8192),
        EngineConfig(device="cuda", dtype="float32", **TINY_POOL),
        EngineConfig(device="cuda", dtype="float32", kv_cache_tokens=8192, async_mode=False),
    ):
        done, stats = run_engine(model, prompts, max_new, config)
        check_cuda(done, model, prompts, max_new, reference)
    assert stats["graph_steps"] > 0, stats  # decode steps replayed CUDA graphs (MoE: the fused kernels)
