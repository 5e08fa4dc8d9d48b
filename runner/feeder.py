"""Reading and tokenizing on a background thread, so the engine never waits for either.

The feeder walks this task's unfinished shards, skips committed rows, turns row batches into
`PreparedRow`s and hands them over through a bounded queue (back-pressure: it reads no further
ahead than the queue holds, nor while the job holds `HeldBytes.limit` bytes of row values). After a
shard's last row it sends `ShardEnd`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from runner.held_bytes import HeldBytes, value_bytes
from runner.io.sources import InputError, Shard, read_shard
from runner.prompts import PreparedRow, PromptBuilder

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ShardWork:
    shard: Shard
    done_rows: set[int]  # committed by earlier attempts: not read again
    total_rows: int


@dataclass(slots=True)
class ShardEnd:
    shard: str
    total_rows: int


@dataclass(slots=True)
class ShardFailed:
    shard: str
    reason: str


@dataclass(slots=True)
class _Fatal:
    error: BaseException


_DONE = object()


class Feeder:
    """Produces `PreparedRow | ShardEnd | ShardFailed` items in shard order from a thread."""

    def __init__(
        self,
        work: list[ShardWork],
        builder: PromptBuilder,
        storage_options: dict,
        columns: list[str] | None,
        held_bytes: HeldBytes,
        batch_rows: int = 256,
        max_batches: int = 8,
    ):
        self._work = work
        self._held_bytes = held_bytes
        self._builder = builder
        self._storage_options = storage_options
        self._columns = columns
        self._batch_rows = batch_rows
        self._queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self._stop = threading.Event()
        self._pending: list = []
        self.exhausted = False
        self._thread = threading.Thread(target=self._run, name="batchrun-feeder", daemon=True)
        self._thread.start()

    def get(self, timeout: float | None) -> PreparedRow | ShardEnd | ShardFailed | None:
        """The next item; None when none came within `timeout` (0 = don't wait) or all are out."""
        while not self._pending:
            if self.exhausted:
                return None
            try:
                batch = self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
            except queue.Empty:
                return None
            if batch is _DONE:
                self.exhausted = True
                return None
            if isinstance(batch, _Fatal):
                raise batch.error
            self._pending = list(reversed(batch))
        return self._pending.pop()

    def stop(self) -> None:
        """Read no further (a stop signal came); items already queued are dropped (their bytes stay
        counted as held: nothing acquires any more)."""
        self._stop.set()
        self.exhausted = True
        self._pending.clear()
        while not self._queue.empty():
            self._queue.get_nowait()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for w in self._work:
                if not self._feed_shard(w):
                    return
            self._put(_DONE)
        except BaseException as e:  # surfaced on the main thread by get()
            self._put(_Fatal(e))

    def _feed_shard(self, w: ShardWork) -> bool:
        try:
            for batch in self._batches(w):
                if not self._held_bytes.acquire(sum(p.nbytes for p in batch), self._stop):
                    return False
                if not self._put(batch):
                    return False
        except InputError as e:
            log.error("shard %s cannot be read: %s", w.shard.id, e)
            return self._put([ShardFailed(w.shard.id, str(e))])
        return self._put([ShardEnd(w.shard.id, w.total_rows)])

    def _batches(self, w: ShardWork) -> Iterator[list[PreparedRow]]:
        for rows in read_shard(
            w.shard,
            self._storage_options,
            skip=w.done_rows,
            batch_rows=self._batch_rows,
            # Parquet reads only the needed columns (and says which are missing); JSONL rows stay
            # whole, so that a row's error can list the fields it does have
            columns=self._columns if w.shard.format == "parquet" else None,
        ):
            batch = self._builder.build(
                w.shard.id, [(r.row, r.values, r.error) for r in rows], w.shard.url, [r.place for r in rows]
            )
            for prep in batch:
                prep.nbytes = value_bytes(prep.values)
            yield batch
