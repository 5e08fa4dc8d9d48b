import json
import socket
import time

import fsspec
import pytest

from jobs.lease import LeaseHeld, TaskLease


def test_lease_is_exclusive_and_released(tmp_path):
    fs = fsspec.filesystem("file")
    with TaskLease(fs, str(tmp_path), 1, 3) as lease:
        assert json.loads(fs.cat(lease.path))["token"] == lease.me.token
        with pytest.raises(LeaseHeld, match=r"another job is writing this output: pid \d+ on "):
            TaskLease(fs, str(tmp_path), 1, 3).__enter__()
        with TaskLease(fs, str(tmp_path), 0, 3):  # other tasks are independent
            pass
    assert not (tmp_path / "_batchrun/leases/task-1-of-3.json").exists()


def test_a_lease_of_another_host_is_taken_over_only_after_its_ttl(tmp_path):
    fs = fsspec.filesystem("file")
    path = tmp_path / "_batchrun/leases/task-0-of-1.json"
    path.parent.mkdir(parents=True)
    holder = {
        "host": socket.gethostname() + "-elsewhere",
        "pid": 1,
        "token": "t",
        "heartbeat": time.time() - 5,
    }
    path.write_text(json.dumps(holder))
    with pytest.raises(LeaseHeld, match=r"heartbeat 5 s ago\).*expires 5 s after its last heartbeat"):
        TaskLease(fs, str(tmp_path), 0, 1, ttl_s=10).__enter__()
    path.write_text(json.dumps({**holder, "heartbeat": time.time() - 11}))
    with TaskLease(fs, str(tmp_path), 0, 1, ttl_s=10) as lease:
        assert json.loads(path.read_text())["token"] == lease.me.token


def test_the_lease_is_exclusive_on_s3(s3):
    """moto (as S3) enforces If-None-Match on exclusive create, which the lease is built on."""
    fs, bucket, _ = s3
    with fs.open(f"{bucket}/x", "xb") as f:
        f.write(b"first")
    with pytest.raises(FileExistsError), fs.open(f"{bucket}/x", "xb") as f:
        f.write(b"second")
    assert fs.cat(f"{bucket}/x") == b"first"

    root = f"{bucket}/out"
    with TaskLease(fs, root, 0, 2) as lease:
        assert json.loads(fs.cat(lease.path))["token"] == lease.me.token
        with pytest.raises(LeaseHeld, match=rf"pid \d+ on .* holds {root}/_batchrun/leases/task-0-of-2.json"):
            TaskLease(fs, root, 0, 2).__enter__()
        with TaskLease(fs, root, 1, 2):  # other tasks are independent
            pass
    assert not fs.exists(lease.path)

    stale = {
        "host": socket.gethostname() + "-elsewhere",
        "pid": 1,
        "token": "t",
        "heartbeat": time.time() - 11,
    }
    fs.pipe(lease.path, json.dumps(stale).encode())
    with TaskLease(fs, root, 0, 2, ttl_s=10) as lease:
        assert json.loads(fs.cat(lease.path))["token"] == lease.me.token
