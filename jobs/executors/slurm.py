"""Slurm: render the sbatch array script, submit it once, and read the array's state back.

Each array task runs `batchrun run SPEC --task-index $SLURM_ARRAY_TASK_ID --num-tasks N`; shard i
belongs to task i % N (jobs.plan), so a requeued or resubmitted task finds exactly its shards, and
one whose shards are all done exits 0 at once. The script runs the task in the background and waits
on it, so Slurm's USR1 (time limit near) or TERM (preemption) reaches the trap at once and is
forwarded; the task drains and exits 75, which the script turns into `scontrol requeue` of its own
array element. Any other exit code ends the element for good: it never requeues after finishing.

The submitted job id is recorded in `<out>/_batchrun/slurm.json`, so `batchrun status` can show the
array's state and a second `batchrun submit` (say, from cron) is refused while the array is alive.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from jobs.executors.base import ExecutorError, SubmitOptions, preflight
from jobs.spec.job import JobSpec
from jobs.task import EXIT_FAILED
from runner.io.sources import list_shards
from runner.store import OutputStore

TITLE = "Slurm"
TASK_OPTIONS = False  # tasks are the array's elements: runtime.slurm.tasks
DRY_RUN = True  # --dry-run prints the sbatch script
RECORD = "slurm.json"
# JobState values of an element that still runs or will run again (squeue's "active" states)
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
     "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
)  # fmt: skip


@dataclass(slots=True, frozen=True)
class TaskState:
    """One array element as `scontrol show job` reports it."""

    task: str  # the array index, or a range like "3-7" for elements not started yet
    state: str
    restarts: int
    exit_code: str


@dataclass(slots=True)
class SlurmStatus:
    """The recorded array job and, when scontrol can tell, each element's state."""

    job_id: str
    tasks: int
    elements: list[TaskState] | None  # None: scontrol missing, or Slurm no longer knows the job

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        head = f"slurm job {self.job_id} ({self.tasks} tasks)"
        if self.elements is None:
            return [head + ": state unknown (no scontrol here, or the job ended a while ago)"]
        return [head + ":"] + [
            f"  task {t.task:<6} {t.state:<10} restarts {t.restarts}  exit {t.exit_code}"
            for t in self.elements
        ]


def render_script(spec: JobSpec, spec_path: str | Path) -> str:
    """The sbatch script for SPEC: one array element per task, requeued when preempted."""
    s = spec.runtime.slurm
    spec_file = Path(spec_path).resolve()
    options = [
        f"--job-name={s.job_name or spec.name or 'batchrun'}",
        f"--array=0-{s.tasks - 1}",
        f"--output={s.log}",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{math.ceil(spec.runtime.grace_seconds)}",
        f"--chdir={spec_file.parent}",
    ]
    options += [
        f"--{key}={value}"
        for key, value in (
            ("partition", s.partition),
            ("account", s.account),
            ("qos", s.qos),
            ("time", s.time),
            ("gpus-per-task", s.gpus or None),
            ("cpus-per-task", s.cpus),
            ("mem", s.mem),
        )
        if value is not None
    ]
    options += s.extra
    run = ["-m", "jobs.cli", "run", str(spec_file), "--num-tasks", str(s.tasks), "--no-progress"]
    # the submitter's own interpreter, unless setup lines prepare an environment of the node's own
    command = shlex.join(["python" if s.setup else sys.executable, *run])
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options), "", *s.setup, _BODY.format(command=command)]
    return "\n".join(lines)


_BODY = """\
# Run the task in the background and wait on it: a trap fires only between commands, so a task in
# the foreground would delay Slurm's USR1/TERM until it ended. Forward the signal; the task drains.
echo "batchrun: task $SLURM_ARRAY_TASK_ID, restart ${{SLURM_RESTART_COUNT:-0}}, on $(hostname)"
child=
trap '[ -n "$child" ] && kill -USR1 "$child"' USR1
trap '[ -n "$child" ] && kill -TERM "$child"' TERM
{command} --task-index "$SLURM_ARRAY_TASK_ID" &
child=$!
while kill -0 "$child" 2>/dev/null; do wait "$child"; done  # wait returns early when a trap fires
wait "$child"
rc=$?
if [ "$rc" -eq 75 ]; then  # stopped by a signal, every finished row committed: come back for the rest
    echo "batchrun: task $SLURM_ARRAY_TASK_ID stopped early; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || echo "batchrun: scontrol requeue failed; submit again to finish"
fi
exit "$rc"
"""


