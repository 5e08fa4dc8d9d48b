"""Decode-graph bucketing, the engine's graph path on the CPU (padded steps replayed eagerly), and
captures at engine build that survive another engine's garbage (capture and replay themselves run on
CUDA: test_async.py's gpu test)."""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch

from runner.engine import Engine, EngineConfig, Request, SamplingParams
from runner.engine.worker.decode_graphs import DecodeGraphs, row_buckets
from runner.engine.worker.inputs import unpack
from runner.engine.worker.piece_graphs import token_buckets
from tests.engine.conftest import EagerPieces, tiny_model, with_eager_pieces


def test_row_buckets():
    assert row_buckets(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 32] and row_buckets(600)[-1] == 640


def test_token_buckets():
    assert token_buckets(16384) == [512, 1024, 2048, 4096, 8192, 16384]
    assert token_buckets(100) == [512] and token_buckets(600) == [512, 1024]


class EagerGraphs(DecodeGraphs):
    """`DecodeGraphs` on the CPU, where CUDA graphs cannot exist (a stand-in, so CI runs the engine's
    graph path: buckets, keys, padding rows, the fixed layout): a replay runs the padded step eagerly."""

    def __init__(self, step, max_rows: int, padding) -> None:
        self.step, self.buckets, self.padding = step, row_buckets(max_rows), padding
        self._graphs, self.capture_seconds, self.keys = {}, 0.0, []

    def replay(self, key, inputs):
        self.keys.append(key)
        rows, all_greedy, want_logprobs, masked = key
        views = unpack(inputs.clone(), self.padding(rows)[1])
        return *self.step(views, rows, all_greedy, want_logprobs, masked), views


def test_decode_steps_padded_to_graph_buckets_give_the_same_tokens():
    model = tiny_model("llama")
    config = EngineConfig(device="cpu", kv_cache_tokens=4096, max_seqs=8)
    greedy = SamplingParams(max_new_tokens=6)
    sampled = SamplingParams(max_new_tokens=3, temperature=0.8, seed=3)
    logprobs = SamplingParams(max_new_tokens=3, logprobs=True)
    kinds = [greedy, greedy, sampled, logprobs, greedy]
    requests = [Request(i, [5 + i, 7, 9 + 2 * i], sp) for i, sp in enumerate(kinds)]
    expected = {c.id: (c.token_ids, c.logprobs) for c in Engine(model, config).generate(requests)}
    engine = Engine(model, config)
    runner = engine.model_runner
    runner.graphs = graphs = EagerGraphs(runner._step, runner.table.num_slots, runner._padding)
    got = {c.id: (c.token_ids, c.logprobs) for c in engine.generate(requests)}
    assert {i: t for i, (t, _) in got.items()} == {i: t for i, (t, _) in expected.items()}
    assert got[3][1] == pytest.approx(expected[3][1], abs=1e-5)
    # (rows, all greedy, logprobs, masked): 5 rows pad to 8 while the sampled and the logprobs request
    # run, then the 3 greedy ones pad to 4
    assert graphs.keys == [(8, False, True, False)] * 2 + [(4, True, False, False)] * 3
    assert engine.stats()["graph_steps"] == 5


def test_a_step_takes_the_pieces_of_a_bucket_it_fills_to_seven_eighths():
    pieces = EagerPieces(None, None, 16384, None)
    assert [pieces.bucket(n) for n in (1, 512, 513, 896, 897, 1024)] == [512, 512, 0, 1024, 1024, 1024]
    assert [pieces.bucket(n) for n in (14335, 14336, 16384, 16385)] == [0, 16384, 16384, 0]


def through_eager_pieces(config: EngineConfig, requests: list[Request]) -> tuple[dict, dict, list[int], int]:
    """`requests`' tokens from the engine without piece graphs and with the CPU stand-in of pieces up to
    `max_batch_tokens`; the widths the stand-in replayed, and the steps."""
    model = tiny_model("llama")
    expected = {c.id: c.token_ids for c in Engine(model, config).generate(requests)}
    engine = Engine(model, config)
    pieces = with_eager_pieces(engine, config.max_batch_tokens)
    got = {c.id: c.token_ids for c in engine.generate(requests)}
    return expected, got, pieces.widths, engine.stats()["steps"]


