"""Several workers on one node: the split, the node's output, a dead worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.executors.node import visible_gpus, worker_devices
from jobs.spec.job import SpecError, load_spec
from jobs.worker import run_worker
from tests.conftest import read_output, write_inputs, write_spec
from tests.test_kill_resume import batchrun


@pytest.mark.parametrize(
    "gpus, visible, expected",
    [
        ("auto", 0, [None]),
        ("auto", 1, [None]),
        ("auto", 4, ["0", "1", "2", "3"]),
        (2, 4, ["0", "1"]),
        ([3, 1], 4, ["3", "1"]),
        (3, 0, ["", "", ""]),  # CPU workers
        (1, 0, [None]),
    ],
)
def test_worker_devices(gpus, visible, expected):
    assert worker_devices(gpus, [str(i) for i in range(visible)]) == expected


def test_worker_devices_keep_the_names_the_parent_sees():
    """Under Slurm's CUDA_VISIBLE_DEVICES=2,3, worker 0 gets GPU 2, not the node's GPU 0."""
    assert worker_devices(2, ["2", "3"]) == ["2", "3"]
    assert worker_devices(1, ["GPU-7f3a", "GPU-91c2"], per_worker=2) == ["GPU-7f3a,GPU-91c2"]


@pytest.mark.parametrize(
    "variable, expected",
    [("2,3", ["2", "3"]), ("", []), ("0,-1,1", ["0"]), (" 1 , 0 ", ["1", "0"])],
)
def test_visible_gpus_reads_cuda_visible_devices(monkeypatch, variable, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", variable)
    assert visible_gpus() == expected


@pytest.mark.parametrize(
    "gpus, visible, expected",
    [
        ("auto", 8, ["0,1", "2,3", "4,5", "6,7"]),  # 8 GPUs with tensor_parallel 2: 4 workers of 2
        ("auto", 2, [None]),  # one group: this process, every visible GPU
        ("auto", 5, ["0,1", "2,3"]),
        (2, 4, ["0,1", "2,3"]),  # runtime.gpus counts groups
        ([3, 2, 0, 1], 4, ["3,2", "0,1"]),
    ],
)
def test_tensor_parallel_workers_take_groups_of_gpus(gpus, visible, expected):
    assert worker_devices(gpus, [str(i) for i in range(visible)], per_worker=2) == expected


def test_groups_that_do_not_fit_are_refused():
    with pytest.raises(SpecError, match=r"GPU 4 does not exist here \(4 visible\) \(3 groups of 2\)"):
        worker_devices(3, ["0", "1", "2", "3"], per_worker=2)
    with pytest.raises(SpecError, match=r"3 GPU ids do not make groups of engine.tensor_parallel=2"):
        worker_devices([0, 1, 2], ["0", "1", "2", "3"], per_worker=2)


def test_a_gpu_that_does_not_exist_is_refused():
    with pytest.raises(SpecError, match=r"runtime.gpus: GPU 2 does not exist here \(2 visible\)"):
        worker_devices([0, 2], ["0", "1"])


@pytest.mark.parametrize("cuda_visible", [None, ""], ids=["spawned", "forked"])
def test_three_cpu_workers_write_the_single_worker_output_each_shard_once(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch, cuda_visible
):
    """Spawned workers (the node imported torch to count its GPUs) and forked ones (CUDA_VISIBLE_DEVICES
    counted them: the node has no torch, so it forks its workers)."""
    if cuda_visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cuda_visible)
    write_inputs(tmp_path / "in", parquet=3, jsonl=2, rows=4)
    reference = write_spec(tmp_path / "ref.yaml", tiny_model_dir, output={"path": "ref"})
    run_worker(load_spec(reference), show_progress=False)
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, runtime={"gpus": 3, "heartbeat_seconds": 0.5})
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    assert all(f"worker {t}: INFO" in err for t in range(3))  # each worker's own log lines
    assert "leaked" not in err  # a worker's quick exit leaves nothing for the resource tracker
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")
    owned = [
        json.loads((tmp_path / f"out/_batchrun/progress/task-{t}-of-3.json").read_text())["shards"]
        for t in range(3)
    ]
    assert owned == [["a0.parquet", "b0.jsonl.gz"], ["a1.parquet", "b1.jsonl"], ["a2.parquet"]]
    report = json.loads((tmp_path / "out/_batchrun/report.json").read_text())
    assert (report["status"], report["rows_ok"], report["shards_done"]) == ("finished", 4 + 5 + 6 + 4 + 5, 5)
    # the node's start-up: its own phases (no tokenizer, no fingerprint: each worker checks it; torch's
    # import where torch counted the GPUs), then those of the worker that reached its first token last
    workers = [json.loads((tmp_path / f"out/_batchrun/report-task{t}.json").read_text()) for t in range(3)]
    worker_phases = [w["attempts"][-1]["phases"] for w in workers]
    expected = {"launch", "resolve_model", "tokenizer", "fingerprint", "model_load", "first_token"}
    assert all(p.keys() >= expected for p in worker_phases)
    slowest = max(worker_phases, key=lambda p: sum(p.values()))
    node = report["attempts"][-1]["phases"]
    own = ["launch", "count_gpus", "start_workers"] + (["imports"] if cuda_visible is None else [])
    assert node == {k: node[k] for k in own} | {f"worker_{k}": v for k, v in slowest.items()}


@pytest.mark.slow
def test_dead_workers_are_reported_and_their_shards_resume(tmp_path: Path, tiny_model_dir: Path):
    write_inputs(tmp_path / "in", parquet=2, jsonl=0, rows=6)
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, runtime={"gpus": 2})
    code, _, err = batchrun("submit", str(spec), "--no-progress", kill_at="part_committed:1")  # every worker
    assert code == 1
    assert "worker 0 of 2 died: crashed (exit code -9); its shards stay resumable" in err
    assert "worker 1 of 2 died: crashed (exit code -9); its shards stay resumable" in err
    assert "Some workers died (above); run `batchrun submit" in err
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    out = read_output(tmp_path / "out")
    assert {k: [r["_row"] for r in v] for k, v in out.items()} == {"a0": list(range(6)), "a1": list(range(7))}
