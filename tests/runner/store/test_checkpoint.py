import gzip
import json
import os

import pyarrow.parquet as pq
import pytest

from runner.store import CheckpointError, FingerprintMismatch, OutputStore
from runner.store.atomic import write_atomic

FP = {"model": {"path": "m", "revision": "abc"}, "sampling": {"temperature": 0.0, "stop": ["x"]}, "seed": 0}


def out_rows(shard, rows, text="t", finish="stop", **extra):
    return [
        {
            "_shard": shard,
            "_row": r,
            "generated_text": f"{text}{r}",
            "finish_reason": finish,
            "prompt_tokens": 3,
            "generated_tokens": 2,
            "error": "prompt too long" if finish == "error" else None,
            **extra,
        }
        for r in rows
    ]


def parts_of(out, stem):
    d = out / f"{stem}.parts"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


@pytest.fixture
def store(out):
    return OutputStore(str(out), {}, "parquet", None)


class TestFingerprint:
    def test_first_run_records_then_same_run_resumes(self, store, out):
        store.check_fingerprint(FP)
        assert json.loads((out / "_batchrun/run.json").read_text()) == FP
        OutputStore(str(out), {}, "parquet", None).check_fingerprint(
            {**FP, "sampling": {"stop": ("x",), "temperature": 0.0}}
        )

    def test_a_different_run_is_refused_naming_each_field(self, store):
        store.check_fingerprint(FP)
        changed = {
            "model": {"path": "m", "revision": "def"},
            "sampling": {"temperature": 0.7, "stop": ["x"]},
            "top": 1,
        }
        with pytest.raises(FingerprintMismatch) as e:
            store.check_fingerprint(changed)
        assert str(e.value) == (
            f"output {store.url} holds the progress of a different run:\n"
            '  model.revision: "abc" -> "def"\n'
            "  sampling.temperature: 0.0 -> 0.7\n"
            "  seed: 0 -> <absent>\n"
            "  top: <absent> -> 1\n"
            "Use a new output path, or pass --force-new-run to discard this output's progress."
        )

    def test_force_new_run_discards_only_progress(self, store, out):
        store.check_fingerprint(FP)
        store.commit_part("a.jsonl", out_rows("a.jsonl", [0, 1]))
        store.commit_part("sub/b.jsonl", out_rows("sub/b.jsonl", [0], finish="error"))
        store.compact("sub/b.jsonl", 1)
        (out / "_batchrun/quarantine/a").mkdir(parents=True)
        (out / "_batchrun/quarantine/a/part-000009-x.parquet").write_bytes(b"torn")
        (out / "notes.txt").write_text("mine")
        new = {**FP, "seed": 1}
        OutputStore(str(out), {}, "parquet", None).check_fingerprint(new, force_new_run=True)
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        assert left == ["_batchrun/quarantine/a/part-000009-x.parquet", "_batchrun/run.json", "notes.txt"]
        assert json.loads((out / "_batchrun/run.json").read_text()) == new

    def test_state_json(self, store):
        assert store.read_json("report.json") is None
        store.write_json("report.json", {"rows": 3})
        assert store.read_json("report.json") == {"rows": 3}


