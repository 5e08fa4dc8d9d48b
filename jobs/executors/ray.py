"""Ray: run the job's tasks as Ray tasks on a cluster, wait for them, and read their state back.

Ray task i of N runs what `batchrun run SPEC --task-index i --num-tasks N` runs (jobs.task.run_task), in
the Ray worker process itself: shard i belongs to task i % N, so a task run again finds exactly its
shards and does only the rows not yet committed. Ray runs a task again, up to `runtime.ray.max_retries`
times, when its worker process or its node died, and when a signal stopped it (exit 75: every finished
row committed); a task that finished or failed (exit 1 or 2) is never run again. A worker runs one task
and exits, so the task's GPU memory goes with it.

`batchrun submit` waits for the tasks and sums them up; Ctrl-C asks them to stop (they commit their
finished rows), a second Ctrl-C leaves at once. The Ray job and task ids are recorded in
`<out>/_batchrun/ray.json`, and `batchrun status` shows each task's state while Ray still knows it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from types import ModuleType

import click

from jobs.executors.base import ExecutorError, SubmitOptions, preflight
from jobs.spec.job import JobSpec
from jobs.task import EXIT_BAD_SPEC, EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED, TaskResult, run_task
from runner.store import OutputStore
from runner.telemetry.progress import Summary

log = logging.getLogger(__name__)

TITLE = "Ray"
TASK_OPTIONS = False  # tasks are Ray tasks: runtime.ray.tasks
DRY_RUN = False
RECORD = "ray.json"
INSTALL_HINT = "pip install 'batchrun-llm[ray]'"
ENDED_STATES = frozenset({"FINISHED", "FAILED"})  # of a task in Ray's state API; the others are alive


class TaskStopped(Exception):
    """Raised by a Ray task that a signal stopped (exit 75), so that Ray runs it again."""


@dataclass(slots=True, frozen=True)
class TaskOutcome:
    """How one Ray task ended, as `batchrun submit` saw it."""

    task: int
    exit_code: int  # the task's own (0, 1, 2), 75 when it was stopped every time it ran, 1 when it died
    detail: str  # what happened, in words
    summary: Summary | None = None  # None when it died, was stopped, or failed before it had one

    def line(self) -> str:
        s = self.summary
        figures = (
            f": {s.shards_done}/{s.shards} shards done, {s.rows_ok} rows ok, {s.rows_error} error rows"
            if s
            else ""
        )
        return f"  task {self.task}: {self.detail}{figures}"


@dataclass(slots=True)
class RaySubmission:
    """The Ray job of one `batchrun submit` and how each of its tasks ended."""

    job_id: str
    address: str
    outcomes: list[TaskOutcome]

    @property
    def exit_code(self) -> int:
        """1 if a task failed for good, else 75 if one was stopped early, else 0."""
        codes = {o.exit_code for o in self.outcomes}
        if codes - {EXIT_DONE, EXIT_INTERRUPTED}:
            return EXIT_FAILED
        return EXIT_INTERRUPTED if EXIT_INTERRUPTED in codes else EXIT_DONE

    def lines(self) -> list[str]:
        finished = sum(o.exit_code == EXIT_DONE for o in self.outcomes)
        out = [f"ray job {self.job_id} at {self.address}: {finished} of {len(self.outcomes)} tasks finished"]
        return out + [o.line() for o in self.outcomes]


def import_ray() -> ModuleType:
    """The `ray` module (imported to show every task's lines, not one of lines alike), or ExecutorError
    saying how to install it."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # read when ray is imported: show every task's own lines
    try:
        import ray
    except ImportError:
        message = f"runtime.executor is ray but Ray is not installed here: {INSTALL_HINT}"
        raise ExecutorError(message) from None
    return ray


def cluster_address(spec: JobSpec) -> str:
    """runtime.ray.address, else the RAY_ADDRESS environment variable; ExecutorError if neither is set."""
    address = spec.runtime.ray.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ExecutorError(
            "runtime.executor is ray but no cluster is named: set runtime.ray.address (ray://head:10001, "
            "head:6379, or auto for the cluster started on this machine) or the RAY_ADDRESS variable"
        )
    return address


def submit(spec: JobSpec, spec_path: str, options: SubmitOptions) -> int:
    """`batchrun submit` on Ray: the preflight, then the tasks run on the cluster and waited for (Ctrl-C
    leaves them); how each ended goes to stderr. Returns the exit code."""
    from jobs.executors import refuse_if_any_active, slurm

    code = preflight(spec, spec_path)
    if code:
        return code
    store = OutputStore.for_output(spec.output)
    if slurm.all_done(spec, store):
        click.echo(f"nothing to do: every shard of {spec.output.path} is done", err=True)
        return 0
    try:
        refuse_if_any_active(spec, store)
        submission = run_tasks(spec, spec_path, store)
    except ExecutorError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        click.echo(
            "Left the Ray tasks at once; every row they committed is safe. Run "
            f"`batchrun submit {spec_path}` again to finish the rest.",
            err=True,
        )
        return EXIT_INTERRUPTED
    click.echo("\n".join(submission.lines()), err=True)
    if submission.exit_code:
        click.echo(
            f"Every row the tasks committed is kept: run `batchrun submit {spec_path}` again to finish "
            "the rest.",
            err=True,
        )
    return submission.exit_code


def run_tasks(spec: JobSpec, spec_path: str, store: OutputStore) -> RaySubmission:
    """Run SPEC's `runtime.ray.tasks` tasks on the Ray cluster, record their ids in the output, and wait
    for them. Raises ExecutorError if Ray is missing here or the cluster can't be reached."""
    ray = import_ray()
    address = cluster_address(spec)
    problem = _unreachable(address)
    if problem:
        raise ExecutorError(f"cannot reach the Ray cluster at {address}: {problem} (is it running?)")
    try:
        ray.init(address=address)
    except (ConnectionError, RuntimeError) as e:
        raise ExecutorError(f"cannot connect to the Ray cluster at {address}: {e}") from None
    try:
        settings = spec.runtime.ray
        remote = ray.remote(max_calls=1)(_ray_task)  # a worker per task: its (GPU) memory goes with it
        refs = [
            remote.options(
                name=f"batchrun task {i} of {settings.tasks}",
                num_cpus=settings.num_cpus_per_task,
                num_gpus=settings.num_gpus_per_task,
                max_retries=settings.max_retries,
                retry_exceptions=[TaskStopped],
            ).remote(_task_spec(spec, i), spec_path, logging.getLogger().level)
            for i in range(settings.tasks)
        ]
        context = ray.get_runtime_context()
        job_id = context.get_job_id()
        store.write_json(
            RECORD,
            {
                "address": address,
                "gcs_address": context.gcs_address,
                "job_id": job_id,
                "tasks": settings.tasks,
                "task_ids": [ref.task_id().hex() for ref in refs],
                "submitted_at": time.time(),
            },
        )
        log.info("ray job %s: %d tasks submitted to %s", job_id, settings.tasks, address)
        return RaySubmission(job_id, address, _wait(ray, refs, settings.max_retries))
    finally:
        ray.shutdown()


def _task_spec(spec: JobSpec, task: int) -> dict:
    """What Ray task `task` runs: SPEC as task `task` of runtime.ray.tasks, as plain values."""
    runtime = spec.runtime.model_copy(
        update={"executor": "ray", "task_index": task, "num_tasks": spec.runtime.ray.tasks}
    )
    return spec.model_copy(update={"runtime": runtime}).model_dump(mode="json", by_alias=True)


def _ray_task(spec_data: dict, spec_path: str, log_level: int) -> TaskResult:
    """One Ray task, in its Ray worker: jobs.task.run_task; a stop by a signal raises TaskStopped, for Ray
    to run the task again."""
    started = time.monotonic()  # the worker may have idled in Ray's pool since it started
    # Ray's workers ignore SIGINT, and ray.cancel raises it: let a cancel stop the task before the job's
    # own handler is in place (from then on it drains and commits, and the task raises TaskStopped)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger().setLevel(log_level)
    spec = JobSpec.model_validate(spec_data)
    result = run_task(spec, spec_path, progress=False, started=started)
    if result.exit_code == EXIT_INTERRUPTED:
        rt = spec.runtime
        raise TaskStopped(f"task {rt.task_index} of {rt.num_tasks} was stopped by a signal")
    return result


def _wait(ray: ModuleType, refs: list, max_retries: int) -> list[TaskOutcome]:
    """Each task's outcome, as they end; Ctrl-C cancels the tasks (they drain), a second one leaves."""
    index = {ref: i for i, ref in enumerate(refs)}
    outcomes: dict[int, TaskOutcome] = {}
    pending = list(refs)
    cancelled = False
    while pending:
        try:
            done, pending = ray.wait(pending, num_returns=1)
        except KeyboardInterrupt:
            if cancelled:
                raise
            log.warning(
                "stopping the Ray tasks: each commits its finished rows first (Ctrl-C again to leave now)"
            )
            for ref in pending:
                ray.cancel(ref)
            cancelled = True
            continue
        for ref in done:
            outcome = _outcome(ray, index[ref], ref, max_retries)
            log.info("ray task %d: %s", outcome.task, outcome.detail)
            outcomes[outcome.task] = outcome
    return [outcomes[i] for i in range(len(refs))]


def _outcome(ray: ModuleType, task: int, ref, max_retries: int) -> TaskOutcome:
    try:
        result: TaskResult = ray.get(ref)
    except TaskStopped:  # Ray's RayTaskError(TaskStopped) is one: each run was stopped, or it was cancelled
        return TaskOutcome(task, EXIT_INTERRUPTED, "stopped early by a signal; submit again to finish it")
    except ray.exceptions.TaskCancelledError:
        return TaskOutcome(task, EXIT_INTERRUPTED, "cancelled; submit again to finish it")
    except ray.exceptions.RayTaskError as e:  # a bug: Ray printed the traceback with the task's log
        return TaskOutcome(task, EXIT_FAILED, f"failed: {type(e.cause).__name__}: {e.cause}")
    except ray.exceptions.RayError as e:  # its worker or node died, and no retry was left
        why = (str(e).strip().splitlines() or [""])[0]
        return TaskOutcome(
            task, EXIT_FAILED, f"died with {max_retries} retries spent ({type(e).__name__}: {why})"
        )
    words = {
        EXIT_DONE: "finished",
        EXIT_FAILED: "failed (its log above says why)",
        EXIT_BAD_SPEC: "refused to start: its node's preflight failed (its log above says why)",
    }
    return TaskOutcome(task, result.exit_code, words[result.exit_code], result.summary)


def _unreachable(address: str, timeout_s: float = 2.0) -> str | None:
    """Why a `host:port` (or `ray://host:port`) address does not answer; None if it does, or if it is
    no host:port (`auto`). Ray itself would retry an unreachable cluster for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        return e.strerror or str(e)
    return None


@dataclass(slots=True, frozen=True)
class RayTaskState:
    """One Ray task as Ray's state API reports it (its latest attempt)."""

    task: int
    state: str  # Ray's: PENDING_NODE_ASSIGNMENT, RUNNING, FINISHED, FAILED, ...
    attempts: int
    error: str | None  # why the latest attempt failed, in Ray's words (WORKER_DIED, ...)


@dataclass(slots=True)
class RayStatus:
    """The recorded Ray job and, while Ray can tell, each task's state."""

    job_id: str
    address: str
    tasks: int
    states: list[RayTaskState] | None  # None: Ray could not be asked (`unknown` says why)
    unknown: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        head = f"ray job {self.job_id} at {self.address} ({self.tasks} tasks)"
        if self.states is None:
            return [f"{head}: state unknown ({self.unknown})"]
        out = [head + ":"]
        for t in self.states:
            error = f"  last error {t.error}" if t.error else ""
            out.append(f"  task {t.task:<4} {t.state:<24} attempts {t.attempts}{error}")
        return out


def status(spec: JobSpec) -> RayStatus | None:
    """The Ray side of `batchrun status`; None if this output was never submitted to Ray."""
    record = OutputStore.for_output(spec.output).read_json(RECORD)
    if record is None:
        return None
    status = RayStatus(record["job_id"], record["address"], record["tasks"], None)
    try:
        import_ray()
    except ExecutorError:
        status.unknown = f"Ray is not installed here: {INSTALL_HINT}"
        return status
    problem = _unreachable(record["gcs_address"])
    if problem:
        status.unknown = f"Ray at {record['gcs_address']} does not answer: {problem}"
        return status
    try:
        status.states = _task_states(record)
    except Exception as e:  # whatever Ray raises, status still shows the shards
        status.unknown = f"Ray's state API failed: {type(e).__name__}: {e}"
    return status


def refuse_if_active(spec: JobSpec, store: OutputStore) -> None:
    """Raise ExecutorError if a Ray job recorded in this output still has a task queued or running (as far
    as Ray can tell from here)."""
    ray = status(spec)
    if ray and ray.states and any(t.state not in ENDED_STATES for t in ray.states):
        raise ExecutorError(
            f"Ray job {ray.job_id} at {ray.address} is still running on this output "
            f"({spec.output.path}); a second submit would write the same shards. Watch it with `batchrun "
            "status SPEC`; stop it with Ctrl-C on its `batchrun submit` first if you mean to restart."
        )


def _task_states(record: dict) -> list[RayTaskState]:
    from ray.util.state import list_tasks

    attempts = list_tasks(
        address=record["gcs_address"],
        filters=[("job_id", "=", record["job_id"])],
        limit=10_000,
        timeout=30,
        raise_on_missing_output=False,
    )
    task_of = {task_id: i for i, task_id in enumerate(record["task_ids"])}
    latest: dict[int, object] = {}
    for a in attempts:
        i = task_of.get(a.task_id)
        if i is not None and (i not in latest or a.attempt_number > latest[i].attempt_number):
            latest[i] = a
    return [RayTaskState(i, a.state, a.attempt_number + 1, a.error_type) for i, a in sorted(latest.items())]
