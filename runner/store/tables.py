"""Output tables: rows -> Arrow, permissive schema unification, and Parquet/JSONL files of them.

Files are written through `runner.store.atomic`: visible only when complete.

Columns whose values have no common Arrow type (JSONL input is free-form) are stored as JSON text
and marked in the field metadata, so that later parts unify with them and JSONL output restores
the original values.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import IO, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from runner.openai.response import output_line
from runner.store.atomic import write_atomic

logger = logging.getLogger(__name__)

OutputFormat = Literal["parquet", "jsonl", "openai-batch"]  # openai-batch: JSONL of OpenAI output lines
_JSON_KEY = b"batchrun.json"  # field metadata marking a column of JSON-encoded values
ROW_GROUP_BYTES = 4 * 2**20  # Parquet row groups of about this many uncompressed bytes: a part's
# or a final file's rows are read back one row group at a time (compaction, readers of the output)


def output_suffix(format: OutputFormat, compression: str | None) -> str:
    """Suffix of an output shard: `.parquet`, `.jsonl`, `.jsonl.gz` or `.jsonl.zst` (openai-batch: jsonl)."""
    if format == "parquet":
        assert compression is None, "Parquet output compresses internally"
        return ".parquet"
    return ".jsonl" + {None: "", "gzip": ".gz", "zstd": ".zst"}[compression]


def rows_to_table(rows: list[dict]) -> pa.Table:
    """An Arrow table of `rows`; columns in order of first appearance, missing keys as nulls.

    A column whose values share no Arrow type (e.g. int in one row, str in another) is stored as
    JSON text and marked as such, instead of failing the batch.
    """
    names = list(dict.fromkeys(key for row in rows for key in row))
    fields, arrays = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            array = pa.array(values)
            fields.append(pa.field(name, array.type))
        except (pa.ArrowException, OverflowError):
            _log_stringified(name)
            array = _json_array(values)
            fields.append(_json_field(name))
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


@functools.cache
def _log_stringified(name: str) -> None:
    logger.warning("column %r has values of mixed types; it is stored as JSON text", name)


def _json_array(values: list) -> pa.Array:
    return pa.array([None if v is None else json.dumps(v, default=str) for v in values], pa.string())


def _json_field(name: str) -> pa.Field:
    return pa.field(name, pa.string(), metadata={_JSON_KEY: b"1"})


def _is_json(field: pa.Field) -> bool:
    return bool(field.metadata) and _JSON_KEY in field.metadata


def unified_schema(schemas: list[pa.Schema]) -> tuple[pa.Schema, set[str]]:
    """The schema that tables of `schemas` unify to, and the columns stored as JSON text in it: missing
    columns become nulls, types are promoted (int -> float, null -> anything), and columns with
    irreconcilable types become JSON text. From the schemas alone, so that tables can be unified one
    at a time (`conform_table`)."""
    assert schemas
    types: dict[str, set[pa.DataType]] = defaultdict(set)
    json_cols = set()
    for schema in schemas:
        for field in schema:
            if _is_json(field):
                json_cols.add(field.name)
            elif field.type != pa.null():
                types[field.name].add(field.type)
    json_cols |= {name for name, ts in types.items() if len(ts) > 1 and not _promotable(ts)}
    for name in sorted(json_cols):
        _log_stringified(name)
    schemas = [_json_schema(schema, json_cols) for schema in schemas]
    return pa.unify_schemas(schemas, promote_options="permissive"), json_cols


def conform_table(table: pa.Table, schema: pa.Schema, json_cols: set[str]) -> pa.Table:
    """`table` in the unified `schema` from `unified_schema`: JSON text where it says, missing
    columns as nulls, promoted types."""
    table = _jsonify(table, json_cols)
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _promotable(types: set[pa.DataType]) -> bool:
    try:
        pa.unify_schemas([pa.schema([("x", t)]) for t in types], promote_options="permissive")
    except pa.ArrowException:
        return False
    return True


def _json_schema(schema: pa.Schema, names: set[str]) -> pa.Schema:
    return pa.schema(
        [_json_field(f.name) if f.name in names else f for f in schema], metadata=schema.metadata
    )


def _jsonify(table: pa.Table, names: set[str]) -> pa.Table:
    for i, field in enumerate(table.schema):
        if field.name in names and not _is_json(field):
            table = table.set_column(i, _json_field(field.name), _json_array(table.column(i).to_pylist()))
    return table


def write_table_atomic(
    fs: fsspec.AbstractFileSystem,
    path: str,
    table: pa.Table,
    format: OutputFormat,
    compression: str | None = None,
) -> None:
    """Write `table` to `path` so that the file is visible only once complete.

    JSONL: one JSON object per line, UTF-8, gzip/zstd when `compression` says so; JSON-text
    columns are decoded back to their values. openai-batch: JSONL of each row's OpenAI output line.
    """
    write_tables_atomic(fs, path, table.schema, [table], format, compression)


def write_tables_atomic(
    fs: fsspec.AbstractFileSystem,
    path: str,
    schema: pa.Schema,
    tables: Iterable[pa.Table],
    format: OutputFormat,
    compression: str | None = None,
) -> None:
    """`write_table_atomic` for a stream of tables of `schema`, written one at a time: memory holds one
    table (and an upload chunk), not the file. Parquet row groups are cut at about ROW_GROUP_BYTES."""
    if format == "parquet":
        assert compression is None, "Parquet output compresses internally"
        write_atomic(fs, path, lambda f: _write_parquet(schema, tables, f))
    else:
        line_of = output_line if format == "openai-batch" else None
        write_atomic(fs, path, lambda f: _write_jsonl(tables, f, compression, line_of))


def _write_parquet(schema: pa.Schema, tables: Iterable[pa.Table], f: IO[bytes]) -> None:
    with pq.ParquetWriter(f, schema) as writer:
        for table in tables:
            rows_per_group = max(1, ROW_GROUP_BYTES * table.num_rows // max(table.nbytes, 1))
            writer.write_table(table, row_group_size=rows_per_group)


LineOf = Callable[[dict], dict] | None  # makes a row's line (None: the row itself)


def _write_jsonl(tables: Iterable[pa.Table], f: IO[bytes], compression: str | None, line_of: LineOf) -> None:
    if compression == "gzip":
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as z:
            _write_lines(tables, z, line_of)
    elif compression == "zstd":
        with zstandard.ZstdCompressor().stream_writer(f, closefd=False) as z:
            _write_lines(tables, z, line_of)
    else:
        assert compression is None, compression
        _write_lines(tables, f, line_of)


def _write_lines(tables: Iterable[pa.Table], f: IO[bytes], line_of: LineOf) -> None:
    for table in tables:
        _write_table_lines(table, f, line_of)


def _write_table_lines(table: pa.Table, f: IO[bytes], line_of: LineOf) -> None:
    json_cols = {field.name for field in table.schema if _is_json(field)}
    rows_per_mib = 2**20 * table.num_rows // max(table.nbytes, 1)  # as Python objects, a batch is larger
    for batch in table.to_batches(max_chunksize=min(1024, max(1, rows_per_mib))):
        out = io.StringIO()
        for row in batch.to_pylist():
            for name in json_cols:
                if row[name] is not None:
                    row[name] = json.loads(row[name])
            row = line_of(row) if line_of else row
            out.write(json.dumps(row, ensure_ascii=False, default=str))
            out.write("\n")
        f.write(out.getvalue().encode("utf-8"))