class TestCommitAndScan:
    def test_parts_are_numbered_and_scanned(self, store, out):
        assert store.scan("a.jsonl").rows == set()
        store.commit_part("a.jsonl", out_rows("a.jsonl", [0, 2]))
        store.commit_part("a.jsonl", out_rows("a.jsonl", [1], finish="error"))
        names = parts_of(out, "a")
        assert [n.split("-")[1] for n in names] == ["000000", "000001"]
        progress = store.scan("a.jsonl")
        assert (progress.done, progress.rows, progress.parts, progress.error_rows) == (False, {0, 1, 2}, 2, 1)
        # a later attempt continues the numbering with its own attempt token
        later = OutputStore(str(out), {}, "parquet", None)
        later.commit_part("a.jsonl", out_rows("a.jsonl", [3]))
        names = parts_of(out, "a")
        assert names[2].startswith("part-000002-") and names[2].split("-")[2] != names[0].split("-")[2]

    def test_torn_part_is_quarantined_not_trusted_not_deleted(self, store, out):
        store.commit_part("a.jsonl", out_rows("a.jsonl", [0, 1]))
        store.commit_part("a.jsonl", out_rows("a.jsonl", [2, 3]))
        torn_name = parts_of(out, "a")[1]
        torn = out / "a.parts" / torn_name
        data = torn.read_bytes()[:-30]
        torn.write_bytes(data)
        progress = store.scan("a.jsonl")
        assert (progress.rows, progress.parts) == ({0, 1}, 1)
        assert parts_of(out, "a") == [parts_of(out, "a")[0]] and torn_name not in parts_of(out, "a")
        assert (out / "_batchrun/quarantine/a" / torn_name).read_bytes() == data

    def test_read_only_scan_changes_nothing(self, store, out):
        store.commit_part("a.jsonl", out_rows("a.jsonl", [0, 1]))
        store.commit_part("a.jsonl", out_rows("a.jsonl", [2], finish="error"))
        torn = out / "a.parts" / parts_of(out, "a")[0]
        torn.write_bytes(torn.read_bytes()[:-30])
        (out / "a.parts/.tmp-part-000009-x.parquet-1").write_bytes(b"half")
        before = parts_of(out, "a")
        progress = store.scan("a.jsonl", repair=False)
        assert (progress.rows, progress.parts, progress.error_rows) == ({2}, 1, 1)
        assert parts_of(out, "a") == before and not (out / "_batchrun").exists()

    def test_leftover_temp_files_are_removed(self, store, out):
        store.commit_part("a.jsonl", out_rows("a.jsonl", [0]))
        (out / "a.parts/.tmp-part-000001-abc.parquet-1234").write_bytes(b"half")
        assert store.scan("a.jsonl").rows == {0}
        assert len(parts_of(out, "a")) == 1


