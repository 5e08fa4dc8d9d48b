"""On a real single-node Slurm (scripts/slurm/start_local_slurm.sh): arrays, USR1 drain + requeue, cron.

The session fixture starts Slurm if it is not running (needs root and apt or the packages) and stops
it afterwards; where it can't, these tests skip and say why (`pytest -rs` lists the reason). They take
about a minute each (task start-up and generation on CPU), so they are marked slow; `make test-slurm`
(run by .ci/run) runs them, and tests/jobs/executors/test_slurm.py checks the script's signal path
without Slurm.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from jobs.executors.slurm import ACTIVE_STATES, TaskState, array_state
from jobs.spec.job import load_spec
from jobs.worker import run_worker
from tests.conftest import committed_rows, read_output, write_inputs, write_spec
from tests.test_kill_resume import REPO, batchrun

SCRIPTS = REPO / "scripts/slurm"


def _idle() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return out.stdout.split() == ["idle"]


@pytest.fixture(scope="session")
def local_slurm():
    """A running single-node Slurm; started (and stopped at the end) unless one already answers."""
    started = not _idle()
    if started:
        proc = subprocess.run([SCRIPTS / "start_local_slurm.sh"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            why = (proc.stderr or proc.stdout).strip()
            pytest.skip(f"no local Slurm: scripts/slurm/start_local_slurm.sh failed: {why}")
    yield
    if started:
        subprocess.run([SCRIPTS / "stop_local_slurm.sh"], capture_output=True, timeout=120)


def _wait_until_finished(job_id: str, timeout: float = 300) -> list[TaskState]:
    deadline = time.monotonic() + timeout
    while True:
        states = array_state(job_id)
        if states and not any(t.state in ACTIVE_STATES for t in states):
            return states
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"slurm job {job_id} did not finish in {timeout} s: {states}")
        time.sleep(0.5)


def _submit(spec: Path, request: pytest.FixtureRequest) -> str:
    code, out, err = batchrun("submit", str(spec))
    assert code == 0, err
    assert "Submitted Slurm array job" in err
    job_id = out.strip()
    request.addfinalizer(lambda: subprocess.run(["scancel", job_id]))  # a failed test leaves no job behind
    return job_id


def _logs(folder: Path) -> str:
    return "".join(f.read_text() for f in sorted(folder.glob("slurm-*.log")))


@pytest.mark.slow
def test_a_3_task_array_over_6_shards_equals_a_local_run_and_cron_resubmits_are_refused(
    local_slurm, tmp_path: Path, tiny_model_dir: Path, request: pytest.FixtureRequest
):
    write_inputs(tmp_path / "in", parquet=4, jsonl=2, rows=5)
    ref = write_spec(tmp_path / "ref.yaml", tiny_model_dir, output={"path": "ref"})
    run_worker(load_spec(ref), show_progress=False)
    spec = write_spec(
        tmp_path / "spec.yaml", tiny_model_dir, runtime={"executor": "slurm", "slurm": {"tasks": 3}}
    )
    job_id = _submit(spec, request)

    # cron fires again while the array is queued or running: refused, for slurm and local alike
    code, _, err = batchrun("submit", str(spec))
    assert code == 1
    assert f"error: Slurm job {job_id} is still queued or running on this output" in err
    code, _, err = batchrun("submit", str(spec), "--executor", "local")
    assert code == 1 and f"Slurm job {job_id} is still queued or running" in err

    states = _wait_until_finished(job_id)
    assert [(t.task, t.state, t.exit_code) for t in states] == [
        (str(i), "COMPLETED", "0:0") for i in range(3)
    ], _logs(tmp_path)
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")

    code, out, err = batchrun("status", str(spec))
    assert code == 0, err
    assert "6 shards: 6 done, 0 partial, 0 pending" in out
    assert f"slurm job {job_id} (3 tasks):" in out and "COMPLETED" in out

    code, out, err = batchrun("submit", str(spec))  # finished: a no-op that says so
    assert code == 0 and out == ""
    assert "nothing to do: every shard of" in err


@pytest.mark.slow
def test_usr1_drains_requeues_with_restart_count_1_and_finishes_exactly_once(
    local_slurm, tmp_path: Path, tiny_model_dir: Path, request: pytest.FixtureRequest
):
    write_inputs(tmp_path / "in", parquet=2, jsonl=0, rows=12)
    spec = write_spec(
        tmp_path / "spec.yaml",
        tiny_model_dir,
        sampling={"max_new_tokens": 16, "ignore_eos": True},
        output={"flush_rows": 2},
        engine={"max_seqs": 2},
        runtime={"executor": "slurm", "grace_seconds": 10, "slurm": {"tasks": 1}},
    )
    job_id = _submit(spec, request)
    deadline = time.monotonic() + 120
    while sum(len(v) for v in committed_rows(tmp_path / "out").values()) < 2:
        assert time.monotonic() < deadline, _logs(tmp_path)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)

    states = _wait_until_finished(job_id)
    log = _logs(tmp_path)
    assert [(t.state, t.restarts, t.exit_code) for t in states] == [("COMPLETED", 1, "0:0")], log
    assert "Stopped early; every finished row is committed." in log
    assert f"requeueing job {job_id}" in log
    assert "restart 1," in log
    out = read_output(tmp_path / "out")
    assert {k: [(r["_row"], r["id"]) for r in v] for k, v in out.items()} == {
        f"a{s}": [(r, f"p{s}-{r}") for r in range(12 + s)] for s in (0, 1)
    }
    assert all(r["generated_tokens"] == 16 for rows in out.values() for r in rows)
