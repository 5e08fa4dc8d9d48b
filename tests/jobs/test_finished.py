"""A finished job resubmitted: answered from the output alone, without torch, writing nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from jobs.finished import finished_summary
from jobs.spec.job import load_spec
from jobs.worker import run_worker
from tests.conftest import write_inputs, write_spec

REPO = Path(__file__).resolve().parents[2]


def _batchrun_importtime(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`batchrun ARGS` in a fresh interpreter, as cron or Slurm starts it, and every module it imported
    (-X importtime lists them)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "jobs.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, re.M))


def _finished_job(tmp_path: Path, model_dir: Path):
    write_inputs(tmp_path / "in", parquet=2, jsonl=0, rows=2)
    spec_path = write_spec(tmp_path / "spec.yaml", model_dir)
    summary = run_worker(load_spec(spec_path), show_progress=False)
    return spec_path, summary


def test_resubmit_of_a_finished_job_imports_no_torch_and_writes_nothing(tmp_path: Path, tiny_model_dir):
    spec_path, first = _finished_job(tmp_path, tiny_model_dir)
    state = tmp_path / "out/_batchrun"
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    mtimes = {p: p.stat().st_mtime_ns for p in before}

    done, imported = _batchrun_importtime("submit", str(spec_path), "--no-progress")

    assert done.returncode == 0, done.stderr[-2000:]
    assert "jobs.finished" in imported  # the list is real
    assert not {"torch", "transformers"} & imported
    assert "nothing to do" in done.stderr
    assert f"{first.rows_ok} rows ok" in done.stderr  # the report of the run that did the work
    after = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    assert after == before and {p: p.stat().st_mtime_ns for p in after} == mtimes


def test_finished_summary_is_the_report_only_for_the_same_run_fully_done(tmp_path: Path, tiny_model_dir):
    spec_path, first = _finished_job(tmp_path, tiny_model_dir)
    assert finished_summary(load_spec(spec_path)) == first

    other = write_spec(tmp_path / "other.yaml", tiny_model_dir, sampling={"max_new_tokens": 9})
    assert finished_summary(load_spec(other)) is None  # the full run refuses it, with the diff

    parts = tmp_path / "out/a1.parts"
    parts.mkdir()  # left by a kill during compaction's clean-up: the full run removes it
    assert finished_summary(load_spec(spec_path)) is None
    parts.rmdir()

    (tmp_path / "out/a1.parquet").unlink()
    assert finished_summary(load_spec(spec_path)) is None


def test_status_and_validate_import_no_torch(tmp_path: Path, tiny_model_dir):
    spec_path, _ = _finished_job(tmp_path, tiny_model_dir)
    for command, module in (("status", "jobs.status"), ("validate", "jobs.preflight")):
        done, imported = _batchrun_importtime(command, str(spec_path))
        assert done.returncode == 0, done.stderr[-2000:]
        assert module in imported and not {"torch", "transformers"} & imported, command
