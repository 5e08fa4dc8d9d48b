"""A model or KV cache that does not fit is refused with the numbers and the ways out, not a raw OOM."""

from __future__ import annotations

import pytest
import torch

from runner.engine import Engine, EngineConfig
from runner.engine.core.kv.sizing import GIB, DeviceMemoryError, step_workspace_bytes
from runner.engine.worker import build as build_module
from tests.engine.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")  # 2 layers, 2 KV heads of 16, vocab 256, 512 positions, fp32


def engine_with_free_memory(monkeypatch, model, free: int, **config) -> Engine:
    """The engine as on a device with `free` bytes free of 80 GiB (the CPU runs the same sizing code)."""
    monkeypatch.setattr(build_module, "_device_memory", lambda device: (free, 80 * GIB))
    return Engine(model, EngineConfig(device="cpu", **config))


def test_weights_that_do_not_fit_name_their_size_and_the_ways_out(monkeypatch, model):
    with pytest.raises(DeviceMemoryError) as e:
        engine_with_free_memory(monkeypatch, model, free=100_000, dtype="bfloat16")  # fp32 -> bf16 is a copy
    assert str(e.value) == (
        "engine: the model's weights need 0.2 MiB in bfloat16, cpu has 0.1 MiB free of 80.00 GiB. "
        "Ways out: fp8 weights or tensor parallelism (weights split over GPUs), a GPU with more free "
        "memory, or a smaller model."
    )


def test_a_kv_cache_too_small_for_one_sequence_is_refused_with_the_numbers(monkeypatch, model):
    with pytest.raises(DeviceMemoryError) as e:
        engine_with_free_memory(monkeypatch, model, free=160 * 2**20, max_seqs=2048)
    assert str(e.value) == (
        "engine: the KV cache does not fit: one sequence of max_model_len 512 tokens needs 0.2 MiB of KV, "
        "and 0.0 MiB are left for it (0.16 GiB free of 80.00 GiB after 0.3 MiB of weights, x "
        "kv_memory_fraction 0.85, less 0.17 GiB of step workspace for max_seqs 2048 and max_batch_tokens "
        "16384). Ways out: lower engine.max_seqs or engine.max_batch_tokens, raise "
        "engine.kv_memory_fraction, lower engine.max_model_len, an fp8 KV cache (engine.kv_cache_dtype), fp8 "
        "weights or tensor parallelism, or a GPU with more free memory."
    )
    # the same memory takes a smaller max_seqs: the workspace, not a constant share, sets the pool
    engine = engine_with_free_memory(monkeypatch, model, free=160 * 2**20, max_seqs=64)
    page_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers, K and V, page, KV heads, head dim, fp32
    assert engine.kv.num_pages == (int(160 * 2**20 * 0.85) - engine_workspace(64)) // page_bytes


def engine_workspace(max_seqs: int) -> int:
    width = 4 * 64 + 2 * 128 + 3 * 128  # residual and norms, q/k/v [(4 + 2 x 2) x 16], gate/up + act
    return step_workspace_bytes(
        EngineConfig().max_batch_tokens, max_seqs, width, 256, 4, cuda_graphs=True, piece_graphs=True
    )


def test_the_model_reports_its_activation_width(model):
    engine = Engine(model, EngineConfig(device="cpu", kv_cache_tokens=512))
    assert engine.model.activation_width() == 4 * 64 + 2 * 128 + 3 * 128


def test_the_workspace_grows_with_max_seqs_and_the_vocabulary():
    """The 8B shape (vocab 128256) in bf16: sampling buffers of 1024 rows take GiBs, twice with graphs."""
    width = 4 * 4096 + 2 * 6144 + 3 * 14336
    w = {s: step_workspace_bytes(8192, s, width, 128256, 2, True, True) for s in (512, 1024, 2048)}
    assert 8 * GIB < w[512] < w[1024] < w[2048]
    assert w[2048] - w[1024] == 2 * 1024 * 128256 * 64


def test_an_moe_workspace_counts_the_routed_experts_and_the_shared_one(monkeypatch):
    """Qwen2-MoE: 4 experts of width 48, top 2, a shared expert of width 80 (and its 1-wide gate)."""
    from transformers import Qwen2MoeConfig

    from tests.engine.conftest import COMMON

    config = Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                            shared_expert_intermediate_size=80)  # fmt: skip
    free = 200 * 2**20
    engine = engine_with_free_memory(monkeypatch, tiny_model(config), free=free, max_seqs=64)
    moe = 4 + 2 * (3 * 48 + 64) + 3 * 80 + 1  # router logits, per pair gate/up + act + output, shared
    width = 4 * 64 + 2 * 128 + moe
    assert engine.model.activation_width() == width
    page_bytes = 2 * 2 * 16 * 2 * 16 * 4
    workspace = step_workspace_bytes(
        EngineConfig().max_batch_tokens, 64, width, 256, 4, cuda_graphs=True, piece_graphs=True
    )
    assert engine.kv.num_pages == (int(free * 0.85) - workspace) // page_bytes


def test_an_fp8_kv_cache_holds_twice_the_pages_in_the_same_memory(monkeypatch, model):
    """Pages of one byte per value: twice those of bf16 from the same pool (less one for the floor)."""
    free = 200 * 2**20
    bf16 = engine_with_free_memory(monkeypatch, model, free, dtype="bfloat16", max_seqs=64)
    fp8 = engine_with_free_memory(
        monkeypatch, model, free, dtype="bfloat16", max_seqs=64, kv_cache_dtype="fp8"
    )
    assert fp8.model_runner.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.stats()["kv_page_bytes"] * 2 == bf16.stats()["kv_page_bytes"] == 2 * 2 * 16 * 2 * 16 * 2
    assert 2 * bf16.kv.num_pages <= fp8.kv.num_pages <= 2 * bf16.kv.num_pages + 1
    assert (
        fp8.model_runner.kv_cache.nbytes <= bf16.model_runner.kv_cache.nbytes + fp8.stats()["kv_page_bytes"]
    )
