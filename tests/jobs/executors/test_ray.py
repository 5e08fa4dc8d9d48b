"""The Ray executor without a cluster: its spec section, its errors, the outcome's exit code, status from
the record (tests/test_ray_cluster.py runs a real cluster)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.executors.base import ExecutorError
from jobs.executors.ray import RECORD, RaySubmission, TaskOutcome, cluster_address
from jobs.spec.job import SpecError, load_spec
from runner.store import OutputStore
from tests.conftest import write_inputs, write_spec


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def ray_spec(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """A valid spec for the Ray executor, with `runtime.ray` from the keywords."""
    write_inputs(tmp_path / "in", parquet=1, jsonl=0, rows=2)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")  # as submit sets it; undone after the test

    def make(**ray) -> Path:
        return write_spec(tmp_path / "spec.yaml", tiny_model_dir, runtime={"executor": "ray", "ray": ray})

    return make


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_ray_section_errors_name_the_field_and_the_known_keys(ray_spec):
    with pytest.raises(SpecError) as e:
        load_spec(ray_spec(tasks=0, num_gpus=1))
    lines = str(e.value).splitlines()[1:]
    assert lines == [
        "  runtime.ray.tasks: Input should be greater than 0 (got 0)",
        "  runtime.ray.num_gpus: Extra inputs are not permitted — unknown key; known here: address, tasks, "
        "num_cpus_per_task, num_gpus_per_task, max_retries",
    ]


def test_submit_without_ray_installed_says_which_extra_to_install(ray_spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, output = _invoke("submit", str(ray_spec(address="127.0.0.1:6379", tasks=2)))
    assert code == 1
    assert output.endswith(
        "error: runtime.executor is ray but Ray is not installed here: pip install 'batchrun-llm[ray]'\n"
    )


def test_the_address_comes_from_the_spec_else_ray_address(ray_spec, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(
        ExecutorError, match=r"no cluster is named: set runtime.ray.address .* or the RAY_ADDRESS"
    ):
        cluster_address(load_spec(ray_spec()))
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert cluster_address(load_spec(ray_spec())) == "head:6379"
    assert cluster_address(load_spec(ray_spec(address="ray://other:10001"))) == "ray://other:10001"


def test_submit_to_a_cluster_that_does_not_answer_fails_at_once(ray_spec):
    pytest.importorskip("ray", reason="ray is not installed: pip install 'batchrun-llm[ray]'")
    address = f"127.0.0.1:{_closed_port()}"
    code, output = _invoke("submit", str(ray_spec(address=address)))
    assert code == 1
    assert output.endswith(
        f"error: cannot reach the Ray cluster at {address}: Connection refused (is it running?)\n"
    )


def test_local_task_options_are_refused_for_ray(ray_spec):
    code, output = _invoke("submit", str(ray_spec(tasks=2)), "--num-tasks", "2")
    assert code == 2
    assert (
        "--task-index, --num-tasks and --force-new-run apply to local runs; for Ray set runtime.ray.tasks"
        in (output)
    )


@pytest.mark.parametrize(
    ("codes", "expected"),
    [([0, 0], 0), ([0, 75], 75), ([75, 1, 0], 1), ([2, 0], 1)],
)
def test_submit_exits_1_if_a_task_failed_for_good_else_75_if_one_was_stopped(codes: list[int], expected: int):
    outcomes = [TaskOutcome(i, code, "x") for i, code in enumerate(codes)]
    assert RaySubmission("01000000", "head:6379", outcomes).exit_code == expected


@pytest.mark.parametrize("installed", [True, False])
def test_status_shows_the_recorded_ray_job_and_why_its_state_is_unknown(
    ray_spec, monkeypatch, installed: bool
):
    if installed:
        pytest.importorskip("ray", reason="ray is not installed: pip install 'batchrun-llm[ray]'")
    else:
        monkeypatch.setitem(sys.modules, "ray", None)
    path = ray_spec(address="head:6379", tasks=3)
    gcs = f"127.0.0.1:{_closed_port()}"
    record = {"address": "head:6379", "gcs_address": gcs, "job_id": "01000000", "tasks": 3, "task_ids": []}
    OutputStore.for_output(load_spec(path).output).write_json(RECORD, record | {"submitted_at": 0})
    code, output = _invoke("status", str(path))
    assert code == 0, output
    why = f"Ray at {gcs} does not answer: Connection refused" if installed else (
        "Ray is not installed here: pip install 'batchrun-llm[ray]'"
    )  # fmt: skip
    assert output.splitlines()[-1] == f"ray job 01000000 at head:6379 (3 tasks): state unknown ({why})"
