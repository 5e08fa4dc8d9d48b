"""On a real local Ray cluster (`ray start --head`, CPU): tasks equal a local run; a SIGKILLed task is
run again by Ray and the output is exact.

The session fixture starts a one-node cluster and stops it afterwards; without Ray installed these
tests skip and say why (`pytest -rs` lists the reason). They are marked slow; `make test-ray` (run by
.ci/run) installs the `[ray]` extra and runs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.spec.job import load_spec
from jobs.worker import run_worker
from tests.conftest import committed_rows, read_output, write_inputs, write_spec
from tests.test_kill_resume import REPO, batchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def local_ray(tmp_path_factory) -> str:
    """A one-node Ray cluster on this machine (3 CPU slots, no GPU); yields its address. It is the
    `ray start --head --block` process started here: terminating it stops every process it started."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed: pip install 'batchrun-llm[ray]' (`make test-ray` does)")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("ray") / "head.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
        "--num-cpus=3", "--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log_path.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.skip(f"no local Ray: `ray start --head` failed: {log_path.read_text()[-2000:]}")
        time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()


@pytest.mark.slow
def test_3_ray_tasks_over_6_shards_equal_a_local_run_and_cron_resubmits_are_refused(
    local_ray: str, tmp_path: Path, tiny_model_dir: Path
):
    write_inputs(tmp_path / "in", parquet=4, jsonl=2, rows=5)
    ref = write_spec(tmp_path / "ref.yaml", tiny_model_dir, output={"path": "ref"})
    run_worker(load_spec(ref), show_progress=False)
    spec = write_spec(
        tmp_path / "spec.yaml",
        tiny_model_dir,
        runtime={"executor": "ray", "ray": {"address": local_ray, "tasks": 3}},
    )
    driver = batchrun("submit", str(spec), wait=False)
    while not (tmp_path / "out/_batchrun/ray.json").exists():
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.05)
    time.sleep(1.5)  # the tasks' events reach Ray's state API about once a second

    # cron fires again while the tasks run: refused, for Ray and local alike
    code, _, err = batchrun("submit", str(spec))
    assert code == 1 and "is still running on this output" in err, err
    code, _, err = batchrun("submit", str(spec), "--executor", "local")
    assert code == 1 and "is still running on this output" in err, err

    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err
    assert "3 of 3 tasks finished" in err
    for i in range(3):  # shards i and i + 3: 2 shards each
        assert f"  task {i}: finished: 2/2 shards done" in err
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")

    code, out, err = batchrun("status", str(spec))
    assert code == 0, err
    assert "6 shards: 6 done, 0 partial, 0 pending" in out
    record = json.loads((tmp_path / "out/_batchrun/ray.json").read_text())
    assert f"ray job {record['job_id']} at {local_ray} (3 tasks):" in out
    assert [line.split()[:5] for line in out.splitlines() if line.startswith("  task ")] == [
        ["task", str(i), "FINISHED", "attempts", "1"] for i in range(3)
    ]

    code, out, err = batchrun("submit", str(spec))  # finished: a no-op that says so, without Ray
    assert code == 0 and "nothing to do: every shard of" in err


def _sigkill_the_task(driver: subprocess.Popen, out: Path, after_rows: int) -> None:
    """SIGKILL the process of task 0 of 1 (named by its lease) once `after_rows` rows are committed."""
    lease = out / "_batchrun/leases/task-0-of-1.json"
    deadline = time.monotonic() + 120
    while not lease.exists() or sum(len(v) for v in committed_rows(out).values()) < after_rows:
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.05)
    holder = json.loads(lease.read_text())
    assert holder["pid"] != driver.pid  # the task runs in its Ray worker, not in `batchrun submit`
    os.kill(holder["pid"], signal.SIGKILL)


def _ray_task_lines(spec: Path) -> list[list[str]]:
    code, out, err = batchrun("status", str(spec))
    assert code == 0, err
    return [line.split() for line in out.splitlines() if line.startswith("  task ")]