def test_eager_steps_padded_for_piece_graphs_give_the_same_tokens():
    """Prefill and mixed steps (chunks of 24-token prompts beside decodes, 32 tokens a step) padded to
    512 tokens and 8 logits rows, their decodes' inputs carried over on the device, give the tokens of
    the unpadded steps."""
    config = EngineConfig(device="cpu", kv_cache_tokens=4096, max_seqs=8, max_batch_tokens=32)
    requests = [
        Request(i, [(5 + 3 * i + j) % 50 for j in range(24)], SamplingParams(max_new_tokens=5))
        for i in range(5)
    ]
    expected, got, widths, steps = through_eager_pieces(config, requests)
    assert got == expected
    assert widths == [512] * steps  # every step: CPU has no decode graphs


def test_a_step_that_fills_too_little_of_its_bucket_runs_eagerly():
    """Buckets 512 and 1024: the first step (three 200-token prompts, 600 tokens: 59 % of 1024) runs
    eagerly, the decode steps after it (3 tokens, in the smallest bucket) from pieces."""
    config = EngineConfig(device="cpu", kv_cache_tokens=4096, max_seqs=4, max_batch_tokens=1024)
    requests = [
        Request(i, [(7 + 5 * i + j) % 50 for j in range(200)], SamplingParams(max_new_tokens=4))
        for i in range(3)
    ]
    expected, got, widths, steps = through_eager_pieces(config, requests)
    assert got == expected
    assert widths == [512] * (steps - 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_piece_graphs_give_the_tokens_of_eager_steps():
    """On CUDA, fp32: prefill and mixed steps replayed from piece graphs (captured at build, every token
    bucket) give the greedy tokens of the engine without graphs."""
    model = tiny_model("llama").cuda()
    config = EngineConfig(
        device="cuda", dtype="float32", kv_cache_tokens=8192, max_seqs=8, max_batch_tokens=1024
    )
    requests = [
        Request(i, [(5 + 3 * i + j) % 50 for j in range(300 + 40 * i)], SamplingParams(max_new_tokens=6))
        for i in range(6)
    ]
    expected = {
        c.id: c.token_ids for c in Engine(model, replace(config, cuda_graphs=False)).generate(requests)
    }
    engine = Engine(model, config)
    got = {c.id: c.token_ids for c in engine.generate(requests)}
    assert got == expected
    stats = engine.stats()
    assert stats["piece_graphs"] == 2 * (model.config.num_hidden_layers + 1)  # buckets 512 and 1024


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captures_run_with_the_cycle_collector_off(monkeypatch):
    """A collection during a capture may destroy another engine's graphs (garbage since the last
    collection), and destroying a graph while a stream captures invalidates the capture: the MoE
    parity tests hit it ("operation not permitted when stream is capturing"). Captures run with the
    collector off, and an engine built (its graphs captured) while an old one with graphs is garbage
    gives its tokens."""
    model = tiny_model("llama").cuda()
    config = EngineConfig(device="cuda", dtype="float32", kv_cache_tokens=4096)
    requests = [Request(i, [5 + i, 7, 9], SamplingParams(max_new_tokens=4)) for i in range(3)]
    old = Engine(model, config)
    expected = {c.id: c.token_ids for c in old.generate(requests)}
    assert old.stats()["graphs_captured"] > 0
    forward, seen = type(old.model).forward, []

    def forward_noting_the_collector(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            seen.append(gc.isenabled())
        return forward(*args, **kwargs)

    monkeypatch.setattr(type(old.model), "forward", forward_noting_the_collector)
    old.cycle = old  # only the cycle collector can free it now
    del old
    new = Engine(model, config)  # captures its graphs
    assert seen and not any(seen)
    assert {c.id: c.token_ids for c in new.generate(requests)} == expected
