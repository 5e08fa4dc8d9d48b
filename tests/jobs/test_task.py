"""`batchrun run`: one task of a job; in a Kubernetes Indexed Job its index comes from the pod."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from jobs.cli import main
from jobs.spec.job import parse_spec
from tests.conftest import read_output, write_inputs, write_spec

REPO = Path(__file__).resolve().parents[2]


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


def test_the_kubernetes_example_runs_one_task_per_index_and_outlasts_the_grace_period():
    config_map, job = yaml.safe_load_all((REPO / "scripts/k8s/batchrun-indexed-job.yaml").read_text())
    spec = parse_spec(yaml.safe_load(config_map["data"]["spec.yaml"]), "the ConfigMap's spec.yaml")
    pod = job["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:2] == ["batchrun", "run"] and "--task-index" not in command
    assert int(command[command.index("--num-tasks") + 1]) == job["spec"]["completions"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert pod["terminationGracePeriodSeconds"] > spec.runtime.grace_seconds
