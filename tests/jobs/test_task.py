"""`batchrun run`: one task of a job; in a Kubernetes Indexed Job its index comes from the pod."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from jobs.cli import main
from tests.conftest import read_output, write_inputs, write_spec


def test_run_takes_its_task_index_from_job_completion_index(tmp_path: Path, tiny_model_dir: Path):
    """An Indexed Job sets JOB_COMPLETION_INDEX in each pod; --task-index, when given, wins."""
    write_inputs(tmp_path / "in", parquet=3, jsonl=0, rows=2)
    spec = str(write_spec(tmp_path / "spec.yaml", tiny_model_dir))
    run = ["run", spec, "--num-tasks", "3", "--no-progress"]
    result = CliRunner().invoke(main, run, env={"JOB_COMPLETION_INDEX": "1"})
    assert result.exit_code == 0, result.output
    assert sorted(read_output(tmp_path / "out")) == ["a1"]  # shard i is task i % 3's
    assert (tmp_path / "out/_batchrun/report-task1.json").exists()

    result = CliRunner().invoke(main, [*run, "--task-index", "2"], env={"JOB_COMPLETION_INDEX": "1"})
    assert result.exit_code == 0, result.output
    assert sorted(read_output(tmp_path / "out")) == ["a1", "a2"]

    result = CliRunner().invoke(main, run, env={"JOB_COMPLETION_INDEX": "3"})
    assert result.exit_code == 2
    assert result.output == "JOB_COMPLETION_INDEX 3 must be < --num-tasks 3\n"
