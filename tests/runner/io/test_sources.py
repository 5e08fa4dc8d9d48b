import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from runner.io.sources import InputError, Shard, count_rows, list_shards, read_shard, shard_stem


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _rows(shard, **kw):
    return [r for batch in read_shard(shard, {}, **kw) for r in batch]


def _one(path, format=None):
    [shard] = list_shards([str(path)], {}, format)
    return shard


class TestListShards:
    def test_glob_is_sorted_with_ids_relative_to_the_root(self, tmp_path):
        for name in ["b.jsonl", "a.jsonl", "sub/c.parquet", "sub/deeper/d.jsonl.gz", "sub/e.jsonl.zst"]:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(b"")
        shards = list_shards([f"{tmp_path}/**"], {})
        assert [(s.id, s.format, s.compression) for s in shards] == [
            ("a.jsonl", "jsonl", None),
            ("b.jsonl", "jsonl", None),
            ("sub/c.parquet", "parquet", None),
            ("sub/deeper/d.jsonl.gz", "jsonl", "gzip"),
            ("sub/e.jsonl.zst", "jsonl", "zstd"),
        ]
        assert shards[2].url == str(tmp_path / "sub/c.parquet")

    def test_directory_file_and_glob_agree_and_union(self, tmp_path):
        for name in ["x/a.jsonl", "x/sub/b.ndjson", "x/_SUCCESS", "x/.hidden.jsonl", "x/_batchrun/run.json"]:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(b"")
        assert [s.id for s in list_shards([str(tmp_path / "x")], {})] == ["a.jsonl", "sub/b.ndjson"]
        assert [s.id for s in list_shards([str(tmp_path / "x/sub/b.ndjson")], {})] == ["b.ndjson"]
        union = list_shards([str(tmp_path / "x/sub/*.ndjson"), str(tmp_path / "x/a.jsonl")], {})
        assert [s.id for s in union] == ["a.jsonl", "b.ndjson"]

    def test_no_match_names_the_glob(self, tmp_path):
        with pytest.raises(InputError, match=r"no files match '.*/nothing\*\.parquet' \(check the glob"):
            list_shards([f"{tmp_path}/nothing*.parquet"], {})

    def test_missing_path(self, tmp_path):
        with pytest.raises(InputError, match="does not exist"):
            list_shards([str(tmp_path / "absent.jsonl")], {})

    def test_unknown_suffix_needs_a_format(self, tmp_path):
        (tmp_path / "data.txt").write_text('{"a": 1}\n')
        with pytest.raises(InputError, match=r"data\.txt: unknown file suffix"):
            list_shards([str(tmp_path / "data.txt")], {})
        assert _one(tmp_path / "data.txt", "jsonl").format == "jsonl"

    def test_colliding_output_stems_are_refused(self, tmp_path):
        (tmp_path / "a.jsonl").write_text("")
        (tmp_path / "a.parquet").write_text("")
        with pytest.raises(InputError, match="would write the same output 'a'"):
            list_shards([f"{tmp_path}/*"], {})

    def test_shard_stem(self):
        assert shard_stem("sub/a.jsonl.gz") == "sub/a"
        assert shard_stem("part-000.parquet") == "part-000"
        assert shard_stem("odd.txt") == "odd.txt"


