"""Finished rows to committed parts, on a background thread, so the engine never waits on storage.

Rows are buffered per shard and committed as one part per shard every `flush_rows` rows or
`flush_seconds`, whichever comes first, or once the buffer holds half of the job's `HeldBytes`
bound on row values (a part's bytes are released as it is committed). Once every row of a shard
is committed, the shard is compacted into its final file. Commits and compactions run in
submission order on one thread, so a compaction always sees every part committed before it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runner.held_bytes import HeldBytes
from runner.store import OutputStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _ShardLedger:
    already_done: int  # rows committed by earlier attempts
    produced: int = 0  # input rows handed over by this attempt
    total: int | None = None  # known once the reader reached the shard's end
    buffer: list[dict] = field(default_factory=list)
    buffer_bytes: int = 0  # the HeldBytes of the buffered rows' inputs
    compaction_queued: bool = False


class PartWriter:
    """Buffers output rows per shard and commits them through an `OutputStore` off the main thread."""

    def __init__(self, store: OutputStore, flush_rows: int, flush_seconds: float, held_bytes: HeldBytes):
        self.store = store
        self.held_bytes = held_bytes
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.shards_compacted = 0  # by this writer (read once it is closed)
        self._ledgers: dict[str, _ShardLedger] = {}
        self._buffered_rows = 0
        self._buffered_bytes = 0
        self._last_flush = time.monotonic()
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="batchrun-writer", daemon=True)
        self._thread.start()

    def open_shard(self, shard: str, already_done: int) -> None:
        self._ledgers[shard] = _ShardLedger(already_done)

    def add(self, shard: str, rows: list[dict], nbytes: int = 0) -> None:
        """The output rows of one input row (one per sample); `nbytes` of the held bytes are released
        once they are committed."""
        ledger = self._ledgers[shard]
        ledger.buffer.extend(rows)
        ledger.buffer_bytes += nbytes
        ledger.produced += 1
        self._buffered_rows += 1
        self._buffered_bytes += nbytes
        self._maybe_finish_shard(shard)
        self.poll()

    def shard_total(self, shard: str, total: int) -> None:
        """The reader reached the end of `shard`, which has `total` rows."""
        self._ledgers[shard].total = total
        self._maybe_finish_shard(shard)

    def poll(self) -> None:
        """Flush on size (rows or bytes) or age; re-raise a failure of the writer thread here, on the
        main thread."""
        if self._error is not None:
            raise self._error
        aged = time.monotonic() - self._last_flush >= self.flush_seconds
        big = self._buffered_bytes >= self.held_bytes.limit // 2  # else a full bound would wait for age
        if self._buffered_rows >= self.flush_rows or big or (aged and self._buffered_rows):
            self.flush()

    def flush(self) -> None:
        for shard, ledger in self._ledgers.items():
            self._flush_shard(shard, ledger)
        self._buffered_rows = 0
        self._buffered_bytes = 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Commit everything buffered and wait until it is visible."""
        self.flush()
        self._jobs.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _maybe_finish_shard(self, shard: str) -> None:
        ledger = self._ledgers[shard]
        if ledger.total is None or ledger.compaction_queued:
            return
        assert ledger.already_done + ledger.produced <= ledger.total, shard
        if ledger.already_done + ledger.produced == ledger.total:
            self._buffered_rows -= self._count_inputs(ledger.buffer)
            self._buffered_bytes -= ledger.buffer_bytes
            self._flush_shard(shard, ledger)
            ledger.compaction_queued = True
            self._jobs.put(lambda: self._compact(shard, ledger.total))

    def _flush_shard(self, shard: str, ledger: _ShardLedger) -> None:
        if not ledger.buffer:
            return
        rows, nbytes = ledger.buffer, ledger.buffer_bytes
        ledger.buffer, ledger.buffer_bytes = [], 0
        self._jobs.put(lambda: self._commit(shard, rows, nbytes))

    @staticmethod
    def _count_inputs(rows: list[dict]) -> int:
        return sum(1 for r in rows if r.get("_sample", 0) == 0)

    def _commit(self, shard: str, rows: list[dict], nbytes: int) -> None:
        name = self.store.commit_part(shard, rows)
        self.held_bytes.release(nbytes)
        log.debug("committed %s (%d rows)", name, len(rows))

    def _compact(self, shard: str, total: int) -> None:
        self.store.compact(shard, total)
        self.shards_compacted += 1
        log.info("shard %s done: %d rows in its final file", shard, total)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is not None:
                continue  # after a failure, commit nothing more: the main thread stops the job
            try:
                job()
            except BaseException as e:  # surfaced on the main thread by poll()/close()
                log.error("writing output failed: %s", e)
                self._error = e
            job = None  # its rows, while waiting for the next job
