"""The job as a real subprocess, killed with SIGKILL at many moments and resumed; SIGTERM drains.

Kill moments that timing alone can't hit reliably (inside a part write, between compaction steps)
use the test-only kill points of runner/faults.py: the process SIGKILLs itself there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.spec.job import load_spec
from jobs.worker import run_worker
from tests.conftest import committed_rows, read_output, write_inputs, write_spec

REPO = Path(__file__).resolve().parents[1]


def batchrun(*args: str, kill_at: str | None = None, wait: bool = True, cwd: Path | None = None):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
    }
    env.pop("BATCHRUN_KILL_AT", None)
    if kill_at:
        env["BATCHRUN_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "jobs.cli", *args]
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `path` exists, failing if `proc` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def _visible_count(out: Path) -> int:
    """Committed rows, while a job runs beside us (a part may vanish into compaction mid-listing)."""
    while True:
        try:
            return sum(len(v) for v in committed_rows(out).values())
        except FileNotFoundError:
            continue


def status_json(spec: Path) -> dict:
    code, out, err = batchrun("status", str(spec), "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def job(tmp_path: Path, tiny_model_dir: Path):
    write_inputs(tmp_path / "in", parquet=2, jsonl=2, rows=7)
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, output={"flush_rows": 3})
    reference_spec = write_spec(
        tmp_path / "ref.yaml", tiny_model_dir, output={"flush_rows": 3, "path": "ref"}
    )
    run_worker(load_spec(reference_spec), show_progress=False)
    return spec, read_output(tmp_path / "ref")


KILLS = [
    "fingerprint_written",  # run.json just written, nothing generated yet
    "row_finished:2",  # rows generated, none flushed yet
    "before_publish:2",  # inside a part write: the temp file is complete, not yet visible
    "part_committed:3",  # mid-shard, right after a commit
    "compaction_started:1",  # a shard's rows all committed, its final file not yet written
    "compaction_final_written:1",  # final file written, parts not yet removed
]


def test_sigkill_at_many_moments_then_resume_gives_the_exact_output(job, tmp_path: Path):
    spec, reference = job
    out = tmp_path / "out"
    for kill_at in KILLS:
        code, _, err = batchrun("submit", str(spec), "--no-progress", kill_at=kill_at)
        assert code == -signal.SIGKILL, (kill_at, err[-2000:])
        committed = committed_rows(out)
        for stem, rows in committed.items():
            assert len(rows) == len(set(rows)), f"duplicate committed rows in {stem} after {kill_at}"
        status = {s["shard"].split(".")[0]: s for s in status_json(spec)["shards"]}
        for stem, s in status.items():
            assert s["rows_committed"] == len(committed.get(stem, [])), (kill_at, stem, s)

    # one more kill from outside, at a moment chosen by time: once a new part became visible
    before = _visible_count(out)
    proc = batchrun("submit", str(spec), "--no-progress", wait=False)
    deadline = time.monotonic() + 120
    while _visible_count(out) == before and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.communicate()

    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    final = read_output(out)
    assert final == reference  # same rows, same order, identical greedy tokens and text
    assert not list(out.rglob("*.parts")) and not list(out.rglob(".tmp-*"))
    status = status_json(spec)
    assert [s["state"] for s in status["shards"]] == ["done"] * 4

    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0 and "nothing to do" in err


def test_sigterm_drains_commits_finished_rows_and_exits_for_requeue(tmp_path: Path, tiny_model_dir: Path):
    write_inputs(tmp_path / "in", parquet=2, jsonl=0, rows=60)
    spec = write_spec(
        tmp_path / "spec.yaml",
        tiny_model_dir,
        sampling={"max_new_tokens": 150, "ignore_eos": True},  # ~20 s of work: the signal lands mid-job
        output={"flush_rows": 100000, "flush_seconds": 3600},  # nothing is committed before the signal
        engine={"max_seqs": 1},
        runtime={"grace_seconds": 20},
    )
    proc = batchrun("submit", str(spec), "--no-progress", wait=False)
    wait_for_file(tmp_path / "out/_batchrun/run.json", proc)
    time.sleep(4)  # some rows finish meanwhile
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 75, err[-3000:]
    assert took < 20
    assert "Stopped early; every finished row is committed." in err
    report = json.loads((tmp_path / "out/_batchrun/report.json").read_text())
    committed = committed_rows(tmp_path / "out")
    assert report["status"] == "interrupted"
    assert 0 < sum(len(v) for v in committed.values()) == report["rows_ok"] + report["rows_error"]
    assert report["rows_remaining"] == 121 - report["rows_ok"]

    # the engine's knobs are not part of the run's fingerprint: resume with a wider batch
    write_spec(
        spec,
        tiny_model_dir,
        sampling={"max_new_tokens": 150, "ignore_eos": True},
        output={"flush_rows": 100000, "flush_seconds": 3600},
        engine={"max_seqs": 64},
    )
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    final = read_output(tmp_path / "out")
    assert {k: [r["_row"] for r in v] for k, v in final.items()} == {
        "a0": list(range(60)),
        "a1": list(range(61)),
    }


def test_a_second_submit_is_refused_while_the_first_runs_and_takes_over_after_a_kill(
    tmp_path: Path, tiny_model_dir: Path
):
    # one sequence at a time, 200 tokens each (~10 s on the CPU): the first job outlives the second
    # submit's refusal (with a start-up that skips transformers, 40 rows of 32 tokens ended before it)
    write_inputs(tmp_path / "in", parquet=1, jsonl=0, rows=40)
    spec = write_spec(
        tmp_path / "spec.yaml",
        tiny_model_dir,
        sampling={"max_new_tokens": 200, "ignore_eos": True},
        engine={"max_seqs": 1},
    )
    first = batchrun("submit", str(spec), "--no-progress", wait=False)
    lease = tmp_path / "out/_batchrun/leases/task-0-of-1.json"
    wait_for_file(lease, first)
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 1
    assert f"error: another job is writing this output: pid {first.pid} on " in err
    first.kill()
    first.communicate()
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    assert "taking over the lease" in err and "(its process is gone)" in err
    assert not lease.exists()
