"""One task of a job, as `batchrun run` runs it (and so each Slurm array task and each Ray task).

A task with nothing to do is answered from the output (no torch, no GPU); otherwise the preflight runs,
then the task on every worker of the node (jobs.executors.node). The summary and what to do next go to
stderr; the outcome is an exit code: 0 done, 1 failed, 2 bad spec or preflight problem, 75 stopped by
a signal with every finished row committed (run it again for the rest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from jobs.spec.job import JobSpec, SpecError

if TYPE_CHECKING:
    from runner.telemetry.progress import Summary

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_BAD_SPEC = 2
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped early, everything finished is committed; run again


@dataclass(slots=True, frozen=True)
class TaskResult:
    """How a task ended: its exit code, and its summary where it got far enough to have one."""

    exit_code: int
    summary: Summary | None = None


def with_tasks(spec: JobSpec, task_index: int | None, num_tasks: int | None, given: str) -> JobSpec:
    """SPEC with --task-index / --num-tasks applied (`given`: how the index was given, for the message);
    SpecError when the index is out of range."""
    if task_index is None and num_tasks is None:
        return spec
    runtime = spec.runtime.model_copy(
        update={k: v for k, v in (("task_index", task_index), ("num_tasks", num_tasks)) if v is not None}
    )
    if runtime.task_index >= runtime.num_tasks:
        raise SpecError(f"{given} {runtime.task_index} must be < --num-tasks {runtime.num_tasks}")
    return spec.model_copy(update={"runtime": runtime})


def preflight_message(spec: JobSpec, spec_path: str) -> str | None:
    """Every preflight problem of SPEC, one per line, for the user; None when there is none."""
    from jobs.preflight import format_problems, preflight

    problems = preflight(spec)
    return format_problems(problems, spec_path) if problems else None


def run_task(
    spec: JobSpec,
    spec_path: str,
    *,
    force_new_run: bool = False,
    progress: bool = True,
    started: float | None = None,
) -> TaskResult:
    """Run (or resume) task `runtime.task_index` of `runtime.num_tasks` of SPEC in this process and its
    workers; print the summary and what to do next (naming SPEC_PATH); exit codes: module docstring.
    `started`: when the task began, on the time.monotonic() clock (default: when this process did)."""
    from jobs.executors.node import run_workers
    from jobs.finished import finished_summary
    from jobs.lease import LeaseHeld
    from jobs.worker import EngineFailed, JobFailed, JobInterrupted
    from runner.io.retry import StorageError
    from runner.io.sources import InputError
    from runner.models.resolve import ModelError
    from runner.prompts import PromptTooLong
    from runner.store import CheckpointError, FingerprintMismatch
    from runner.telemetry.phases import Phases

    try:
        summary = None if force_new_run else finished_summary(spec)  # nothing to do: no torch, no GPU
        if summary is None:
            problems = preflight_message(spec, spec_path)
            if problems:
                _echo([problems])
                return TaskResult(EXIT_BAD_SPEC)
            phases = Phases(origin=started)
            summary = run_workers(spec, force_new_run=force_new_run, show_progress=progress, phases=phases)
    except KeyboardInterrupt:  # Ctrl-C while the model loads, or twice while finished rows are committed
        _echo(
            [f"Stopped at once; every row committed so far is kept. Run `batchrun submit {spec_path}` again."]
        )
        return TaskResult(EXIT_INTERRUPTED)
    except JobInterrupted as e:
        again = f"Run `batchrun submit {spec_path}` again to finish the rest."
        _echo([*e.summary.lines(), f"Stopped early; every finished row is committed. {again}"])
        return TaskResult(EXIT_INTERRUPTED, e.summary)
    except JobFailed as e:
        reason = e.reason if isinstance(e, EngineFailed) else None
        _echo(e.summary.lines() + _failure_hints(e.summary, reason, spec_path))
        return TaskResult(EXIT_FAILED, e.summary)
    except (ModelError, SpecError) as e:  # found once the model resolved: a spec problem all the same
        _echo([f"error: {e}"])
        return TaskResult(EXIT_BAD_SPEC)
    except (FingerprintMismatch, CheckpointError, InputError, LeaseHeld, PromptTooLong, StorageError) as e:
        _echo([f"error: {e}"])
        return TaskResult(EXIT_FAILED)
    _echo(summary.lines())
    return TaskResult(EXIT_DONE, summary)


def _failure_hints(summary: Summary, engine_failure: str | None, spec_path: str) -> list[str]:
    hints = []
    if engine_failure:
        hints.append(
            f"The engine failed: {engine_failure}. Every finished row is committed; run `batchrun submit "
            f"{spec_path}` again to finish the rest."
        )
    if summary.failed_shards:
        hints.append(
            "Some shards could not be read (above); the others are done. Fix or remove them and run again."
        )
    if summary.failed_workers:
        hints.append(
            f"Some workers died (above); run `batchrun submit {spec_path}` again to finish their shards."
        )
    return hints


def _echo(lines: list[str]) -> None:
    for line in lines:
        click.echo(line, err=True)