class TestJsonl:
    def test_rows_batches_skip_and_blank_lines(self, tmp_path):
        path = tmp_path / "a.jsonl"
        path.write_text("".join(f'{{"i": {i}}}\n' + ("\n  \n" if i == 2 else "") for i in range(7)))
        shard = _one(path)
        batches = list(read_shard(shard, {}, batch_rows=3, skip={1, 5}))
        assert [[r.row for r in b] for b in batches] == [[0, 2, 3], [4, 6]]
        assert [r.values for r in batches[0]] == [{"i": 0}, {"i": 2}, {"i": 3}]
        assert count_rows(shard, {}) == 7

    def test_bad_lines_become_error_rows_and_the_rest_is_read(self, tmp_path):
        path = tmp_path / "bad.jsonl"
        path.write_bytes(b'{"a": 1}\n{"a": 2,,}\n[1, 2]\n{"a": "\xff\xfe"}\n"text"\n{"a": 5}\n')
        rows = _rows(_one(path))
        assert [r.row for r in rows] == [0, 1, 2, 3, 4, 5]
        assert [r.values for r in rows] == [{"a": 1}, None, None, None, None, {"a": 5}]
        assert (
            rows[1].error
            == f"{path} line 2: invalid JSON (Expecting property name enclosed in double quotes at column 9)"
        )
        assert rows[2].error == f"{path} line 3: not a JSON object (got list)"
        assert rows[3].error == f"{path} line 4: not valid UTF-8 (byte 0xff at offset 7)"
        assert rows[4].error == f"{path} line 5: not a JSON object (got str)"

    def test_empty_shard(self, tmp_path):
        (tmp_path / "empty.jsonl").write_bytes(b"")
        (tmp_path / "blank.jsonl").write_bytes(b"\n\n")
        for name in ["empty.jsonl", "blank.jsonl"]:
            shard = _one(tmp_path / name)
            assert _rows(shard) == []
            assert count_rows(shard, {}) == 0

    def test_byte_order_mark_and_crlf(self, tmp_path):
        path = tmp_path / "bom.jsonl"
        path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n')
        assert [r.values for r in _rows(_one(path))] == [{"a": 1}, {"a": 2}]

    @pytest.mark.parametrize("suffix", [".gz", ".zst"])
    def test_compressed(self, tmp_path, suffix):
        data = "".join(json.dumps({"i": i, "t": "é"}) + "\n" for i in range(50)).encode()
        packed = gzip.compress(data) if suffix == ".gz" else zstandard.ZstdCompressor().compress(data)
        path = tmp_path / f"c.jsonl{suffix}"
        path.write_bytes(packed)
        shard = _one(path)
        assert [r.values for r in _rows(shard)] == [{"i": i, "t": "é"} for i in range(50)]
        assert count_rows(shard, {}) == 50

    def test_truncated_gzip_raises_after_yielding_the_good_rows(self, tmp_path):
        data = "".join(json.dumps({"i": i, "pad": "x" * 50}) + "\n" for i in range(2000)).encode()
        path = tmp_path / "t.jsonl.gz"
        packed = gzip.compress(data)
        path.write_bytes(packed[: len(packed) // 2])
        got = []
        with pytest.raises(InputError, match=rf"{path}: unreadable after \d+ rows"):
            for batch in read_shard(_one(path), {}, batch_rows=100000):
                got.extend(batch)
        assert got and [r.row for r in got] == list(range(len(got)))

    def test_columns(self, tmp_path):
        shard = _one(_jsonl(tmp_path / "a.jsonl", [{"a": 1, "b": 2}, {"b": 3}]))
        assert [r.values for r in _rows(shard, columns=["a"])] == [{"a": 1}, {}]


class TestParquet:
    def _write(self, path, n, row_group_size):
        pq.write_table(
            pa.table({"i": list(range(n)), "s": [f"s{i}" for i in range(n)]}),
            path,
            row_group_size=row_group_size,
        )
        return _one(path)

    def test_read_group_by_group(self, tmp_path):
        shard = self._write(tmp_path / "p.parquet", 10, row_group_size=4)
        assert pq.ParquetFile(tmp_path / "p.parquet").num_row_groups == 3
        batches = list(read_shard(shard, {}, batch_rows=1024))
        assert [[r.row for r in b] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert batches[2][1].values == {"i": 9, "s": "s9"}
        assert count_rows(shard, {}) == 10

    def test_batches_within_a_group_and_skip(self, tmp_path):
        shard = self._write(tmp_path / "p.parquet", 10, row_group_size=4)
        batches = list(read_shard(shard, {}, batch_rows=3, skip={0, 1, 2, 3, 5}, columns=["i"]))
        assert [[r.row for r in b] for b in batches] == [[4, 6, 7], [8, 9]]
        assert batches[0][0].values == {"i": 4}

    def test_skipped_groups_are_not_read(self, tmp_path, monkeypatch):
        shard = self._write(tmp_path / "p.parquet", 10, row_group_size=4)
        read = []
        original = pq.ParquetFile.iter_batches
        monkeypatch.setattr(
            pq.ParquetFile,
            "iter_batches",
            lambda self, row_groups, **kw: (
                read.extend(row_groups) or original(self, row_groups=row_groups, **kw)
            ),
        )
        assert [r.row for r in _rows(shard, skip=set(range(8)))] == [8, 9]
        assert read == [2]

    def test_zero_rows(self, tmp_path):
        path = tmp_path / "z.parquet"
        pq.write_table(pa.table({"i": pa.array([], pa.int64())}), path)
        assert _rows(_one(path)) == []
        assert count_rows(_one(path), {}) == 0

    def test_corrupt_footer_names_the_file(self, tmp_path):
        path = tmp_path / "bad.parquet"
        self._write(path, 10, row_group_size=4)
        path.write_bytes(path.read_bytes()[:-12])
        shard = Shard(id="bad.parquet", url=str(path), format="parquet", compression=None)
        with pytest.raises(InputError, match=rf"{path}: not a readable Parquet file"):
            _rows(shard)
        with pytest.raises(InputError, match=rf"{path}: not a readable Parquet file"):
            count_rows(shard, {})

    def test_missing_column(self, tmp_path):
        shard = self._write(tmp_path / "p.parquet", 3, row_group_size=4)
        with pytest.raises(InputError, match=r"p\.parquet: no column 'text' \(columns: i, s\)"):
            _rows(shard, columns=["text"])

    def test_damaged_row_group_names_it_after_yielding_the_good_ones(self, tmp_path):
        path = tmp_path / "d.parquet"
        table = pa.table({"s": [f"value-{i}" * 20 for i in range(30)]})
        pq.write_table(table, path, row_group_size=10, use_dictionary=False)
        chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
        data = bytearray(path.read_bytes())
        data[chunk.data_page_offset : chunk.data_page_offset + chunk.total_compressed_size] = (
            b"\xff" * chunk.total_compressed_size
        )
        path.write_bytes(bytes(data))
        got = []
        with pytest.raises(InputError, match=rf"{path}: row group 1 \(rows 10\.\.19\) is unreadable"):
            for batch in read_shard(_one(path), {}):
                got.extend(batch)
        assert [r.row for r in got] == list(range(10))
