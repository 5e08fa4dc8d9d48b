import json
import os
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


def _lease_of_another_host(tmp_path, age_s: float):
    """Task 0 of 1's lease file, held by pid 1 on another host whose last heartbeat was `age_s` ago:
    (the file system, the lease path, the holder's record)."""
    fs = fsspec.filesystem("file")
    path = tmp_path / "_batchrun/leases/task-0-of-1.json"
    path.parent.mkdir(parents=True)
    holder = {
        "host": socket.gethostname() + "-elsewhere",
        "pid": 1,
        "token": "t",
        "heartbeat": time.time() - age_s,
    }
    path.write_text(json.dumps(holder))
    return fs, path, holder


def test_a_lease_of_another_host_is_taken_over_only_after_its_ttl(tmp_path):
    fs, path, holder = _lease_of_another_host(tmp_path, age_s=5)
    with pytest.raises(LeaseHeld, match=r"heartbeat 5 s ago\).*expires 5 s after its last heartbeat"):
        TaskLease(fs, str(tmp_path), 0, 1, ttl_s=10).__enter__()
    path.write_text(json.dumps({**holder, "heartbeat": time.time() - 11}))
    with TaskLease(fs, str(tmp_path), 0, 1, ttl_s=10) as lease:
        assert json.loads(path.read_text())["token"] == lease.me.token


def test_waiting_for_expiry_takes_over_a_dead_hosts_fresh_lease_and_refuses_a_live_one(tmp_path):
    """A Ray task run again on another node right after its node died finds the dead holder's lease
    fresh: it waits until the lease expires, then takes it; a holder that keeps beating is refused."""
    fs, path, holder = _lease_of_another_host(tmp_path, age_s=1)
    started = time.monotonic()
    with TaskLease(fs, str(tmp_path), 0, 1, ttl_s=2, wait_for_expiry=True) as lease:
        assert 0.9 < time.monotonic() - started < 2.5
        assert json.loads(path.read_text())["token"] == lease.me.token
    path.write_text(json.dumps({**holder, "heartbeat": time.time() + 60}))  # fresh whenever it is read
    started = time.monotonic()
    with pytest.raises(LeaseHeld, match="another job is writing this output: pid 1 on "):
        TaskLease(fs, str(tmp_path), 0, 1, ttl_s=1, wait_for_expiry=True).__enter__()
    assert 0.9 < time.monotonic() - started < 2.5
    path.write_text(
        json.dumps({**holder, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()})
    )
    started = time.monotonic()  # a live holder on this host: refused at once, nothing to wait for
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()} on "):
        TaskLease(fs, str(tmp_path), 0, 1, ttl_s=1, wait_for_expiry=True).__enter__()
    assert time.monotonic() - started < 0.5


def test_regression_a_heartbeat_killed_mid_write_leaves_its_temp_file_forever(tmp_path):
    """Found by scripts/torture.py: a SIGKILL inside a heartbeat's atomic rewrite of the lease left
    `_batchrun/leases/.tmp-task-0-of-1.json-<hex>` in the output for good."""
    fs = fsspec.filesystem("file")
    leases = tmp_path / "_batchrun/leases"
    leases.mkdir(parents=True)
    (leases / ".tmp-task-0-of-1.json-00aa").write_text('{"host": "h", "pi')
    (leases / ".tmp-task-1-of-2.json-00bb").write_text("{}")  # another task's: not ours to remove
    with TaskLease(fs, str(tmp_path), 0, 1):
        assert sorted(p.name for p in leases.iterdir()) == [".tmp-task-1-of-2.json-00bb", "task-0-of-1.json"]


def test_regression_heartbeat_thread_dies_with_a_traceback_on_a_storage_error(tmp_path, monkeypatch, caplog):
    """Found by the catalogue's disk-full case: a heartbeat that hit ENOSPC killed its thread with an
    unhandled exception (a traceback, and no word on what it means for the job)."""
    import errno
    import threading

    import jobs.lease

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    monkeypatch.setattr(jobs.lease, "write_bytes_atomic", full)
    fs = fsspec.filesystem("file")
    with TaskLease(fs, str(tmp_path), 0, 1, ttl_s=0.03) as lease:
        time.sleep(0.1)
    assert crashes == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"renewing the lease {lease.path} failed: OSError: No space left on device — the disk is full: free "
        "some space, or point output.path at a larger disk; no more heartbeats: another job may take this "
        "task over in 0 s"
    ]


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
