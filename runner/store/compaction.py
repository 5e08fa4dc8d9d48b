"""Streaming compaction: a shard's parts become its final file one window of rows at a time.

Memory is bounded by one window of output rows plus one row group of one part, never by the shard:

1. index: each part's footer (schema, row groups) and its key columns (`_row`, `_sample`,
   `finish_reason`), read alone; the first committed copy of each (row, sample) wins
2. the final schema is unified from the parts' schemas (missing columns null, promoted types, JSON
   text for irreconcilable ones: `tables.unified_schema`), as if the parts were concatenated
3. `windows()` yields the winning rows in input order, a window at a time, reading from each part
   only the row groups that hold the window's rows

`OutputStore.compact` (runner/store/checkpoint.py) checks the index, writes the errors file and the final
file from the windows, and removes the parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from runner.io.parquet_files import READ_THREADS, open_parquet
from runner.io.retry import StorageError, is_transient
from runner.store.tables import conform_table, unified_schema

WINDOW_BYTES = 8 * 2**20  # uncompressed output bytes per window (the parts' average row size)
_KEYS = ("_row", "_sample", "finish_reason")


class TornPart(Exception):
    """A part whose footer and keys were readable but whose rows are not."""

    def __init__(self, path: str, error: BaseException):
        super().__init__(f"unreadable rows ({error})")
        self.path = path


@dataclass(slots=True)
class PartIndex:
    """What compaction needs to know of one committed part, read without its values."""

    path: str
    metadata: pq.FileMetaData
    keys: pa.Table  # _row, and _sample / finish_reason where the part has them

    @classmethod
    def read(cls, path: str, f: IO[bytes]) -> PartIndex:
        """Index the part open as `f`; raises ArrowException / OSError if it is torn."""
        pf = open_parquet(f)
        keys = [c for c in _KEYS if c in pf.schema_arrow.names]
        return cls(path, pf.metadata, pf.read(columns=keys, use_threads=READ_THREADS))


class ShardCompaction:
    """The deduplicated rows of a shard's parts, streamed in input order.

    `open_part(path)` opens a part for reading (with retries); it is called once per part and
    window that needs it, so no more than one part is open at a time.
    """

    def __init__(
        self,
        parts: list[PartIndex],
        open_part: Callable[[str], ContextManager[IO[bytes]]],
        window_bytes: int = WINDOW_BYTES,
    ):
        self._parts = parts
        self._open_part = open_part
        self._starts = [_row_group_starts(p.metadata) for p in parts]
        self.schema, self._json_cols = (
            unified_schema([p.metadata.schema.to_arrow_schema() for p in parts])
            if parts
            else (pa.schema([("_row", pa.int64())]), set())
        )
        self.index = _winners(parts)
        total_bytes = sum(
            p.metadata.row_group(g).total_byte_size for p in parts for g in range(p.metadata.num_row_groups)
        )
        total_rows = sum(p.metadata.num_rows for p in parts)
        self._window_rows = max(1, window_bytes * total_rows // max(total_bytes, 1))

    @property
    def error_rows(self) -> int:
        """Winning rows with finish_reason "error"."""
        return pc.sum(self._is_error()).as_py() or 0

    def windows(self, errors_only: bool = False) -> Iterator[pa.Table]:
        """The winning rows (or only the error rows) in input order, as tables of `self.schema`.

        Raises TornPart if a part's rows cannot be read.
        """
        entries = self.index.filter(self._is_error()) if errors_only else self.index
        for start in range(0, entries.num_rows, self._window_rows):
            yield self._read_window(entries.slice(start, self._window_rows))

    def _is_error(self) -> pa.ChunkedArray:
        if "finish_reason" not in self.index.column_names:
            return pa.chunked_array([pa.array([False] * self.index.num_rows)])
        return pc.fill_null(pc.equal(self.index.column("finish_reason"), "error"), False)

    def _read_window(self, window: pa.Table) -> pa.Table:
        parts = window.column("_part").to_numpy()
        positions = window.column("_pos").to_numpy()
        pieces, taken = [], []
        for p in np.unique(parts):
            at = np.flatnonzero(parts == p)  # the window's rows that part p holds
            for which, rows in self._read_part_rows(int(p), positions[at]):
                pieces.append(rows)
                taken.append(at[which])
        table = pa.concat_tables(pieces)
        return table.take(np.argsort(np.concatenate(taken), kind="stable"))

    def _read_part_rows(self, p: int, positions: np.ndarray) -> Iterator[tuple[np.ndarray, pa.Table]]:
        """(indices into `positions`, their rows) for each row group of part p that holds some."""
        part, starts = self._parts[p], self._starts[p]
        groups = np.searchsorted(starts, positions, side="right") - 1
        try:
            with self._open_part(part.path) as f:
                pf = open_parquet(f, metadata=part.metadata)
                for g in np.unique(groups):
                    which = np.flatnonzero(groups == g)
                    # one row group of one part in memory
                    rows = pf.read_row_group(int(g), use_threads=READ_THREADS)
                    rows = rows.take(positions[which] - starts[g])
                    yield which, conform_table(rows, self.schema, self._json_cols)
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, StorageError) or is_transient(e):
                raise  # the storage, not the part: the caller retries the whole write
            raise TornPart(part.path, e) from e


def _winners(parts: list[PartIndex]) -> pa.Table:
    """Keys of the rows that make the final file, sorted by (_row, _sample): the first committed copy
    of each key wins (a stable sort over the parts in commit order), with `_part` and `_pos` saying
    where each one is."""
    tables = [
        p.keys.append_column("_part", pa.array(np.full(p.keys.num_rows, i, np.int32))).append_column(
            "_pos", pa.array(np.arange(p.keys.num_rows, dtype=np.int64))
        )
        for i, p in enumerate(parts)
    ]
    if not tables:
        return pa.table({"_row": pa.array([], pa.int64()), "_part": pa.array([], pa.int32())})
    table = pa.concat_tables(tables, promote_options="permissive")
    keys = ["_row", "_sample"] if "_sample" in table.column_names else ["_row"]
    table = table.sort_by([(k, "ascending") for k in keys])
    if table.num_rows == 0:
        return table
    starts = None  # starts[i]: row i + 1 has another key than row i
    for k in keys:
        column = table.column(k).combine_chunks().fill_null(0)
        differs = pc.not_equal(column[1:], column[:-1])
        starts = differs if starts is None else pc.or_(starts, differs)
    return table.filter(pa.concat_arrays([pa.array([True]), starts]))


def _row_group_starts(metadata: pq.FileMetaData) -> np.ndarray:
    """The position of each row group's first row, and the number of rows at the end."""
    sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    return np.cumsum([0, *sizes])