SLOW_JOB = {
    "sampling": {"max_new_tokens": 16, "ignore_eos": True},
    "engine": {"max_seqs": 2},
    "output": {"flush_rows": 2},
}


@pytest.mark.slow
def test_a_sigkilled_ray_task_is_run_again_by_ray_and_the_output_is_exact(
    local_ray: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    write_inputs(tmp_path / "in", parquet=2, jsonl=0, rows=12)
    ref = write_spec(tmp_path / "ref.yaml", tiny_model_dir, **SLOW_JOB | {"output": {"path": "ref"}})
    run_worker(load_spec(ref), show_progress=False)
    runtime = {"executor": "ray", "ray": {"tasks": 1, "max_retries": 1}}
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, runtime=runtime, **SLOW_JOB)
    monkeypatch.setenv("RAY_ADDRESS", local_ray)  # no runtime.ray.address: the variable names the cluster
    driver = batchrun("submit", str(spec), wait=False)
    _sigkill_the_task(driver, tmp_path / "out", after_rows=2)

    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err
    assert "1 of 1 tasks finished" in err and "  task 0: finished: 2/2 shards done" in err
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")  # no row lost, none twice
    report = json.loads((tmp_path / "out/_batchrun/report.json").read_text())
    assert [a["status"] for a in report["attempts"]] == ["killed", "finished"]
    assert [t[:5] for t in _ray_task_lines(spec)] == [["task", "0", "FINISHED", "attempts", "2"]]


@pytest.mark.slow
def test_a_task_that_died_with_no_retry_left_fails_the_submit(
    local_ray: str, tmp_path: Path, tiny_model_dir: Path
):
    write_inputs(tmp_path / "in", parquet=1, jsonl=0, rows=12)
    runtime = {"executor": "ray", "ray": {"address": local_ray, "max_retries": 0}}
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, runtime=runtime, **SLOW_JOB)
    driver = batchrun("submit", str(spec), wait=False)
    _sigkill_the_task(driver, tmp_path / "out", after_rows=0)

    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 1, err
    assert "0 of 1 tasks finished" in err
    assert "  task 0: died with 0 retries spent (" in err
    assert _ray_task_lines(spec) == [["task", "0", "FAILED", "attempts", "1", "last", "error", "WORKER_DIED"]]


@pytest.mark.slow
def test_ctrl_c_cancels_the_tasks_exits_75_and_a_second_submit_finishes_exactly_once(
    local_ray: str, tmp_path: Path, tiny_model_dir: Path
):
    """Regression: Ray's workers ignore SIGINT, so ray.cancel did nothing before the job's own handler
    was in place, and a task still starting ran to its end while `submit` said it was stopping."""
    write_inputs(tmp_path / "in", parquet=1, jsonl=0, rows=12)
    runtime = {"executor": "ray", "ray": {"address": local_ray}}
    # one sequence at a time, 160 tokens each (a few seconds): the task is still generating when the
    # signal comes (its start-up, which skips transformers, no longer takes seconds by itself)
    slower = SLOW_JOB | {"sampling": {"max_new_tokens": 160, "ignore_eos": True}, "engine": {"max_seqs": 1}}
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, runtime=runtime, **slower)
    driver = batchrun("submit", str(spec), wait=False)
    lease = tmp_path / "out/_batchrun/leases/task-0-of-1.json"
    while not lease.exists():  # the task is starting: importing torch, loading the model
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 75, err
    assert "0 of 1 tasks finished" in err  # not run to its end
    # cancelled while starting, or stopped by its own handler once generating: both end it early
    assert re.search(r"  task 0: (cancelled|stopped early by a signal); submit again to finish it", err), err
    assert "Every row the tasks committed is kept: run `batchrun submit" in err

    code, out, err = batchrun("submit", str(spec))
    assert code == 0, err
    rows = read_output(tmp_path / "out")
    assert {k: [(r["_row"], r["id"]) for r in v] for k, v in rows.items()} == {
        "a0": [(r, f"p0-{r}") for r in range(12)]
    }
