import fsspec

from runner.store import OutputStore
from runner.store.uploads import sweep_stale_uploads


def test_a_task_aborts_only_the_uploads_to_its_own_objects(s3):
    fs, bucket, options = s3
    store = OutputStore(f"s3://{bucket}/out", options, "parquet", None)
    mine = [
        "out/sub/a.parts/part-000003-x.parquet",
        "out/sub/a.parquet",
        "out/_batchrun/errors/sub/a.jsonl",
        "out/_batchrun/report-task0.json",
    ]
    others = [
        "out/b.parts/part-000000-y.parquet",  # another task's shard
        "out/sub/ab.parquet",
        "out/_batchrun/run.json",  # shared by all tasks
        "elsewhere/sub/a.parquet",  # not this output
    ]
    for key in mine + others:
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)

    def open_keys():
        return sorted(
            u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
        )

    assert sweep_stale_uploads(store, ["sub/a.jsonl"], 0, 2) == 4
    assert open_keys() == sorted(others)
    # a single task is the output's only writer: everything under the output goes
    assert sweep_stale_uploads(store, ["sub/a.jsonl"], 0, 1) == 3
    assert open_keys() == ["elsewhere/sub/a.parquet"]


def test_no_uploads_to_sweep_on_the_local_disk(tmp_path):
    store = OutputStore(str(tmp_path), {}, "parquet", None)
    assert isinstance(store.fs, fsspec.implementations.local.LocalFileSystem)
    assert sweep_stale_uploads(store, ["a.jsonl"], 0, 1) == 0
