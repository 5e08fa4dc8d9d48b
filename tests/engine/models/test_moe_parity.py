"""MoE families: greedy outputs equal transformers' generate token for token (fp32), roomy and tiny
(chunking, preempting) KV pools; on the CPU (the torch experts) and, marked gpu, on CUDA (the Triton
fused-MoE kernels)."""

from __future__ import annotations

import random

import pytest
from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

from runner.engine import EngineConfig
from runner.engine.layers.moe.torch import SparseMoE
from tests.engine.conftest import COMMON, hf_greedy, random_prompts, tiny_model
from tests.engine.models.parity import (  # noqa: F401 (collected here, on this module's `case`)
    test_cuda_fp32_roomy_and_tiny,
    test_roomy_pool,
    test_tiny_pool_chunks_and_preempts,
)

MOE = dict(num_experts_per_tok=2, moe_intermediate_size=48)
MOE_CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, **MOE, head_dim=32, num_experts=8, norm_topk_prob=True),
    # norm_topk_prob off; layer 1 keeps a dense MLP
    "qwen3_moe-raw-dense1": lambda: Qwen3MoeConfig(
        **COMMON, **MOE, num_experts=6, norm_topk_prob=False, mlp_only_layers=[1]
    ),
    "qwen2_moe": lambda: Qwen2MoeConfig(  # shared expert with its sigmoid gate, q/k/v biases
        **COMMON, **MOE, num_experts=4, shared_expert_intermediate_size=80, norm_topk_prob=False
    ),
    "qwen2_moe-norm": lambda: Qwen2MoeConfig(
        **COMMON,
        moe_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=3,
        shared_expert_intermediate_size=40,
        norm_topk_prob=True,
    ),  # fmt: skip
    "mixtral": lambda: MixtralConfig(
        **{**COMMON, "intermediate_size": 48}, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
    ),
    "olmoe": lambda: OlmoeConfig(  # q/k norms over all heads, q/k/v clipping
        **{**COMMON, "intermediate_size": 48}, num_experts=8, num_experts_per_tok=2, clip_qkv=3.0
    ),
}
NUM_PROMPTS = 20


@pytest.fixture(scope="module", params=sorted(MOE_CONFIGS))
def case(request, one_thread):
    """(model, prompts, max_new per prompt, transformers' tokens) for one MoE configuration."""
    model = tiny_model(MOE_CONFIGS[request.param]())
    prompts = random_prompts(NUM_PROMPTS, 1, 90, seed=3)
    rng = random.Random(4)
    max_new = [rng.randint(1, 24) for _ in prompts]
    reference = [hf_greedy(model, p, n) for p, n in zip(prompts, max_new, strict=True)]
    return model, prompts, max_new, reference


def test_moe_layers_are_sparse_where_transformers_made_them_sparse(case):
    from runner.engine import Engine

    model = case[0]
    engine = Engine(model, EngineConfig(device="cpu", kv_cache_tokens=64))
    sparse = [isinstance(layer.mlp, SparseMoE) for layer in engine.model.layers]
    assert sparse == [hasattr(getattr(layer, "mlp", None), "experts") for layer in model.model.layers]
    assert any(sparse)
