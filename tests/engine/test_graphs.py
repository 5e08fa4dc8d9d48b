"""Decode-graph bucketing, and captures that survive another engine's garbage (capture and replay
themselves run on CUDA: test_async.py's gpu test)."""

from __future__ import annotations

import gc

import pytest
import torch

from runner.engine import Engine, EngineConfig, Request, SamplingParams
from runner.engine.graphs import row_buckets, width_bucket
from tests.engine.conftest import tiny_model


def test_row_and_width_buckets():
    assert row_buckets(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 32] and row_buckets(600)[-1] == 640
    assert [width_bucket(w, 256) for w in (1, 8, 9, 33, 200, 256)] == [8, 8, 16, 64, 256, 256]
    assert width_bucket(300, 256) == 256


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captures_run_with_the_cycle_collector_off():
    """A collection during a capture may destroy another engine's graphs (garbage since the last
    collection), and destroying a graph while a stream captures invalidates the capture: the MoE
    parity tests hit it ("operation not permitted when stream is capturing"). Captures run with the
    collector off, and an engine built while an old one with graphs is garbage gives its tokens."""
    model = tiny_model("llama").cuda()
    config = EngineConfig(device="cuda", dtype="float32", kv_cache_tokens=4096)
    requests = [Request(i, [5 + i, 7, 9], SamplingParams(max_new_tokens=4)) for i in range(3)]
    old = Engine(model, config)
    expected = {c.id: c.token_ids for c in old.generate(requests)}
    assert old.stats()["graphs_captured"] > 0
    old.cycle = old  # only the cycle collector can free it now
    del old
    new = Engine(model, config)
    forward, seen = new.model.forward, []

    def forward_noting_the_collector(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            seen.append(gc.isenabled())
        return forward(*args, **kwargs)

    new.model.forward = forward_noting_the_collector
    assert {c.id: c.token_ids for c in new.generate(requests)} == expected
    assert seen and not any(seen)
