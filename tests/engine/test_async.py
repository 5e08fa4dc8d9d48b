"""The overlapped loop gives what the synchronous one gives; decode-graph bucketing and padded inputs."""

from __future__ import annotations

import pytest

from runner.engine import Engine, EngineConfig, Request, SamplingParams
from runner.engine.graphs import row_buckets, width_bucket
from runner.engine.inputs import build_inputs, layout_of
from runner.engine.scheduler import ScheduledBatch
from runner.engine.sequence import Sequence
from runner.engine.slots import SlotTable
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
    assert engine.pool.num_used == 0  # no page leaked
    assert engine.runner.slots.num_free == config.max_seqs
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


def test_row_and_width_buckets():
    assert row_buckets(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 32] and row_buckets(600)[-1] == 640
    assert [width_bucket(w, 256) for w in (1, 8, 9, 33, 200, 256)] == [8, 8, 16, 64, 256, 256]
    assert width_bucket(300, 256) == 256


def _decode_batch(slots: SlotTable, lengths: list[int], page: int) -> ScheduledBatch:
    seqs = []
    for i, n in enumerate(lengths):
        seq = Sequence(i, 0, SamplingParams(), n - 1, list(range(3, 3 + n)), seed=i, order=i)
        seq.pages = list(range(10 * i, 10 * i + -(-n // page)))
        seq.slot = slots.take(seq.pages)
        seqs.append(seq)
    return ScheduledBatch(seqs, [1] * len(seqs), [n - 1 for n in lengths], len(seqs), list(range(len(seqs))))


def test_padded_decode_inputs_have_one_layout_per_bucket():
    slots = SlotTable(8, 16)
    a = build_inputs(_decode_batch(slots, [5, 17], 4), slots, 4, spare_kv=400, pad_to=4, width=8)
    slots = SlotTable(8, 16)
    b = build_inputs(_decode_batch(slots, [9, 2, 30], 4), slots, 4, spare_kv=400, pad_to=4, width=8)
    assert layout_of(a.arrays) == layout_of(b.arrays)
    assert a.num_samples == 2 and b.num_samples == 3 and a.num_decodes == 4
    x = a.arrays
    assert x["row_slot"].tolist() == [0, 1, 8, 8]  # padding rows use the spare slot
    assert x["kv_lens"].tolist() == [5, 17, 0, 0]  # ... attend to nothing
    assert x["slot_mapping"].tolist() == [1 * 4 + 0, 14 * 4 + 0, 400, 400]  # ... and write to the spare page
    assert x["ids"].tolist() == [7, 19, 0, 0]  # known last tokens; the device carries over the others
    assert x["table"].shape == (4, 8) and x["table"][1, :5].tolist() == [10, 11, 12, 13, 14]
    assert x["position"].tolist() == [1, 1, 0, 0]


def test_close_frees_the_engine(model):
    engine = Engine(model, EngineConfig(device="cpu", kv_cache_tokens=256))
    list(engine.generate([Request(0, [5, 6, 7], SamplingParams(max_new_tokens=2))]))
    engine.close()
    assert engine.model is None and engine.runner.model is None and engine.runner.kv_cache.numel() == 0


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
