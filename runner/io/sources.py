"""Input shards: discovery (sorted fsspec listing) and streaming readers for Parquet and JSONL.

A shard is one input file. Its id is its path relative to the input root (the longest directory
prefix of the user's path that holds no glob characters), so ids stay stable across machines and
nested directories work. Rows are numbered by their position in the shard (JSONL: among the
non-blank lines). Reading is streamed: memory holds one batch of rows (at most `batch_rows`, and for
Parquet about PARQUET_BATCH_BYTES, decoded from the row group page by page) plus the reader's
buffers, never the shard. A single JSONL line is read whole, however long.
"""

from __future__ import annotations

import gzip
import io
import json
import posixpath
from collections.abc import Container, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import IO, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from runner.io.parquet_files import READ_THREADS, open_parquet
from runner.io.retry import retry
from runner.io.storage import is_local, url_to_fs

Format = Literal["parquet", "jsonl"]
PARQUET_READ_BUFFER = 2**20  # Parquet column chunks are read through buffers of this size, page by page
PARQUET_BATCH_BYTES = 4 * 2**20  # and decoded in batches of about this many bytes (fewer rows if wide)

_FORMAT_SUFFIXES: dict[str, Format] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}
_COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_GLOB_CHARS = frozenset("*?[")


class InputError(ValueError):
    """The input cannot be read as asked; the message names the file (and row/field) and the fix."""


@dataclass(slots=True, frozen=True)
class Shard:
    """One input file."""

    id: str  # path relative to the input root, e.g. "part-000.parquet" or "sub/a.jsonl.gz"
    url: str  # full fsspec URL (plain absolute path on the local disk)
    format: Format
    compression: str | None  # None | "gzip" | "zstd" (JSONL only; Parquet compresses internally)


@dataclass(slots=True)
class SourceRow:
    """One input row, or the reason it could not be read (then `values` is None)."""

    row: int  # position in the shard, 0-based (JSONL: index among non-blank lines)
    values: dict | None
    error: str | None
    line: int | None = None  # JSONL: the 1-based line number an editor shows

    @property
    def place(self) -> str:
        """Where the row is, as messages say it: "line 5" (JSONL) or "row 4" (Parquet)."""
        return f"row {self.row}" if self.line is None else f"line {self.line}"


def split_suffix(name: str) -> tuple[str, str, str | None]:
    """`"sub/a.jsonl.gz"` -> `("sub/a", ".jsonl", "gzip")`; unknown suffixes give `(name, "", None)`."""
    stem, ext = posixpath.splitext(name)
    compression = _COMPRESSION_SUFFIXES.get(ext.lower())
    if compression is not None:
        stem, ext = posixpath.splitext(stem)
    if ext.lower() in _FORMAT_SUFFIXES:
        return stem, ext.lower(), compression
    return name, "", None


def shard_stem(shard_id: str) -> str:
    """The shard id without its format/compression suffix: the base name of its output files."""
    return split_suffix(shard_id)[0]


def list_shards(paths: list[str], storage_options: dict, format: Format | None = None) -> list[Shard]:
    """Every file matched by `paths` (globs, files or directories, local or fsspec URLs), sorted by id.

    Directories are listed recursively, skipping names that start with "." or "_" (`_SUCCESS`,
    `_batchrun/`). The format comes from the suffix unless `format` is given.
    """
    assert not isinstance(paths, str), "paths is a list of paths"
    shards: dict[str, Shard] = {}
    for path in paths:
        fs, pattern = url_to_fs(path, storage_options)
        root, files = retry(f"listing {path}", lambda fs=fs, p=pattern, u=path: _expand(fs, p, u))
        for file in files:
            shard_id = file[len(root) :].lstrip("/")
            shard = _make_shard(fs, file, shard_id, format)
            other = shards.get(shard.id)
            if other is not None and other.url != shard.url:
                raise InputError(
                    f"input files {other.url} and {shard.url} both have shard id {shard.id!r}; "
                    "list paths whose relative names differ (e.g. one glob over their common parent)"
                )
            shards[shard.id] = shard
    by_stem: dict[str, Shard] = {}
    for shard in shards.values():
        clash = by_stem.setdefault(shard_stem(shard.id), shard)
        if clash is not shard:
            raise InputError(
                f"input shards {clash.id!r} and {shard.id!r} would write the same output "
                f"{shard_stem(shard.id)!r}; rename one or narrow the glob"
            )
    return [shards[k] for k in sorted(shards)]


