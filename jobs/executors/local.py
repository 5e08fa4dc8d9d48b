"""Here: the job's task run in this process, on every GPU of this node (jobs.executors.node)."""

from __future__ import annotations

import click

from jobs.executors.base import ExecutorError, ExecutorStatus, SubmitOptions, check_output_path
from jobs.spec.job import JobSpec, SpecError
from jobs.task import EXIT_BAD_SPEC, EXIT_FAILED, run_task, with_tasks
from runner.store import OutputStore

TITLE = "local"
TASK_OPTIONS = True
DRY_RUN = False


def submit(spec: JobSpec, spec_path: str, options: SubmitOptions) -> int:
    """`batchrun submit` here: refused while a Slurm or Ray submission of this output still runs, else
    the task runs in the foreground (again: it resumes). Returns the exit code."""
    from jobs.executors import refuse_if_any_active

    code = check_output_path(spec, spec_path)
    if code:
        return code
    try:
        refuse_if_any_active(spec, OutputStore.for_output(spec.output))
    except ExecutorError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_FAILED
    try:
        spec = with_tasks(spec, options.task_index, options.num_tasks, "--task-index")
    except SpecError as e:
        click.echo(str(e), err=True)
        return EXIT_BAD_SPEC
    return run_task(spec, spec_path, force_new_run=options.force_new_run, progress=options.progress).exit_code


def status(spec: JobSpec) -> ExecutorStatus | None:
    """None: a local run records no submission (`batchrun status` reads its progress from the output)."""
    return None


def refuse_if_active(spec: JobSpec, store: OutputStore) -> None:
    """Nothing to refuse: a second local run of the same task is refused by its lease (jobs.lease)."""
