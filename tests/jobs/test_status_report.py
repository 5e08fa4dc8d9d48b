"""What `batchrun status` and `batchrun report` show, from a real short run's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.spec.job import load_spec
from jobs.status import error_reason, job_status
from jobs.worker import run_worker
from tests.conftest import committed_rows, write_inputs, write_spec
from tests.test_kill_resume import REPO, batchrun


def test_two_tasks_one_finished_one_stale_and_the_json_schema(tmp_path: Path, tiny_model_dir: Path):
    write_inputs(tmp_path / "in", parquet=2, jsonl=2, rows=3)
    (tmp_path / "in/b1.jsonl").write_text('{"text": "red green"}\nnot json\n')
    spec_path = write_spec(
        tmp_path / "spec.yaml", tiny_model_dir, runtime={"num_tasks": 2, "heartbeat_seconds": 0.2}
    )
    run_worker(load_spec(spec_path), show_progress=False)  # task 0: a0, b0 (round-robin of a0 a1 b0 b1)
    # task 1 is killed mid-run: its heartbeat stays "running"; its process is gone from this host
    code, _, err = batchrun(
        "run", str(spec_path), "--task-index", "1", "--no-progress", kill_at="part_committed:1"
    )
    assert code == -9, err[-2000:]
    time.sleep(0.7)  # > 3 heartbeat intervals

    code, out, err = batchrun("status", str(spec_path), "--json")
    assert code == 0, err
    status = json.loads(out)
    assert set(status) == {
        "output",
        "fingerprint_recorded",
        "shards",
        "tasks",
        "errors_by_reason",
        "eta_seconds",
        "last_report",
        "slurm",
        "ray",
    }
    shards = {s["shard"]: s for s in status["shards"]}
    assert {k: v["state"] for k, v in shards.items()} == {
        "a0.parquet": "done",
        "a1.parquet": "partial",
        "b0.jsonl.gz": "done",
        "b1.jsonl": "pending",
    }
    committed = committed_rows(tmp_path / "out")  # read from the parts directly
    assert shards["a1.parquet"]["rows_committed"] == len(committed["a1"]) > 0
    assert shards["a1.parquet"]["rows_total"] == 4
    tasks = {t["task"]: t for t in status["tasks"]}
    assert tasks["task-0-of-2"]["state"] == "finished"
    assert tasks["task-1-of-2"]["state"] == "dead"
    assert set(tasks["task-0-of-2"]) == {
        "task",
        "state",
        "host",
        "pid",
        "heartbeat_age_s",
        "rows_done",
        "rows_inflight",
        "rows_total",
        "rows_error",
        "tokens_per_s",
        "rows_per_s",
        "gpu_busy_percent",
    }
    assert tasks["task-0-of-2"]["rows_done"] == 3 + 3 and tasks["task-0-of-2"]["rows_total"] == 6

    code, text, _ = batchrun("status", str(spec_path))
    assert "  task-1-of-2: dead on " in text and "  task-0-of-2: finished on " in text
    beat = tmp_path / "out/_batchrun/progress/task-1-of-2.json"  # as if it ran on another host
    beat.write_text(json.dumps({**json.loads(beat.read_text()), "host": "elsewhere"}))
    code, text, _ = batchrun("status", str(spec_path))
    assert "  task-1-of-2: stale on elsewhere " in text
    assert "4 shards: 2 done, 1 partial, 1 pending;" in text


def test_error_reasons_are_grouped_without_place_and_numbers():
    assert error_reason("/d/a.jsonl row 17: invalid JSON (Expecting value: line 1 column 1 (char 0))") == (
        "invalid JSON (Expecting value: line N column N (char N))"
    )
    assert error_reason(
        "a.jsonl row 3: prompt has 900 tokens, over the limit of 248 (on_too_long: skip)"
    ) == ("prompt has N tokens, over the limit of N (on_too_long: skip)")


def test_status_of_a_killed_then_resumed_run_counts_errors_by_reason(tmp_path: Path, tiny_model_dir: Path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "x.jsonl").write_text('{"text": "red"}\nnope\n{"text": "blue"}\n{oops\n{"other": 1}\n')
    spec_path = write_spec(
        tmp_path / "spec.yaml",
        tiny_model_dir,
        output={"flush_rows": 1},
        runtime={"max_error_fraction": 1, "max_input_error_fraction": 1},
    )
    code, _, _ = batchrun("submit", str(spec_path), "--no-progress", kill_at="part_committed:3")
    assert code == -9
    mid = job_status(load_spec(spec_path))
    assert [(s.state, s.rows_committed) for s in mid.shards] == [("partial", 3)]
    run_worker(load_spec(spec_path), show_progress=False)
    done = job_status(load_spec(spec_path))
    assert [(s.state, s.rows_committed, s.error_rows) for s in done.shards] == [("done", 5, 3)]
    assert done.errors_by_reason == {
        "invalid JSON (Expecting value at column N)": 1,
        "invalid JSON (Expecting property name enclosed in double quotes at column N)": 1,
        "row has no field 'text' (fields: other)": 1,
    }


def test_report_png_from_a_real_run(tmp_path: Path, tiny_model_dir: Path):
    pytest.importorskip("matplotlib")
    write_inputs(tmp_path / "in", parquet=2, jsonl=1, rows=12)
    spec_path = write_spec(
        tmp_path / "spec.yaml",
        tiny_model_dir,
        runtime={"heartbeat_seconds": 0.2},
        sampling={"max_new_tokens": 16, "ignore_eos": True},
        engine={"max_seqs": 2},
    )
    run_worker(load_spec(spec_path), show_progress=False)
    metrics = (tmp_path / "out/_batchrun/metrics/task-0-of-1.jsonl").read_text().splitlines()
    assert len(metrics) >= 3 and json.loads(metrics[-1])["state"] == "finished"
    code, out, err = batchrun("report", str(spec_path), "-o", str(tmp_path / "r.png"))
    assert code == 0, err
    from PIL import Image

    with Image.open(tmp_path / "r.png") as img:
        assert img.size == (1000, 1000)
        assert len(set(img.convert("L").tobytes())) > 20  # drawn, not blank (one byte per grey pixel)


def test_regression_a_kill_during_the_last_heartbeat_leaves_its_temp_file(
    tmp_path: Path, tiny_model_dir: Path
):
    """Found by the torture fast tier: a SIGKILL inside the final heartbeat's write left
    `_batchrun/progress/.tmp-task-0-of-1.json-<hex>`, and the rerun had nothing to do, so no heartbeat
    ever replaced (and cleaned) it."""
    write_inputs(tmp_path / "in", parquet=1, jsonl=0, rows=2)
    spec_path = write_spec(tmp_path / "spec.yaml", tiny_model_dir)
    run_worker(load_spec(spec_path), show_progress=False)
    progress = tmp_path / "out/_batchrun/progress"
    (progress / ".tmp-task-0-of-1.json-0123abcd").write_text('{"half')
    (tmp_path / "out/_batchrun/metrics/.tmp-task-0-of-1.jsonl-0123abcd").write_text("{")
    assert run_worker(load_spec(spec_path), show_progress=False).rows_ok == 2  # nothing to do: last report
    assert not list((tmp_path / "out").rglob(".tmp-*"))


THREADS_STARTED = """
import collections, json, os, sys
from jobs.spec.job import load_spec
from jobs.status import job_status
from runner.io.sources import list_shards, read_shard