def _expand(fs: fsspec.AbstractFileSystem, pattern: str, path: str) -> tuple[str, list[str]]:
    """(input root, matching files) of one user path."""
    parts = pattern.rstrip("/").split("/")
    if any(ch in pattern for ch in _GLOB_CHARS):
        first_magic = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
        root = "/".join(parts[:first_magic])
        found = fs.glob(pattern, detail=True)
        files = [name for name, info in found.items() if info["type"] == "file"]
    elif fs.isdir(pattern):
        root = pattern.rstrip("/")
        files = [f for f in fs.find(root) if not _is_hidden(f[len(root) :])]
    elif fs.isfile(pattern):
        root, files = posixpath.dirname(pattern), [pattern]
    else:
        raise InputError(f"input path {path!r} does not exist (check the path and storage options)")
    if not files:
        raise InputError(f"no files match {path!r} (check the glob, the bucket and storage options)")
    return root, sorted(files)


def _is_hidden(relpath: str) -> bool:
    return any(part[:1] in (".", "_") for part in relpath.split("/") if part)


def _make_shard(fs: fsspec.AbstractFileSystem, file: str, shard_id: str, format: Format | None) -> Shard:
    _, ext, compression = split_suffix(shard_id)
    url = file if is_local(fs) else fs.unstrip_protocol(file)
    if format is None:
        if not ext:
            raise InputError(
                f"{url}: unknown file suffix; use .parquet/.pq or .jsonl/.json/.ndjson (optionally "
                "+ .gz/.zst), narrow the glob, or set the input format"
            )
        format = _FORMAT_SUFFIXES[ext]
    if format == "parquet" and compression is not None:
        raise InputError(f"{url}: Parquet compresses internally; a {compression} wrapper is not readable")
    return Shard(id=shard_id, url=url, format=format, compression=compression)


def read_shard(
    shard: Shard,
    storage_options: dict,
    *,
    skip: Container[int] = (),
    batch_rows: int = 1024,
    columns: list[str] | None = None,
) -> Iterator[list[SourceRow]]:
    """Stream a shard as batches of at most `batch_rows` rows, in order.

    Rows whose number is in `skip` are not yielded (they still count for numbering). A row that
    cannot be decoded is yielded with its error instead of its values. A file that cannot be read
    at all (corrupt Parquet, broken compression) raises InputError naming it; batches yielded before
    stay valid. `columns` keeps only those fields (JSONL rows lacking one simply omit it).
    """
    assert batch_rows > 0
    if shard.format == "parquet":
        yield from _read_parquet(shard, storage_options, skip, batch_rows, columns)
    else:
        yield from _read_jsonl(shard, storage_options, skip, batch_rows, columns)


def count_rows(shard: Shard, storage_options: dict) -> int:
    """Number of rows in a shard: Parquet from its footer, JSONL by a streaming scan."""
    if shard.format == "parquet":
        with _open_parquet(shard, storage_options) as pf:
            return pf.metadata.num_rows
    return sum(1 for _ in _jsonl_lines(shard, storage_options))


@contextmanager
def _open_parquet(shard: Shard, storage_options: dict) -> Iterator[pq.ParquetFile]:
    fs, path = url_to_fs(shard.url, storage_options)
    with retry(f"opening {shard.url}", lambda: fs.open(path, "rb")) as f:
        try:
            pf = open_parquet(f, buffer_size=PARQUET_READ_BUFFER)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{shard.url}: not a readable Parquet file ({e})") from e
        yield pf


