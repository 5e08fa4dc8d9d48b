"""Sweep the unfinished multipart uploads that killed writers left in the output.

On S3 a part is committed by completing its multipart upload; a writer killed before that leaves
the upload open: invisible, never a commit, but its uploaded parts are stored (and billed) until
someone aborts it. A task aborts, on start and while it holds its lease, the open uploads to the
objects only it writes: its shards' parts, final files and error files, and its report. With a
single task nothing else writes to the output, so every upload under the output is swept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from runner.store.checkpoint import OutputStore
from runner.store.state import STATE_DIR

log = logging.getLogger(__name__)


def sweep_stale_uploads(store: OutputStore, shard_ids: list[str], task_index: int, num_tasks: int) -> int:
    """Abort the open multipart uploads to this task's objects in `store`; returns how many.

    Call it only while holding the task's lease (a live writer of this task would lose its upload).
    A no-op on filesystems without multipart uploads (local disk) or without an S3 API.
    """
    fs = store.fs
    if not hasattr(fs, "call_s3"):
        return 0
    if num_tasks == 1:
        owned = [store.root + "/"]
    else:
        owned = [p for shard_id in shard_ids for p in store.shard_paths(shard_id)]
        owned.append(f"{store.root}/{STATE_DIR}/report-task{task_index}.json")
    bucket, root_key, _ = fs.split_path(store.root)
    swept = 0
    for upload in _open_uploads(fs, bucket, root_key.rstrip("/") + "/"):
        path = f"{bucket}/{upload['Key']}"
        if any(path.startswith(p) if p.endswith("/") else path == p for p in owned):
            log.warning(
                "aborting the unfinished upload of s3://%s (started %s by a writer that was stopped)",
                path,
                upload.get("Initiated"),
            )
            fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
            swept += 1
    return swept


def _open_uploads(fs, bucket: str, prefix: str) -> Iterator[dict]:
    kwargs = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_multipart_uploads", **kwargs)
        yield from page.get("Uploads", [])
        if not page.get("IsTruncated"):
            return
        kwargs |= {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
