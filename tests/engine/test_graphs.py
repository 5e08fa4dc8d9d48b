"""Decode-graph bucketing (the capture and replay run on CUDA: test_async.py's gpu test)."""

from __future__ import annotations

from runner.engine.graphs import row_buckets, width_bucket


def test_row_and_width_buckets():
    assert row_buckets(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 32] and row_buckets(600)[-1] == 640
    assert [width_bucket(w, 256) for w in (1, 8, 9, 33, 200, 256)] == [8, 8, 16, 64, 256, 256]
    assert width_bucket(300, 256) == 256