def _read_parquet(
    shard: Shard, storage_options: dict, skip: Container[int], batch_rows: int, columns: list[str] | None
) -> Iterator[list[SourceRow]]:
    with _open_parquet(shard, storage_options) as pf:
        if columns is not None:
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise InputError(
                    f"{shard.url}: no column {', '.join(map(repr, missing))} "
                    f"(columns: {', '.join(pf.schema_arrow.names)})"
                )
        start = 0
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            if any(r not in skip for r in range(start, start + n)):
                yield from _read_row_group(shard, pf, group, start, skip, batch_rows, columns)
            start += n


def _read_row_group(
    shard: Shard,
    pf: pq.ParquetFile,
    group: int,
    start: int,
    skip: Container[int],
    batch_rows: int,
    columns: list[str] | None,
) -> Iterator[list[SourceRow]]:
    """The wanted rows of one row group (its first row is number `start`), at most `batch_rows` and
    about PARQUET_BATCH_BYTES at a time: pages are decoded as the batches are taken, so memory holds
    a batch, not the row group."""
    meta = pf.metadata.row_group(group)
    row_bytes = max(1, meta.total_byte_size // max(1, meta.num_rows))
    size = max(1, min(batch_rows, PARQUET_BATCH_BYTES // row_bytes))
    row, rows = start, []
    try:
        for batch in pf.iter_batches(
            batch_size=size, row_groups=[group], columns=columns, use_threads=READ_THREADS
        ):
            for values in batch.to_pylist():
                if row not in skip:
                    rows.append(SourceRow(row=row, values=values, error=None))
                row += 1
            if len(rows) >= size:
                yield rows[:size]
                rows = rows[size:]
        if rows:
            yield rows
    except (pa.ArrowException, OSError) as e:
        end = start + meta.num_rows - 1
        raise InputError(f"{shard.url}: row group {group} (rows {start}..{end}) is unreadable ({e})") from e


def _jsonl_lines(shard: Shard, storage_options: dict) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of a JSONL shard with their 1-based line numbers, decompressed, without
    line endings."""
    fs, path = url_to_fs(shard.url, storage_options)
    count = 0
    try:
        raw = retry(f"opening {shard.url}", lambda: fs.open(path, "rb"))
        with raw, _decompress(raw, shard.compression) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if count == 0:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
                if line:
                    count += 1
                    yield lineno, line
    except (OSError, EOFError, ValueError) as e:  # truncated gzip, bad zstd frame, ...
        raise InputError(f"{shard.url}: unreadable after {count} rows ({type(e).__name__}: {e})") from e


def _decompress(raw: IO[bytes], compression: str | None) -> ContextManager[IO[bytes]]:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":  # fsspec's zstd reader cannot iterate lines, nor read concatenated frames
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    assert compression is None, compression
    return nullcontext(raw)


def _read_jsonl(
    shard: Shard, storage_options: dict, skip: Container[int], batch_rows: int, columns: list[str] | None
) -> Iterator[list[SourceRow]]:
    batch: list[SourceRow] = []
    lines = _jsonl_lines(shard, storage_options)
    row = -1
    while True:
        try:
            line = next(lines, None)
        except InputError:
            if batch:
                yield batch  # rows read before the damage are still good
            raise
        if line is None:
            break
        row += 1
        if row in skip:
            continue
        batch.append(_parse_line(shard, row, *line, columns))
        if len(batch) == batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def _parse_line(shard: Shard, row: int, lineno: int, line: bytes, columns: list[str] | None) -> SourceRow:
    where = f"{shard.url} line {lineno}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return SourceRow(
            row, None, f"{where}: not valid UTF-8 (byte 0x{line[e.start]:02x} at offset {e.start})", lineno
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return SourceRow(
            row, None, f"{where}: invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})", lineno
        )
    if not isinstance(value, dict):
        return SourceRow(row, None, f"{where}: not a JSON object (got {type(value).__name__})", lineno)
    if columns is not None:
        value = {c: value[c] for c in columns if c in value}
    return SourceRow(row, value, None, lineno)
