"""The part writer: rows committed at flush_rows, bytes given back on commit, shards compacted once."""

from __future__ import annotations

import time

import pytest

from runner.held_bytes import HeldBytes
from runner.store import OutputStore
from runner.writer import PartWriter


@pytest.fixture
def store(tmp_path) -> OutputStore:
    return OutputStore(str(tmp_path / "out"), {}, "parquet", None)


def _rows(shard: str, row: int) -> list[dict]:
    return [{"_shard": shard, "_row": row, "generated_text": f"t{row}"}]


def _committed(store: OutputStore, shard: str) -> set[int]:
    return store.scan(shard, repair=False).rows


def _wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_rows_are_committed_every_flush_rows(store):
    writer = PartWriter(store, flush_rows=3, flush_seconds=3600, held_bytes=HeldBytes(10**9))
    writer.open_shard("a.jsonl", already_done=0)
    for row in range(2):
        writer.add("a.jsonl", _rows("a.jsonl", row))
    time.sleep(0.2)
    assert _committed(store, "a.jsonl") == set()  # under flush_rows and not aged: still buffered
    writer.add("a.jsonl", _rows("a.jsonl", 2))  # the third row reaches flush_rows: one part
    _wait_for(lambda: _committed(store, "a.jsonl") == {0, 1, 2})
    assert store.scan("a.jsonl", repair=False).parts == 1
    writer.close()


def test_held_bytes_are_given_back_once_their_rows_are_committed(store):
    held_bytes = HeldBytes(1000)
    assert held_bytes.acquire(300, stop=_never())
    writer = PartWriter(store, flush_rows=100, flush_seconds=3600, held_bytes=held_bytes)
    writer.open_shard("a.jsonl", already_done=0)
    writer.add("a.jsonl", _rows("a.jsonl", 0), nbytes=100)
    writer.add("a.jsonl", _rows("a.jsonl", 1), nbytes=200)
    time.sleep(0.2)
    assert held_bytes.held == 300  # buffered rows keep their input bytes
    writer.flush()
    _wait_for(lambda: held_bytes.held == 0)
    assert _committed(store, "a.jsonl") == {0, 1}
    writer.close()


def test_half_the_held_bytes_bound_in_buffered_rows_commits_them(store):
    held_bytes = HeldBytes(1000)
    writer = PartWriter(store, flush_rows=100, flush_seconds=3600, held_bytes=held_bytes)
    writer.open_shard("a.jsonl", already_done=0)
    held_bytes.acquire(600, stop=_never())
    writer.add("a.jsonl", _rows("a.jsonl", 0), nbytes=600)  # over limit // 2: no waiting for age or rows
    _wait_for(lambda: held_bytes.held == 0)
    writer.close()


def test_a_shard_is_compacted_once_every_row_is_in(store):
    writer = PartWriter(store, flush_rows=100, flush_seconds=3600, held_bytes=HeldBytes(10**9))
    writer.open_shard("a.jsonl", already_done=0)
    writer.add("a.jsonl", _rows("a.jsonl", 0))
    writer.shard_total("a.jsonl", 2)  # the reader reached the end: 2 rows, one still generating
    writer.add("a.jsonl", _rows("a.jsonl", 1))
    writer.close()
    assert store.scan("a.jsonl", repair=False).done
    assert writer.shards_compacted == 1


def test_a_failed_commit_is_raised_on_the_main_thread(store, monkeypatch):
    def broken(shard, rows):
        raise OSError("disk on fire")

    monkeypatch.setattr(store, "commit_part", broken)
    writer = PartWriter(store, flush_rows=1, flush_seconds=3600, held_bytes=HeldBytes(10**9))
    writer.open_shard("a.jsonl", already_done=0)
    writer.add("a.jsonl", _rows("a.jsonl", 0))
    with pytest.raises(OSError, match="disk on fire"):
        writer.close()


def _never():
    import threading

    return threading.Event()
