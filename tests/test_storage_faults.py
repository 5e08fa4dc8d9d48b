"""Storage faults during a real job (tests/faults_fs.py): transient ones are retried and logged,
permanent ones stop the job with a clear message, and nothing committed is lost."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import runner.io.retry
from jobs.spec.job import load_spec
from jobs.worker import run_worker
from runner.io.retry import Backoff, StorageError
from tests import faults_fs
from tests.conftest import read_output, write_inputs, write_spec
from tests.faults_fs import Fault


@pytest.fixture
def faulty(tmp_path: Path, tiny_model_dir: Path, monkeypatch):
    """(spec over a faulty output, the uninterrupted reference output) with fast backoff."""
    monkeypatch.setattr(runner.io.retry, "BACKOFF", Backoff(attempts=4, first_s=0.001, max_s=0.01))
    write_inputs(tmp_path / "in", parquet=1, jsonl=1, rows=7)
    ref = write_spec(tmp_path / "ref.yaml", tiny_model_dir, output={"flush_rows": 3, "path": "ref"})
    run_worker(load_spec(ref), show_progress=False)
    spec = write_spec(
        tmp_path / "spec.yaml", tiny_model_dir, output={"flush_rows": 3, "path": f"faulty://{tmp_path}/out"}
    )
    yield load_spec(spec), read_output(tmp_path / "ref")
    faults_fs.FAULTS.clear()


def _reset() -> ConnectionResetError:
    return ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


@pytest.mark.parametrize(
    "fault",
    [
        Fault("write", _reset, path=".parts/part-", times=2),
        Fault("close", lambda: TimeoutError("write timed out"), path=".parts/part-", times=1),
        Fault("open", lambda: OSError("503 SlowDown: please reduce your request rate"), path="a0.parquet"),
        Fault("ls", _reset, path=".parts", times=2),
        Fault("rm", lambda: TimeoutError("timed out"), path=".parts", times=1),
    ],
    ids=["write", "close", "open", "list", "rm"],
)
def test_transient_faults_are_retried_logged_and_the_output_is_exact(faulty, tmp_path, caplog, fault):
    spec, reference = faulty
    faults_fs.FAULTS.append(fault)
    summary = run_worker(spec, show_progress=False)
    assert fault.hits, "the fault never struck"
    assert summary.status == "finished"
    assert read_output(tmp_path / "out") == reference
    assert not list((tmp_path / "out").rglob("*.parts"))
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retried) == len(fault.hits)
    assert "(attempt 2 of 4)" in retried[0] and fault.hits[0] in retried[0]


def test_a_permanent_fault_stops_the_job_clearly_and_loses_nothing_committed(faulty, tmp_path):
    spec, reference = faulty
    no_space = lambda: OSError(errno.ENOSPC, "No space left on device")
    full = Fault("write", no_space, path="a0.parts/part-000001-", times=None)  # a0's second part
    faults_fs.FAULTS.append(full)
    with pytest.raises(StorageError) as e:
        run_worker(spec, show_progress=False)
    assert str(e.value) == (
        f"writing part faulty://{full.hits[0]} failed: OSError: No space left on device — the disk is "
        "full: free some space, or point output.path at a larger disk"
    )
    committed = sorted(p.name for p in (tmp_path / "out/a0.parts").glob("part-*.parquet"))
    assert [p[:12] for p in committed] == ["part-000000-"]  # committed before the disk filled up: kept
    faults_fs.FAULTS.clear()
    summary = run_worker(spec, show_progress=False)
    assert summary.status == "finished" and summary.rows_ok < 15
    assert read_output(tmp_path / "out") == reference


def test_a_transient_fault_that_never_ends_gives_up_with_a_clear_message(faulty, tmp_path):
    spec, _ = faulty
    down = Fault("write", _reset, path=".parts/part-", times=None)
    faults_fs.FAULTS.append(down)
    with pytest.raises(
        StorageError,
        match=r"still failed after 4 attempts: ConnectionResetError: Connection "
        r"reset by peer — the storage seems unavailable; run the job again later",
    ):
        run_worker(spec, show_progress=False)
    assert len(set(down.hits)) == 1 and len(down.hits) >= 4