def job_record(store: OutputStore) -> dict | None:
    """The last Slurm submission recorded in this output: {job_id, tasks, submitted_at}."""
    return store.read_json(RECORD)


def array_state(job_id: str) -> list[TaskState] | None:
    """Each element of the array job (pending ranges as one entry); None if scontrol can't tell."""
    if shutil.which("scontrol") is None:
        return None
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        return None  # unknown: finished longer ago than Slurm's MinJobAge, or another cluster
    states = []
    for line in proc.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "JobState" in fields:
            states.append(
                TaskState(
                    fields.get("ArrayTaskId", "0"),
                    fields["JobState"],
                    int(fields.get("Restarts", "0")),
                    fields.get("ExitCode", "?"),
                )
            )
    return sorted(states, key=lambda t: _first_index(t.task))


def _first_index(task: str) -> int:
    head = task.split("-")[0].split(",")[0].split("%")[0]
    return int(head) if head.isdigit() else -1


def status(spec: JobSpec) -> SlurmStatus | None:
    """The Slurm side of `batchrun status`; None if this output was never submitted to Slurm."""
    record = job_record(OutputStore.for_output(spec.output))
    if record is None:
        return None
    return SlurmStatus(record["job_id"], record["tasks"], array_state(record["job_id"]))


def active_job(store: OutputStore) -> str | None:
    """The recorded job id if any element of it is still queued or running."""
    record = job_record(store)
    if record is None:
        return None
    states = array_state(record["job_id"]) or []
    return record["job_id"] if any(t.state in ACTIVE_STATES for t in states) else None


def all_done(spec: JobSpec, store: OutputStore) -> bool:
    """Whether every shard of the job has its final file (the job is finished)."""
    shards = list_shards(spec.input.path, spec.input.storage_options, spec.input.shard_format)
    return all(store.scan(shard.id, repair=False).done for shard in shards)


def refuse_if_active(spec: JobSpec, store: OutputStore) -> None:
    """Raise ExecutorError if a Slurm array recorded in this output is still queued or running."""
    job_id = active_job(store)
    if job_id is not None:
        raise ExecutorError(
            f"Slurm job {job_id} is still queued or running on this output ({store.url}); a second "
            f"submit would write the same shards. Watch it with `squeue -j {job_id}` or "
            f"`batchrun status SPEC`; stop it with `scancel {job_id}` first if you mean to restart."
        )


def submit(spec: JobSpec, spec_path: str, options: SubmitOptions) -> int:
    """`batchrun submit` on Slurm: the preflight, then the array submitted (its job id on stdout); with
    --dry-run the sbatch script is printed instead. Returns the exit code."""
    if options.dry_run:
        click.echo(render_script(spec, spec_path))
        return 0
    code = preflight(spec, spec_path)
    if code:
        return code
    store = OutputStore.for_output(spec.output)
    if all_done(spec, store):
        click.echo(f"nothing to do: every shard of {spec.output.path} is done", err=True)
        return 0
    try:
        job_id = submit_array(spec, spec_path, store)
    except ExecutorError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_FAILED
    click.echo(job_id)
    click.echo(
        f"Submitted Slurm array job {job_id} ({spec.runtime.slurm.tasks} tasks). Watch it with "
        f"`squeue -j {job_id}` and `batchrun status {spec_path}`; logs: {spec.runtime.slurm.log}",
        err=True,
    )
    return 0


def submit_array(spec: JobSpec, spec_path: str | Path, store: OutputStore) -> str:
    """Submit SPEC's array with sbatch, record the job id in the output, return it.

    Raises ExecutorError if sbatch is missing or refuses, or if this output's array is still alive.
    """
    refuse_if_active(spec, store)
    if shutil.which("sbatch") is None:
        raise ExecutorError(
            "runtime.executor is slurm but `sbatch` is not on PATH: run `batchrun submit` on a Slurm "
            "login node, or pass --executor local to run here"
        )
    Path(spec.runtime.slurm.log).parent.mkdir(parents=True, exist_ok=True)  # sbatch won't create it
    proc = subprocess.run(
        ["sbatch", "--parsable"], input=render_script(spec, spec_path), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise ExecutorError(f"sbatch refused the job: {proc.stderr.strip()} (see the script with --dry-run)")
    job_id = proc.stdout.strip().split(";")[0]
    store.write_json(
        RECORD, {"job_id": job_id, "tasks": spec.runtime.slurm.tasks, "submitted_at": time.time()}
    )
    return job_id
