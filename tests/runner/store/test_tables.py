import gzip
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from runner.store.atomic import write_atomic
from runner.store.tables import output_suffix, rows_to_table, write_table_atomic
from tests.helpers import unify_tables


def _fail_midway(f):
    f.write(b"half a file")
    raise RuntimeError("disk on fire")


@pytest.fixture
def fs():
    return fsspec.filesystem("file")


class TestRowsToTable:
    def test_columns_in_order_of_appearance_missing_as_null(self):
        table = rows_to_table([{"a": 1, "b": "x"}, {"b": "y", "c": 2.5}])
        assert table.column_names == ["a", "b", "c"]
        assert table.to_pylist() == [{"a": 1, "b": "x", "c": None}, {"a": None, "b": "y", "c": 2.5}]
        assert table.schema.field("a").type == pa.int64()

    def test_mixed_types_become_json_text(self):
        rows = [{"v": 1, "w": 1}, {"v": "one", "w": 2.5}, {"v": [1, "x"], "w": None}, {"v": None, "w": 3}]
        table = rows_to_table(rows)
        assert table.schema.field("w").type == pa.float64()
        assert table.schema.field("v").type == pa.string()
        assert table.column("v").to_pylist() == ["1", '"one"', '[1, "x"]', None]

    def test_jsonl_output_restores_the_values(self, fs, tmp_path):
        rows = [{"v": 1, "n": {"k": [1, 2]}}, {"v": "one", "n": {"k": []}}, {"v": {"x": None}, "n": None}]
        path = str(tmp_path / "o.jsonl")
        write_table_atomic(fs, path, rows_to_table(rows), "jsonl")
        with open(path) as f:
            assert [json.loads(line) for line in f] == rows


class TestUnify:
    def test_promotes_and_fills_missing_columns(self):
        a = rows_to_table([{"_row": 0, "x": 1}])
        b = rows_to_table([{"_row": 1, "x": 2.5, "y": "new"}])
        c = rows_to_table([{"_row": 2, "x": None}])
        table = unify_tables([a, b, c])
        assert table.schema.field("x").type == pa.float64()
        assert table.to_pylist() == [
            {"_row": 0, "x": 1.0, "y": None},
            {"_row": 1, "x": 2.5, "y": "new"},
            {"_row": 2, "x": None, "y": None},
        ]

    def test_irreconcilable_types_become_json_in_every_part(self):
        a = rows_to_table([{"v": 1}])  # int64
        b = rows_to_table([{"v": "s"}])  # string
        c = rows_to_table([{"v": True}, {"v": "t"}])  # already JSON text in this part
        table = unify_tables([a, b, c])
        assert table.column("v").to_pylist() == ["1", '"s"', "true", '"t"']

    def test_a_plain_string_part_is_encoded_when_another_part_is_json(self):
        table = unify_tables([rows_to_table([{"v": "a"}]), rows_to_table([{"v": 1}, {"v": "b"}])])
        assert table.column("v").to_pylist() == ['"a"', "1", '"b"']


class TestWriteAtomic:
    def test_parquet_roundtrip(self, fs, tmp_path):
        path = str(tmp_path / "deep/dir/t.parquet")
        write_table_atomic(fs, path, pa.table({"a": [1, 2]}), "parquet")
        assert pq.read_table(path).to_pylist() == [{"a": 1}, {"a": 2}]
        assert sorted(p.name for p in (tmp_path / "deep/dir").iterdir()) == ["t.parquet"]

    @pytest.mark.parametrize("compression", ["gzip", "zstd", None])
    def test_jsonl_compression(self, fs, tmp_path, compression):
        path = tmp_path / f"t{output_suffix('jsonl', compression)}"
        write_table_atomic(fs, str(path), pa.table({"a": [1, 2], "t": ["é", None]}), "jsonl", compression)
        data = path.read_bytes()
        if compression == "gzip":
            data = gzip.decompress(data)
        elif compression == "zstd":
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        assert data.decode("utf-8") == '{"a": 1, "t": "é"}\n{"a": 2, "t": null}\n'

    def test_an_error_leaves_nothing_and_keeps_the_old_file(self, fs, tmp_path):
        path = str(tmp_path / "t.parquet")
        write_table_atomic(fs, path, pa.table({"a": [1]}), "parquet")
        with pytest.raises(RuntimeError, match="disk on fire"):
            write_atomic(fs, path, _fail_midway)
        assert pq.read_table(path).to_pylist() == [{"a": 1}]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]