class TestCompact:
    def test_input_order_dedup_samples_and_error_rows(self, store, out):
        shard = "sub/a.jsonl"
        store.commit_part(
            shard, out_rows(shard, [2], "first", _sample=1) + out_rows(shard, [2], "first", _sample=0)
        )
        store.commit_part(
            shard, out_rows(shard, [0], _sample=0) + out_rows(shard, [1], finish="error", _sample=0)
        )
        store.commit_part(shard, out_rows(shard, [2], "second", _sample=0))  # a duplicate from a retry
        store.compact(shard, 3)
        table = pq.read_table(out / "sub/a.parquet")
        got = [(r["_row"], r["_sample"], r["generated_text"]) for r in table.to_pylist()]
        assert got == [(0, 0, "t0"), (1, 0, "t1"), (2, 0, "first2"), (2, 1, "first2")]
        assert not (out / "sub/a.parts").exists()
        [error] = [
            json.loads(line) for line in (out / "_batchrun/errors/sub/a.jsonl").read_text().splitlines()
        ]
        assert (error["_row"], error["error"], error["finish_reason"]) == (1, "prompt too long", "error")
        assert store.scan(shard).done
        assert (store.error_count(shard), store.error_count("other.jsonl")) == (1, 0)

    def test_duplicates_without_samples_keep_the_first_part(self, store, out):
        store.commit_part("a.jsonl", out_rows("a.jsonl", [1, 0], "old"))
        store.commit_part("a.jsonl", out_rows("a.jsonl", [2, 1], "new"))
        store.compact("a.jsonl", 3)
        table = pq.read_table(out / "a.parquet")
        assert table.column("generated_text").to_pylist() == ["old0", "old1", "new2"]

    def test_jsonl_gzip_output_restores_mixed_values(self, out):
        store = OutputStore(str(out), {}, "jsonl", "gzip")
        store.commit_part("a.jsonl", out_rows("a.jsonl", [1], v=1))
        store.commit_part("a.jsonl", out_rows("a.jsonl", [0], v="x") + out_rows("a.jsonl", [2], v=[1]))
        store.compact("a.jsonl", 3)
        lines = gzip.decompress((out / "a.jsonl.gz").read_bytes()).decode().splitlines()
        assert [(json.loads(x)["_row"], json.loads(x)["v"]) for x in lines] == [(0, "x"), (1, 1), (2, [1])]

    def test_missing_rows_refuse_to_compact(self, store, out):
        store.commit_part("a.jsonl", out_rows("a.jsonl", [0, 2, 5]))
        with pytest.raises(
            CheckpointError, match=r"its parts hold 2 of 4 rows \(missing \[1, 3\]; unexpected \[5\]\)"
        ):
            store.compact("a.jsonl", 4)
        assert not (out / "a.parquet").exists() and len(parts_of(out, "a")) == 1

    def test_torn_part_found_by_compaction(self, store, out):
        store.commit_part("a.jsonl", out_rows("a.jsonl", [0]))
        store.commit_part("a.jsonl", out_rows("a.jsonl", [1]))
        torn = out / "a.parts" / parts_of(out, "a")[1]
        torn.write_bytes(torn.read_bytes()[:10])
        with pytest.raises(CheckpointError, match=r"missing \[1\]"):
            store.compact("a.jsonl", 2)
        assert (out / "_batchrun/quarantine/a" / torn.name).exists()
        assert store.scan("a.jsonl").rows == {0}  # the rerun regenerates row 1 only
        store.commit_part("a.jsonl", out_rows("a.jsonl", [1]))
        store.compact("a.jsonl", 2)
        assert pq.read_table(out / "a.parquet").column("_row").to_pylist() == [0, 1]

    def test_empty_shard(self, store, out):
        assert store.scan("e.parquet").rows == set()
        store.compact("e.parquet", 0)
        assert pq.read_table(out / "e.parquet").num_rows == 0
        assert store.scan("e.parquet").done

    def test_killed_during_cleanup_scan_finishes_it(self, store, out, monkeypatch):
        store.commit_part("a.jsonl", out_rows("a.jsonl", [0, 1]))
        monkeypatch.setattr(OutputStore, "_remove_parts", lambda self, shard: None)  # killed before cleanup
        store.compact("a.jsonl", 2)
        monkeypatch.undo()
        assert (out / "a.parquet").exists() and parts_of(out, "a")
        progress = OutputStore(str(out), {}, "parquet", None).scan("a.jsonl")
        assert progress.done and not (out / "a.parts").exists()
        assert pq.read_table(out / "a.parquet").column("_row").to_pylist() == [0, 1]

    def test_killed_before_the_final_file_rerun_compacts(self, store, out, monkeypatch):
        store.commit_part("a.jsonl", out_rows("a.jsonl", [0, 1], finish="error"))

        def killed(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr(
            "runner.store.checkpoint.write_tables_atomic",
            lambda fs, path, *a: path.endswith(".jsonl") or killed(),
        )
        with pytest.raises(KeyboardInterrupt):
            store.compact("a.jsonl", 2)
        monkeypatch.undo()
        assert not (out / "a.parquet").exists()
        assert store.scan("a.jsonl").rows == {0, 1}
        store.compact("a.jsonl", 2)
        assert pq.read_table(out / "a.parquet").column("_row").to_pylist() == [0, 1]
        assert len((out / "_batchrun/errors/a.jsonl").read_text().splitlines()) == 2


class TestS3:
    """The same flow on a real S3 API (moto over HTTP): a part is never visible half-written."""

    def test_commit_scan_compact(self, s3):
        fs, bucket, options = s3
        store = OutputStore(f"s3://{bucket}/out", options, "jsonl", None)
        store.check_fingerprint(FP)
        with pytest.raises(FingerprintMismatch, match="seed: 0 -> 1"):
            OutputStore(f"s3://{bucket}/out", options, "jsonl", None).check_fingerprint({**FP, "seed": 1})
        store.commit_part("sub/a.jsonl", out_rows("sub/a.jsonl", [1, 2]))
        store.commit_part("sub/a.jsonl", out_rows("sub/a.jsonl", [0], finish="error"))
        fresh = OutputStore(f"s3://{bucket}/out", options, "jsonl", None)
        progress = fresh.scan("sub/a.jsonl")
        assert (progress.rows, progress.parts, progress.error_rows) == ({0, 1, 2}, 2, 1)
        fresh.compact("sub/a.jsonl", 3)
        lines = fs.cat(f"{bucket}/out/sub/a.jsonl").decode().splitlines()
        assert [json.loads(x)["_row"] for x in lines] == [0, 1, 2]
        assert fs.find(f"{bucket}/out/sub") == [f"{bucket}/out/sub/a.jsonl"]
        assert fs.exists(f"{bucket}/out/_batchrun/errors/sub/a.jsonl")
        assert fresh.scan("sub/a.jsonl").done
        fresh.compact("empty.jsonl", 0)  # an empty shard: a zero-byte object, committed
        assert fs.cat(f"{bucket}/out/empty.jsonl") == b"" and fresh.scan("empty.jsonl").done

    def test_a_failed_write_leaves_nothing_visible(self, s3, monkeypatch):
        fs, bucket, options = s3
        store = OutputStore(f"s3://{bucket}/out", options, "parquet", None)

        def fail_after_uploading_parts(f):
            f.write(os.urandom(11 * 2**20))  # two multipart chunks are uploaded before the failure
            raise RuntimeError("preempted")

        with pytest.raises(RuntimeError, match="preempted"):
            write_atomic(store.fs, f"{bucket}/out/a.parts/part-000000-x.parquet", fail_after_uploading_parts)

        def broken_writer(schema, tables, f):
            f.write(b"PAR1 half a parquet file")
            raise OSError("connection reset")

        monkeypatch.setattr("runner.store.tables._write_parquet", broken_writer)
        with pytest.raises(OSError, match="connection reset"):
            store.commit_part("a.jsonl", out_rows("a.jsonl", [0]))
        monkeypatch.undo()
        assert fs.find(bucket) == []
        assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
        assert store.scan("a.jsonl").rows == set()

    def test_torn_part_is_quarantined(self, s3):
        fs, bucket, options = s3
        store = OutputStore(f"s3://{bucket}/out", options, "parquet", None)
        good = store.commit_part("a.jsonl", out_rows("a.jsonl", [0]))
        fs.pipe(f"{bucket}/out/a.parts/part-000001-zz.parquet", fs.cat(good)[:-20])
        assert store.scan("a.jsonl").rows == {0}
        assert fs.exists(f"{bucket}/out/_batchrun/quarantine/a/part-000001-zz.parquet")
        assert fs.ls(f"{bucket}/out/a.parts", detail=False) == [good]


def test_regression_temp_files_of_writers_killed_outside_parts_are_left_forever(store, out):
    """Found by scripts/torture.py: a SIGKILL inside the write of report.json, run.json, a final file
    or an errors file left its `.tmp-` sibling in the output for good (only parts' temps were removed)."""
    store.check_fingerprint(FP)
    (out / "sub").mkdir()
    (out / "_batchrun/errors/sub").mkdir(parents=True)
    stale = [
        out / "_batchrun/.tmp-run.json-00aa",
        out / "_batchrun/.tmp-report.json-00bb",
        out / "sub/.tmp-a.parquet-00cc",
        out / "_batchrun/errors/sub/.tmp-a.jsonl-00dd",
    ]
    others = [out / "sub/.tmp-b.parquet-00ee", out / "_batchrun/.tmp-report-task1.json-00ff"]
    for path in stale + others:
        path.write_bytes(b"PAR1 torn")
    store.scan("sub/a.jsonl", repair=False)  # `batchrun status` changes nothing
    assert all(p.exists() for p in stale)
    store.scan("sub/a.jsonl")
    store.check_fingerprint(FP)
    store.write_json("report.json", {"rows": 1})
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in others)  # another shard's, another task's: not ours to remove
