"""What `batchrun submit` and `batchrun status` ask of an executor (local, Slurm, Ray): one interface.

An executor is a module of jobs/executors/ with the calls of `Executor`. `submit` runs or submits
the job and returns the exit code of `batchrun submit`; `status` is its part of `batchrun status`
(None when this output was never submitted there); `refuse_if_active` raises `ExecutorError` while
a submission it recorded in the output is still queued or running, so that two never write the
same shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import click

if TYPE_CHECKING:
    from jobs.spec.job import JobSpec
    from runner.store import OutputStore


class ExecutorError(Exception):
    """The executor can't take the job (its tool is missing or refused it, or the job is already
    queued or running); the message says what to do."""


class ExecutorStatus(Protocol):
    """An executor's state of a submitted job: lines for `batchrun status`, a dict for its --json."""

    def as_dict(self) -> dict: ...

    def lines(self) -> list[str]: ...


@dataclass(slots=True, frozen=True)
class SubmitOptions:
    """`batchrun submit`'s options besides the spec and the executor."""

    task_index: int | None = None
    num_tasks: int | None = None
    force_new_run: bool = False
    progress: bool = True
    dry_run: bool = False


class Executor(Protocol):
    """Where a job's tasks run: each module of jobs/executors/ (local, slurm, ray) provides these."""

    TITLE: str  # the executor's name in messages
    TASK_OPTIONS: bool  # whether --task-index, --num-tasks and --force-new-run apply
    DRY_RUN: bool  # whether --dry-run applies (it prints what would be submitted)

    def submit(self, spec: JobSpec, spec_path: str, options: SubmitOptions) -> int: ...

    def status(self, spec: JobSpec) -> ExecutorStatus | None: ...

    def refuse_if_active(self, spec: JobSpec, store: OutputStore) -> None: ...


def preflight(spec: JobSpec, spec_path: str) -> int:
    """0 when SPEC passes the preflight; else its problems are printed and the exit code is 2."""
    from jobs.task import EXIT_BAD_SPEC, preflight_message

    problems = preflight_message(spec, spec_path)
    if problems:
        click.echo(problems, err=True)
        return EXIT_BAD_SPEC
    return 0


def check_output_path(spec: JobSpec, spec_path: str) -> int:
    """0 when SPEC's output path can be used; else the problem is printed and the exit code is 2."""
    from jobs.preflight import output_path_problem
    from jobs.task import EXIT_BAD_SPEC

    problem = output_path_problem(spec)
    if problem:
        click.echo(f"{spec_path}: {problem}", err=True)
        return EXIT_BAD_SPEC
    return 0
