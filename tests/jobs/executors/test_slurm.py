"""The sbatch script and the submit rules, without a cluster (tests/test_slurm_cluster.py runs a real one)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.executors.slurm import RECORD, render_script
from jobs.spec.job import SpecError, load_spec
from runner.store import OutputStore
from tests.test_kill_resume import batchrun


def _spec(tmp_path: Path, **slurm) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "name: sums\ninput: {path: in}\nprompt: {column: text}\noutput: {path: out}\n"
        "runtime:\n  executor: slurm\n  grace_seconds: 90\n"
        f"  slurm: {slurm!r}\n".replace("'", '"')
    )
    return path


def test_script_asks_for_the_array_and_resources_and_requeues_only_on_exit_75(tmp_path: Path):
    path = _spec(
        tmp_path,
        tasks=64,
        partition="gpu",
        account="proj",
        qos="low",
        time="04:00:00",
        gpus=1,
        cpus=8,
        mem="64G",
        setup=["source /opt/venv/bin/activate"],
        extra=["--constraint=h100", "--exclusive"],
    )
    script = render_script(load_spec(path), path)
    sbatch = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "--job-name=sums",
        "--array=0-63",
        f"--output={tmp_path}/slurm-%A_%a.log",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@90",
        f"--chdir={tmp_path}",
        "--partition=gpu",
        "--account=proj",
        "--qos=low",
        "--time=04:00:00",
        "--gpus-per-task=1",
        "--cpus-per-task=8",
        "--mem=64G",
        "--constraint=h100",
        "--exclusive",
    ]
    run = f'python -m jobs.cli run {path} --num-tasks 64 --no-progress --task-index "$SLURM_ARRAY_TASK_ID" &'
    assert run in script
    assert script.index("source /opt/venv/bin/activate") < script.index("-m jobs.cli run")
    assert 'if [ "$rc" -eq 75 ]; then' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def _run_script(tmp_path: Path, exit_code: int, signal_after: float | None = None) -> tuple[int, str]:
    """The rendered script with a fake task (exits `exit_code`, or 75 once signalled), fake scontrol."""
    spec = load_spec(_spec(tmp_path))
    script = render_script(spec, tmp_path / "spec.yaml")
    fake_task = (
        f"import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75)); "
        f"print('task', sys.argv[-1], flush=True); time.sleep(30 if {signal_after is not None} else 0); "
        f"sys.exit({exit_code})"
    )
    script = script.replace(f"{sys.executable} -m jobs.cli run", f"{sys.executable} -c {fake_task!r}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "scontrol $*"\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "4", "SLURM_JOB_ID": "1234"}
    proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    if signal_after is not None:
        time.sleep(signal_after)
        proc.send_signal(10)  # SIGUSR1, as `scancel --signal=USR1 --batch` sends it
    out, _ = proc.communicate(timeout=20)
    return proc.returncode, out


@pytest.mark.parametrize("code", [0, 1])
def test_a_finished_or_failed_task_is_never_requeued(tmp_path: Path, code: int):
    rc, out = _run_script(tmp_path, code)
    assert rc == code
    assert "task 4" in out and "scontrol" not in out


def test_usr1_reaches_the_task_at_once_and_exit_75_requeues_its_element(tmp_path: Path):
    rc, out = _run_script(tmp_path, 0, signal_after=1.0)
    assert rc == 75
    assert "scontrol requeue 1234" in out


def test_dry_run_prints_the_script_and_local_dry_run_is_refused(tmp_path: Path):
    path = _spec(tmp_path, tasks=3)
    code, out, err = batchrun("submit", str(path), "--dry-run")
    assert code == 0, err
    assert out.startswith("#!/bin/bash\n#SBATCH --job-name=sums\n#SBATCH --array=0-2\n")
    code, _, err = batchrun("submit", str(path), "--dry-run", "--executor", "local")
    assert code == 2 and "--dry-run prints the sbatch script: add --executor slurm" in err
    code, _, err = batchrun("submit", str(path), "--num-tasks", "2")
    assert code == 2 and "for Slurm set runtime.slurm.tasks" in err


def test_status_says_when_slurm_state_is_unknown(tmp_path: Path):
    path = _spec(tmp_path, tasks=3)
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.jsonl").write_text('{"text": "x"}\n')
    store = OutputStore.for_output(load_spec(path).output)
    store.write_json(RECORD, {"job_id": "999999", "tasks": 3, "submitted_at": 0})
    code, out, err = batchrun("status", str(path))
    assert code == 0, err
    assert out.splitlines()[-1].startswith("slurm job 999999 (3 tasks)")


def test_slurm_section_errors_name_the_field_and_the_known_keys(tmp_path: Path):
    path = _spec(tmp_path, tasks=0, gpu=1)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    lines = str(e.value).splitlines()[1:]
    assert lines[0] == "  runtime.slurm.tasks: Input should be greater than 0 (got 0)"
    assert lines[1].startswith(
        "  runtime.slurm.gpu: Extra inputs are not permitted — unknown key; known here: tasks, partition,"
    )
