"""A GPU fault mid-run (an illegal memory access out of an engine step, injected on the CPU through
runner/faults.py): the job exits 1 with every finished row committed, and a rerun finishes exactly the
rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from jobs.spec.job import load_spec
from jobs.worker import run_worker
from tests.conftest import committed_rows, read_output, write_inputs, write_spec

REPO = Path(__file__).resolve().parents[1]


def submit(spec: Path, fault_at: str | None = None) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("BATCHRUN_FAULT_AT", None)
    if fault_at:
        env["BATCHRUN_FAULT_AT"] = fault_at
    cmd = [sys.executable, "-m", "jobs.cli", "submit", str(spec), "--no-progress"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return run.returncode, run.stderr


def test_a_device_error_mid_run_commits_every_finished_row_and_a_rerun_finishes_exactly(
    tmp_path: Path, tiny_model_dir: Path
):
    write_inputs(tmp_path / "in", parquet=2, jsonl=1, rows=8)
    # no commit before the end of the job: every committed row below comes from the stop's final flush
    sections = dict(
        output={"flush_rows": 1000, "flush_seconds": 600}, engine={"backend": "batchrun", "max_seqs": 4}
    )
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, **sections)
    ref = write_spec(tmp_path / "ref.yaml", tiny_model_dir, **{**sections, "output": {"path": "ref"}})
    run_worker(load_spec(ref), show_progress=False)
    reference = read_output(tmp_path / "ref")
    by_row = {(stem, r["_row"]): r for stem, rows in reference.items() for r in rows}

    code, err = submit(spec, fault_at="engine_step:12")
    assert code == 1, err[-3000:]
    assert (
        "The engine failed: InjectedDeviceError: CUDA error: an illegal memory access was encountered "
        "(injected at engine_step). Every finished row is committed; run `batchrun submit "
        f"{spec}` again to finish the rest."
    ) in err
    out = tmp_path / "out"
    report = json.loads((out / "_batchrun" / "report.json").read_text())
    committed = committed_rows(out)
    parts = {
        (f.parent.name.removesuffix(".parts"), r["_row"]): r
        for f in out.rglob("*.parts/*.parquet")
        for r in pq.read_table(f).to_pylist()
    }
    total = sum(len(v) for v in committed.values())
    assert report["status"] == "failed" and report["rows_ok"] == total  # every finished row, no more
    assert 0 < total < len(by_row)
    for stem, rows in committed.items():
        assert len(rows) == len(set(rows)), stem
    assert len(parts) == total
    for key, row in parts.items():  # the committed rows are the rows a clean run gives
        assert row == by_row[key]

    code, err = submit(spec)
    assert code == 0, err[-3000:]
    assert read_output(out) == reference