def threads():
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    return collections.Counter(names)

spec = load_spec(sys.argv[1])
before = threads()
job_status(spec)
for shard in list_shards(spec.input.path, {}):
    list(read_shard(shard, {}))
print(json.dumps(threads() - before))
"""


def test_regression_status_reads_parquet_without_arrow_worker_threads(tmp_path: Path, tiny_model_dir: Path):
    """Found by CI: `batchrun status` aborted at exit about once in a hundred runs ("terminate called
    without an active exception", SIGABRT). An Arrow pool worker that read a part through fsspec's
    Python file was still releasing its buffers while the interpreter finalized. Parquet reads now
    stay on the calling thread; only Arrow's allocator thread may start."""
    write_inputs(tmp_path / "in", parquet=2, jsonl=0, rows=7)
    spec_path = write_spec(tmp_path / "spec.yaml", tiny_model_dir, output={"flush_rows": 3})
    code, _, err = batchrun("submit", str(spec_path), "--no-progress", kill_at="part_committed:3")
    assert code == -9, err[-2000:]
    assert committed_rows(tmp_path / "out")  # parts to read
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", THREADS_STARTED, str(spec_path)]
    done = subprocess.run(command, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert set(json.loads(done.stdout)) <= {"jemalloc_bg_thd"}
