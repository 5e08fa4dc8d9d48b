"""The overlapped loop gives what the synchronous one gives."""

from __future__ import annotations

import pytest

from runner.engine import Engine, EngineConfig, Request, SamplingParams
from tests.engine.conftest import hf_greedy, random_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=4)


def requests() -> list[Request]:
    """Greedy with EOS on, greedy to a length, seeded sampling, stop ids, n > 1: every kind of finish."""
    prompts = random_prompts(24, 1, 60, seed=21)
    out = []
    for i, p in enumerate(prompts):
        kind = i % 4
        if kind == 0:
            sp = SamplingParams(max_new_tokens=5 + i)
        elif kind == 1:
            sp = SamplingParams(max_new_tokens=3 + i, ignore_eos=True)
        elif kind == 2:
            sp = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=i, n=2, ignore_eos=True)
        else:
            sp = SamplingParams(max_new_tokens=20, stop_token_ids=(p[0], 7, 9), temperature=1.2, seed=i)
        out.append(Request(i, p, sp))
    return out


def run(model, config: EngineConfig) -> tuple[dict, dict]:
    engine = Engine(model, config)
    done = {}
    for c in engine.generate(requests()):
        assert (c.id, c.sample_index) not in done
        done[(c.id, c.sample_index)] = (c.token_ids, c.finish_reason)
    assert engine.num_unfinished == 0 and not engine.has_unfinished()
    assert engine.kv.num_used_pages == 0  # no page leaked
    assert engine.kv.num_free_slots == config.max_seqs
    return done, engine.stats()


@pytest.mark.parametrize(
    "base",
    [
        EngineConfig(device="cpu", kv_cache_tokens=4096, page_size=8),
        EngineConfig(device="cpu", kv_cache_tokens=160, page_size=8, max_batch_tokens=24, max_seqs=8),
    ],
    ids=["roomy", "tiny-pool"],
)
def test_async_equals_sync(model, base):
    sync_cfg = EngineConfig(**{**{f: getattr(base, f) for f in EngineConfig.__slots__}, "async_mode": False})
    sync, sync_stats = run(model, sync_cfg)
    overlapped, async_stats = run(model, base)
    assert len(sync) == 6 * 4 + 6 and overlapped == sync
    if base.kv_cache_tokens == 160:
        assert sync_stats["preemptions"] > 0 and async_stats["preemptions"] > 0
    greedy = [r for r in requests() if r.sampling.greedy and r.sampling.ignore_eos]
    for r in greedy:
        assert sync[(r.id, 0)][0] == hf_greedy(model, r.prompt_ids, r.sampling.max_new_tokens)


def test_async_finishes_on_length_without_a_wasted_step(model):
    """A sequence known to be at its length is not scheduled again: as many steps as the sync loop."""
    prompts = random_prompts(5, 3, 12, seed=14)
    counts = []
    for async_mode in (False, True):
        engine = Engine(model, EngineConfig(device="cpu", kv_cache_tokens=4096, async_mode=async_mode))
        for i, p in enumerate(prompts):
            engine.add(Request(i, p, SamplingParams(max_new_tokens=4, ignore_eos=True)))
        assert engine.step() == []  # the prefill step: nothing finishes yet
        while engine.has_unfinished():
            engine.step()
        counts.append(engine.stats()["steps"])
    assert counts == [4, 4]


def test_close_frees_the_engine(model):
    engine = Engine(model, EngineConfig(device="cpu", kv_cache_tokens=256))
    list(engine.generate([Request(0, [5, 6, 7], SamplingParams(max_new_tokens=2))]))
    engine.close()
    runner = engine.model_runner
    assert engine.model is None and runner.model is None and runner.kv_cache.numel() == 0


@pytest.mark.gpu
def test_async_equals_sync_on_cuda_fp32(model):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for kv in (4096, 160):
        extra = {} if kv == 4096 else {"page_size": 8, "max_batch_tokens": 24, "max_seqs": 8}
        cpu, _ = run(model, EngineConfig(device="cpu", kv_cache_tokens=kv, **extra))
        cuda = dict(device="cuda", dtype="float32", kv_cache_tokens=kv, **extra)
        sync, _ = run(model, EngineConfig(**cuda, async_mode=False))
        overlapped, stats = run(model, EngineConfig(**cuda))
        assert overlapped == sync
        greedy = [(r.id, 0) for r in requests() if r.sampling.greedy]
        assert [sync[k] for k in greedy] == [cpu[k] for k in greedy]
        assert stats["graph_steps"] > 0
