"""The feeder: rows in shard order, committed rows skipped, and reading paused at the held-bytes bound."""

from __future__ import annotations

import json
import time

from runner.engine.types import SamplingParams
from runner.feeder import Feeder, ShardEnd, ShardWork
from runner.held_bytes import HeldBytes
from runner.io.sources import list_shards
from runner.prompts import PreparedRow, PromptBuilder, PromptConfig
from tests.helpers import tiny_tokenizer


def _shards(tmp_path, rows: int):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        lines = "".join(json.dumps({"text": f"{name} row {r} " + "x" * 50}) + "\n" for r in range(rows))
        (folder / name).write_text(lines)
    return list_shards([str(folder)], {}, None)


def _builder() -> PromptBuilder:
    return PromptBuilder(
        PromptConfig(column="text"), SamplingParams(max_new_tokens=4, seed=0), tiny_tokenizer(), 256
    )


def _drain(feeder: Feeder) -> list:
    items = []
    while (item := feeder.get(timeout=1.0)) is not None:
        items.append(item)
    return items


def test_rows_come_in_shard_order_without_the_committed_ones(tmp_path):
    a, b = _shards(tmp_path, rows=5)
    work = [ShardWork(a, {0, 3}, 5), ShardWork(b, set(), 5)]
    feeder = Feeder(work, _builder(), {}, ["text"], HeldBytes(10**9), batch_rows=2)
    items = _drain(feeder)
    got = [(i.shard, i.row) if isinstance(i, PreparedRow) else i for i in items]
    assert got == [
        ("a.jsonl", 1), ("a.jsonl", 2), ("a.jsonl", 4), ShardEnd("a.jsonl", 5),
        *[("b.jsonl", r) for r in range(5)], ShardEnd("b.jsonl", 5),
    ]  # fmt: skip
    assert feeder.exhausted
    assert all(i.prompt_ids and i.nbytes > 0 for i in items if isinstance(i, PreparedRow))


def _wait_for(check, timeout: float = 10.0) -> None:
    """Until `check()` holds (the feeder thread got there), failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_feeder_waits_for_room_under_the_held_bytes_bound(tmp_path):
    [a, _] = _shards(tmp_path, rows=8)
    held_bytes = HeldBytes(1)  # one batch fits only while nothing else is held
    feeder = Feeder([ShardWork(a, set(), 8)], _builder(), {}, ["text"], held_bytes, batch_rows=2)
    first = feeder.get(timeout=5.0)
    assert isinstance(first, PreparedRow)
    _wait_for(lambda: held_bytes.waiting)  # the second batch waits: the first one's bytes are still held
    held = held_bytes.held
    assert feeder.get(timeout=0) is not None  # the rest of the first batch
    assert feeder.get(timeout=0.2) is None  # nothing more until bytes are given back
    held_bytes.release(held)
    assert isinstance(feeder.get(timeout=5.0), PreparedRow)
    feeder.stop()


def test_stop_ends_reading_even_while_waiting_for_room(tmp_path):
    [a, _] = _shards(tmp_path, rows=8)
    held_bytes = HeldBytes(1)
    feeder = Feeder([ShardWork(a, set(), 8)], _builder(), {}, ["text"], held_bytes, batch_rows=2)
    assert feeder.get(timeout=5.0) is not None
    _wait_for(lambda: held_bytes.waiting)  # stopped while it waits for room
    feeder.stop()
    feeder._thread.join(timeout=5.0)
    assert not feeder._thread.is_alive()
    assert feeder.get(timeout=0) is None
