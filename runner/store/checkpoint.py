"""The commit protocol: progress lives in the output itself, so any kill is resumable exactly once.

Layout under the output root, for a shard with id `sub/a.jsonl` (stem `sub/a`):

    sub/a.parquet                        final file: its existence means the shard is done
    sub/a.parts/part-<n>-<attempt>.parquet   committed parts (a visible part is a commit)
    _batchrun/run.json                   the run fingerprint
    _batchrun/errors/sub/a.jsonl         the shard's error rows, with their reasons
    _batchrun/quarantine/sub/a/<part>    torn or unreadable parts, set aside, never deleted

Parts are always Parquet (typed, and their `_row` column is read alone on resume); the final file
has the output format and is streamed from the parts (runner/store/compaction.py). Compaction writes the
errors file, then the final file, then removes the parts, so a kill at any point leaves a state
that the next scan/compact finishes.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import IO, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from runner.faults import kill_point
from runner.io.parquet_files import READ_THREADS, open_parquet
from runner.io.retry import StorageError, retry
from runner.io.sources import shard_stem
from runner.io.storage import is_local
from runner.store.atomic import TEMP_PREFIX
from runner.store.compaction import PartIndex, ShardCompaction, TornPart
from runner.store.state import STATE_DIR, CheckpointError, StateStore
from runner.store.tables import (
    OutputFormat,
    output_suffix,
    rows_to_table,
    write_table_atomic,
    write_tables_atomic,
)

logger = logging.getLogger(__name__)

_PART_RE = re.compile(r"part-(\d+)-([0-9a-z]+)\.parquet")
_OUTPUT_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst")


class OutputLocation(Protocol):
    """Where and how a job writes its output (the spec's `output:` section is one)."""

    path: str
    storage_options: dict
    format: OutputFormat
    compression: str | None


@dataclass(slots=True)
class ShardProgress:
    """What the output already holds for one shard."""

    done: bool  # the final file exists
    rows: set[int] = field(default_factory=set)  # rows committed in parts (empty for a done shard)
    parts: int = 0  # readable parts
    error_rows: int = 0  # committed output rows with finish_reason "error"


class OutputStore(StateStore):
    """One job's output root: parts, final shards, and the run's state under `_batchrun/`."""

    def __init__(self, url: str, storage_options: dict, format: OutputFormat, compression: str | None):
        super().__init__(url, storage_options)
        self.format = format
        self.compression = compression
        self.suffix = output_suffix(format, compression)
        self._attempt = f"{int(time.time()):x}{os.getpid():x}{secrets.token_hex(3)}"
        self._next_part: dict[str, int] = {}

    @classmethod
    def for_output(cls, output: OutputLocation) -> OutputStore:
        """The store of a job spec's `output:` section."""
        return cls(output.path, output.storage_options, output.format, output.compression)

    # ---- paths

    def final_path(self, shard_id: str) -> str:
        return self._path(shard_stem(shard_id) + self.suffix)

    def parts_dir(self, shard_id: str) -> str:
        return self._path(shard_stem(shard_id) + ".parts")

    def shard_paths(self, shard_id: str) -> list[str]:
        """What the shard's writer creates: its parts folder (ending in "/"), final and errors files."""
        return [self.parts_dir(shard_id) + "/", self.final_path(shard_id), self._errors_path(shard_id)]

    def _errors_path(self, shard_id: str) -> str:
        return self._state(f"errors/{shard_stem(shard_id)}.jsonl")

    # ---- run fingerprint

    def check_fingerprint(self, fingerprint: dict, force_new_run: bool = False) -> None:
        """Record the run's fingerprint on the first run; refuse to resume a different run.

        With `force_new_run`, this output's previous progress (parts, final shards, state files;
        not the quarantine nor the leases) is removed first and the new fingerprint recorded.
        """
        if force_new_run:
            self._discard_progress()
        self.record_fingerprint(fingerprint)

    def _discard_progress(self) -> None:
        self._invalidate(self.root)
        if not self.fs.exists(self.root):
            return
        doomed = set()  # top-most paths only, so that no removal contains another
        for path, info in self.fs.find(self.root, detail=True).items():
            parts = path[len(self.root) :].strip("/").split("/")
            in_parts = [i for i, p in enumerate(parts) if p.endswith(".parts")]
            if parts[0] == STATE_DIR:
                if len(parts) > 1 and parts[1] not in ("quarantine", "leases"):
                    doomed.add(self._state(parts[1]))
            elif in_parts:
                doomed.add(self._path("/".join(parts[: in_parts[0] + 1])))
            elif info["type"] == "file" and path.endswith(_OUTPUT_SUFFIXES):
                doomed.add(path)
        for path in sorted(doomed):
            self.fs.rm(path, recursive=True)
        self._next_part.clear()
        logger.warning("--force-new-run: removed the previous progress in %s", self.url)

    # ---- per-shard progress

    def scan(self, shard_id: str, repair: bool = True) -> ShardProgress:
        """What is committed for `shard_id`.

        With `repair` (the job's own resume), torn parts are quarantined, temp files of killed
        writers removed, and parts left by a kill during compaction's cleanup deleted. Without it
        (`batchrun status`, safe while a job runs), nothing is changed and torn parts are skipped.
        """
        final = self.final_path(shard_id)
        self._invalidate(final)
        if repair:
            self._remove_temps(final)
            self._remove_temps(self._errors_path(shard_id))
        if self.fs.exists(final):
            if repair:
                self._remove_parts(shard_id)
            return ShardProgress(done=True)
        progress = ShardProgress(done=False)
        for path in self._part_paths(shard_id, repair):
            try:
                table = self._read_part(path, columns=["_row", "finish_reason"])
            except CheckpointError as e:
                if repair:
                    self._quarantine(shard_id, path, str(e))
                continue
            progress.parts += 1
            progress.rows.update(table.column("_row").to_pylist())
            if "finish_reason" in table.column_names:
                progress.error_rows += pc.sum(pc.equal(table.column("finish_reason"), "error")).as_py() or 0
        return progress

    def error_count(self, shard_id: str) -> int:
        """Error rows of a done shard: the lines of its `_batchrun/errors/` file (none if absent)."""
        try:
            with self.fs.open(self._errors_path(shard_id), "rb") as f:
                return sum(1 for line in f if line.strip())
        except FileNotFoundError:
            return 0

    def error_reasons(self, shard_id: str) -> list[str]:
        """The `error` of each committed error row of a shard (read only; for `batchrun status`)."""
        try:
            with self.fs.open(self._errors_path(shard_id), "rb") as f:
                return [_reason(json.loads(line)) for line in f if line.strip()]
        except FileNotFoundError:
            pass
        reasons = []
        for path in self._part_paths(shard_id, repair=False):
            try:
                table = self._read_part(path, columns=["_row", "finish_reason", "error"])
            except CheckpointError:
                continue
            if "error" in table.column_names:
                errors = table.filter(pc.equal(table.column("finish_reason"), "error"))
                reasons += [e or "" for e in errors.column("error").to_pylist()]
        return reasons

    def commit_part(self, shard_id: str, rows: list[dict]) -> str:
        """Commit `rows` (each with `_row`) as the shard's next part; returns the part's path."""
        assert rows and all(isinstance(r.get("_row"), int) for r in rows), "every output row needs its _row"
        if shard_id not in self._next_part:
            self._next_part[shard_id] = self._next_index(shard_id)
        n = self._next_part[shard_id]
        self._next_part[shard_id] = n + 1
        path = posixpath.join(self.parts_dir(shard_id), f"part-{n:06d}-{self._attempt}.parquet")
        table = rows_to_table(rows)
        retry(f"writing part {self._name(path)}", lambda: write_table_atomic(self.fs, path, table, "parquet"))
        kill_point("part_committed")
        return path

    def compact(self, shard_id: str, num_rows: int) -> None:
        """Write the shard's final file from its parts (rows 0..num_rows-1, input order, no duplicates).

        Also writes its error rows to `_batchrun/errors/`, then removes the parts. Both files are
        streamed a window of rows at a time (runner/store/compaction.py), so memory does not grow with the
        shard. Safe to rerun after a kill at any point.
        """
        final = self.final_path(shard_id)
        self._invalidate(final)
        if self.fs.exists(final):
            self._remove_parts(shard_id)
            return
        parts = []
        for path in self._part_paths(shard_id):
            try:
                parts.append(self._index_part(path))
            except CheckpointError as e:
                self._quarantine(shard_id, path, str(e))
        shard = ShardCompaction(parts, self._open_part)
        self._check_complete(shard_id, shard.index, num_rows)
        errors_format = "openai-batch" if self.format == "openai-batch" else "jsonl"  # as the output's lines
        try:
            if shard.error_rows:
                path = self._errors_path(shard_id)
                retry(
                    f"writing {self._name(path)}",
                    lambda: write_tables_atomic(
                        self.fs, path, shard.schema, shard.windows(True), errors_format
                    ),
                )
            kill_point("compaction_started")
            retry(
                f"writing {self._name(final)}",
                lambda: write_tables_atomic(
                    self.fs, final, shard.schema, shard.windows(), self.format, self.compression
                ),
            )
        except TornPart as e:
            self._quarantine(shard_id, e.path, str(e))
            return self.compact(shard_id, num_rows)  # its rows missing: says so, unless duplicates cover
        kill_point("compaction_final_written")
        self._remove_parts(shard_id)

    @staticmethod
    def _check_complete(shard_id: str, index: pa.Table, num_rows: int) -> None:
        rows = pc.unique(index.column("_row"))  # sorted, as the index is
        if len(rows) != num_rows or (num_rows and (rows[0].as_py(), rows[-1].as_py()) != (0, num_rows - 1)):
            have = set(rows.to_pylist())
            missing = sorted(set(range(num_rows)) - have)
            extra = sorted(have - set(range(num_rows)))
            raise CheckpointError(
                f"shard {shard_id}: cannot compact, its parts hold {len(have) - len(extra)} of "
                f"{num_rows} rows (missing {_preview(missing)}; unexpected {_preview(extra)}); "
                "run the job again to process the missing rows"
            )

    # ---- helpers

    def _part_paths(self, shard_id: str, repair: bool = True) -> list[str]:
        """The shard's part files in commit order; with `repair`, removes temp files of killed writers."""
        directory = self.parts_dir(shard_id)
        self._invalidate(directory)
        try:
            names = retry(f"listing {self._name(directory)}", lambda: self.fs.ls(directory, detail=False))
        except FileNotFoundError:
            return []
        parts = []
        for path in names:
            name = posixpath.basename(path.rstrip("/"))
            if name.startswith(TEMP_PREFIX):
                if repair:
                    retry(
                        f"removing {self._name(path)}", lambda p=path: self.fs.rm(p)
                    )  # never visible, never committed
            elif match := _PART_RE.fullmatch(name):
                parts.append((int(match[1]), match[2], path))
            else:
                logger.warning("ignoring %s: not a part file", path)
        return [path for *_, path in sorted(parts)]

    def _next_index(self, shard_id: str) -> int:
        names = [posixpath.basename(p) for p in self._part_paths(shard_id)]
        return 1 + max((int(_PART_RE.fullmatch(n)[1]) for n in names), default=-1)

    def _open_part(self, path: str) -> IO[bytes]:
        return retry(f"opening part {self._name(path)}", lambda: self.fs.open(path, "rb"))

    def _read_part(self, path: str, columns: list[str]) -> pa.Table:
        try:
            # only the open is retried: a failure while parsing is a torn part, and quarantined
            with self._open_part(path) as f:
                pf = open_parquet(f)
                names = [c for c in columns if c in pf.schema_arrow.names]
                table = pf.read(columns=names, use_threads=READ_THREADS)
        except StorageError:
            raise
        except (pa.ArrowException, OSError) as e:
            raise CheckpointError(f"unreadable part ({e})") from e
        _check_rows(table)
        return table

    def _index_part(self, path: str) -> PartIndex:
        """The part's footer and key columns (compaction's first pass, values not read)."""
        try:
            with self._open_part(path) as f:
                part = PartIndex.read(path, f)
        except StorageError:
            raise
        except (pa.ArrowException, OSError) as e:
            raise CheckpointError(f"unreadable part ({e})") from e
        _check_rows(part.keys)
        return part

    def _quarantine(self, shard_id: str, path: str, reason: str) -> None:
        target = self._state(f"quarantine/{shard_stem(shard_id)}/{posixpath.basename(path)}")
        logger.error("quarantined %s -> %s: %s; its rows will be processed again", path, target, reason)
        if is_local(self.fs):
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        retry(f"moving {self._name(path)} to {self._name(target)}", lambda: self.fs.mv(path, target))

    def _remove_parts(self, shard_id: str) -> None:
        directory = self.parts_dir(shard_id)
        self._invalidate(directory)

        def remove() -> None:
            if self.fs.exists(directory):  # a retry after a partial removal finds less, or nothing
                self.fs.rm(directory, recursive=True)

        retry(f"removing {self._name(directory)}", remove)


def _reason(line: dict) -> str:
    """An errors-file line's reason: its `error` (an OpenAI output line's is {code, message})."""
    error = line.get("error") or ""
    return error.get("message") or "" if isinstance(error, dict) else error


def _check_rows(table: pa.Table) -> None:
    if "_row" not in table.column_names or table.column("_row").null_count:
        raise CheckpointError("part without a complete _row column")


def _preview(values: list[int], limit: int = 10) -> str:
    if len(values) == 0:
        return "none"
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"
