"""Tensor parallelism: greedy tokens over several ranks equal one rank's, token for token (fp32): on the
CPU over gloo (real spawned processes) in CI, over NCCL on 2 GPUs (marked gpu); a rank that dies ends
the group with an error that names it."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.distributed as dist

from runner.engine import Engine, EngineConfig, Request, SamplingParams
from runner.engine.loading.source import ModelSource
from runner.engine.parallel.group import RankLost
from tests.engine.conftest import random_prompts, tiny_model
from tests.engine.models.test_dense_parity import DENSE_CONFIGS
from tests.engine.models.test_moe_parity import MOE_CONFIGS
from tests.engine.sample.test_grammar import SCHEMA
from tests.helpers import tiny_llama, tiny_tokenizer


# module-level factories: each spawned rank builds the same seeded random model and cuts its slice
def llama():
    return tiny_model("llama")  # 4 query heads, 2 KV heads: at 4 ranks, pairs of ranks copy a KV head


def qwen2_moe():
    return tiny_model(MOE_CONFIGS["qwen2_moe"]())  # stacked experts, a shared expert and its gate, biases


def phi3():
    return tiny_model(DENSE_CONFIGS["phi3"]())  # fused qkv_proj and gate_up_proj


def gemma2():
    return tiny_model(DENSE_CONFIGS["gemma2"]())  # post-norms after the summed outputs, soft-caps


def chat_llama():
    return tiny_llama(tiny_tokenizer())  # its vocabulary is a real tokenizer's: grammars need one


def fails_on_rank_1():
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 cannot load its model")
    return llama()


def generate(engine: Engine, prompts: list[list[int]], max_new: list[int]) -> dict[int, list[int]]:
    requests = [
        Request(i, p, SamplingParams(max_new_tokens=n))
        for i, (p, n) in enumerate(zip(prompts, max_new, strict=True))
    ]
    try:
        return {c.id: c.token_ids for c in engine.generate(requests)}
    finally:
        engine.close()


def compare(factory, ranks: int, **config) -> None:
    prompts = random_prompts(12, 1, 60, seed=3)
    rng = random.Random(4)
    max_new = [rng.randint(1, 16) for _ in prompts]
    one = generate(Engine(factory(), EngineConfig(**config)), prompts, max_new)
    split = Engine.from_source(ModelSource(factory=factory), EngineConfig(**config, tensor_parallel=ranks))
    assert generate(split, prompts, max_new) == one


@pytest.mark.parametrize(
    "factory, ranks",
    [
        (llama, 2),
        (qwen2_moe, 2),
        pytest.param(llama, 4, marks=pytest.mark.slow),  # each extra rank: a process importing torch
        pytest.param(phi3, 2, marks=pytest.mark.slow),
        pytest.param(gemma2, 2, marks=pytest.mark.slow),
    ],
)
def test_ranks_on_the_cpu_generate_the_tokens_of_one(factory, ranks):
    compare(factory, ranks, device="cpu", kv_cache_tokens=2048)


def test_moe_checkpoint_folder_split_over_two_ranks(tmp_path):
    """Each rank reads its slice of every expert from a folder that stores the experts apart (the
    loader stacks them): the tokens of the model in memory on one rank."""
    qwen2_moe().save_pretrained(tmp_path)
    prompts = random_prompts(6, 1, 40, seed=3)
    config = dict(device="cpu", kv_cache_tokens=2048)
    one = generate(Engine(qwen2_moe(), EngineConfig(**config)), prompts, [8] * 6)
    two = Engine.from_source(ModelSource(path=str(tmp_path)), EngineConfig(**config, tensor_parallel=2))
    assert generate(two, prompts, [8] * 6) == one


@pytest.mark.slow
def test_fp8_weights_split_over_two_ranks():
    """fp8 is quantized after the cut, and o/down quantize their input per token over each rank's
    columns, so two ranks are not bit-equal to one (as in other engines): a rank's slice with wrong
    scales would give other tokens from the first one on; here at least two in three prompts start alike."""
    prompts = random_prompts(12, 1, 60, seed=3)
    config = dict(device="cpu", kv_cache_tokens=2048, quantization="fp8")
    one = generate(Engine(llama(), EngineConfig(**config)), prompts, [4] * 12)
    two = generate(
        Engine.from_source(ModelSource(factory=llama), EngineConfig(**config, tensor_parallel=2)),
        prompts,
        [4] * 12,
    )
    assert sum(one[i][0] == two[i][0] for i in one) >= 8, (one, two)


def test_two_ranks_sample_and_constrain_as_one():
    """Seeded sampling (n = 2) and JSON-schema rows beside free ones: every rank samples the same tokens
    (none are exchanged) and the ranks apply rank 0's grammar bitmasks."""
    tok = tiny_tokenizer()
    prompts = [tok(f"Row {i}: describe a box.")["input_ids"] for i in range(6)]
    kinds = [
        SamplingParams(max_new_tokens=80, temperature=0.8, seed=5, json_schema=json.dumps(SCHEMA), n=2),
        SamplingParams(max_new_tokens=12, temperature=1.0, seed=6, ignore_eos=True),
    ]
    requests = lambda: [Request(i, p, kinds[i % 2]) for i, p in enumerate(prompts)]  # noqa: E731

    def tokens(engine: Engine) -> list[tuple]:
        try:
            out = [
                (c.id, c.sample_index, c.token_ids, c.text, c.finish_reason)
                for c in engine.generate(requests())
            ]
        finally:
            engine.close()
        return sorted(out)

    config = dict(device="cpu", kv_cache_tokens=2048)
    one = tokens(Engine(chat_llama(), EngineConfig(**config), tokenizer=tok))
    source = ModelSource(factory=chat_llama)
    two = tokens(Engine.from_source(source, EngineConfig(**config, tensor_parallel=2), tokenizer=tok))
    assert two == one
    assert all(text.startswith('{"color":"') for i, *_, text, _ in one if i % 2 == 0)  # under the schema


def test_a_rank_that_fails_to_load_stops_the_group_at_once():
    source = ModelSource(factory=fails_on_rank_1)
    with pytest.raises(RankLost, match=r"tensor-parallel rank 1 \(pid \d+\) exited with code 1"):
        Engine.from_source(source, EngineConfig(device="cpu", kv_cache_tokens=2048, tensor_parallel=2))
    assert not dist.is_initialized()  # rank 0 left the group: a next engine can start one


@pytest.mark.gpu
@pytest.mark.parametrize("factory", [llama, qwen2_moe])
def test_two_gpus_generate_the_tokens_of_one(factory):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    compare(factory, 2, device="cuda", dtype="float32", kv_cache_tokens=4096)
