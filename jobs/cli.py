"""`batchrun`: a thin shell over jobs.spec.job, jobs.task (one task), jobs.executors (local, slurm,
ray) and jobs.status."""

from __future__ import annotations

import json
import logging
import sys
from typing import get_args

import click
from click.core import ParameterSource

from jobs.spec.job import JobSpec, RuntimeSpec, SpecError, load_spec
from jobs.task import EXIT_BAD_SPEC, EXIT_FAILED, with_tasks

EXIT_CODES = (
    "Exit codes: 0 done; 1 failed (unreadable shards, too many error rows, a dead worker; what finished "
    "is committed); 2 bad spec (or a preflight problem: nothing was run); 75 stopped early by a signal "
    "(everything finished is committed: run the same command again)."
)


def _load(path: str, task_index: int | None, num_tasks: int | None) -> JobSpec:
    try:
        spec = load_spec(path)
    except SpecError as e:
        click.echo(str(e), err=True)
        sys.exit(EXIT_BAD_SPEC)
    if task_index is None and num_tasks is None:
        return spec
    source = click.get_current_context().get_parameter_source("task_index")
    given = "JOB_COMPLETION_INDEX" if source is ParameterSource.ENVIRONMENT else "--task-index"
    try:
        return with_tasks(spec, task_index, num_tasks, given)
    except SpecError as e:
        click.echo(str(e), err=True)
        sys.exit(EXIT_BAD_SPEC)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("batchrun-llm")
    except PackageNotFoundError:
        return "unknown (not installed)"


@click.group()
@click.version_option(_version(), "--version", prog_name="batchrun", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="More log output: -v debug (info is the default).")
@click.option("-q", "--quiet", count=True, help="Less log output: -q warnings and errors, -qq errors only.")
def main(verbose: int, quiet: int) -> None:
    """batchrun: offline batch inference over Parquet/JSONL shards, resumable, exactly once."""
    level = logging.INFO + 10 * (min(quiet, 2) - min(verbose, 1))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger().setLevel(level)  # also where logging was configured before (an embedding app)
    for noisy in ("httpx", "urllib3", "botocore", "s3fs", "fsspec", "ContinuousBatchingLogger"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@main.command()
@click.argument("spec_path", metavar="SPEC")
def validate(spec_path: str) -> None:
    """Check SPEC, its inputs' first rows, the output location and the model path (no model is
    loaded, nothing goes to the network for a local path); print the spec with every default filled
    in; exit 2 on problems, all listed at once."""
    spec = _load(spec_path, None, None)
    _preflight(spec, spec_path)
    click.echo(json.dumps(spec.model_dump(mode="json", by_alias=True), indent=2))
    click.echo(f"{spec_path}: OK", err=True)


def _preflight(spec: JobSpec, spec_path: str) -> None:
    from jobs.executors.base import preflight

    if code := preflight(spec, spec_path):
        sys.exit(code)


def _check_output_path(spec: JobSpec, spec_path: str) -> None:
    from jobs.executors.base import check_output_path

    if code := check_output_path(spec, spec_path):
        sys.exit(code)


def _run(
    spec_path: str, task_index: int | None, num_tasks: int | None, force_new_run: bool, progress: bool
) -> None:
    from jobs.task import run_task

    spec = _load(spec_path, task_index, num_tasks)
    result = run_task(spec, spec_path, force_new_run=force_new_run, progress=progress)
    if result.exit_code:
        sys.exit(result.exit_code)


_task_opts = [
    click.option("--num-tasks", type=int, default=None, help="Number of tasks (overrides runtime)."),
    click.option(
        "--force-new-run",
        is_flag=True,
        help="Discard this output's progress from an earlier, different run and start over.",
    ),
    click.option("--progress/--no-progress", default=True, help="Show the progress bar."),
]


def _with_task_opts(index_envvar: str | None = None):
    """--task-index (read from `index_envvar` when not given), --num-tasks, --force-new-run, --progress."""
    index = click.option(
        "--task-index",
        type=int,
        default=None,
        envvar=index_envvar,
        help="This task's index (overrides runtime)."
        + (f" Default: ${index_envvar} when set (a Kubernetes Indexed Job)." if index_envvar else ""),
    )

    def wrap(f):
        for opt in reversed([index, *_task_opts]):
            f = opt(f)
        return f

    return wrap


@main.command(epilog=EXIT_CODES)
@click.argument("spec_path", metavar="SPEC")
@_with_task_opts()
@click.option(
    "--executor",
    type=click.Choice(get_args(RuntimeSpec.model_fields["executor"].annotation)),
    default=None,
    help="Run here, as a Slurm array or as Ray tasks (overrides runtime.executor).",
)
@click.option("--dry-run", is_flag=True, help="Print the sbatch script instead of submitting it.")
def submit(
    spec_path: str, task_index, num_tasks, force_new_run: bool, progress: bool, executor, dry_run: bool
) -> None:
    """Run the job described by SPEC: here in the foreground, as a Slurm array, or as Ray tasks (waited
    for); again to resume."""
    from jobs.executors import executor as executor_named
    from jobs.executors.base import SubmitOptions

    spec = _load(spec_path, None, None)
    name = executor or spec.runtime.executor
    chosen = executor_named(name)
    if not chosen.TASK_OPTIONS and (task_index is not None or num_tasks is not None or force_new_run):
        click.echo(
            f"--task-index, --num-tasks and --force-new-run apply to local runs; for {chosen.TITLE} set "
            f"runtime.{name}.tasks (and use a new output.path to start over)",
            err=True,
        )
        sys.exit(EXIT_BAD_SPEC)
    if dry_run and not chosen.DRY_RUN:
        click.echo("--dry-run prints the sbatch script: add --executor slurm", err=True)
        sys.exit(EXIT_BAD_SPEC)
    options = SubmitOptions(task_index, num_tasks, force_new_run, progress, dry_run)
    if code := chosen.submit(spec, spec_path, options):
        sys.exit(code)


@main.command(epilog=EXIT_CODES)
@click.argument("inputs", metavar="IN...", nargs=-1, required=True)
@click.option(
    "--model", required=True, help="The model: a local Hugging Face folder, .gguf file, hub id or URL."
)
@click.option("--output", required=True, help="The output directory; the job's spec is written there.")
@click.option(
    "--force-new-run", is_flag=True, help="Discard this output's progress from an earlier, different run."
)
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
def batch(inputs: tuple[str, ...], model: str, output: str, force_new_run: bool, progress: bool) -> None:
    """Run OpenAI Batch API request files IN... (.jsonl, .jsonl.gz, .jsonl.zst; globs) with MODEL into
    OUTPUT, as OpenAI output lines. The equivalent spec is written to OUTPUT/spec.yaml: `batchrun status`
    and `batchrun submit` take it (to resume, or on Slurm with --executor slurm)."""
    from jobs.batch import write_batch_spec

    try:
        spec_path = str(write_batch_spec(list(inputs), model, output))
    except SpecError as e:
        click.echo(str(e), err=True)
        sys.exit(EXIT_BAD_SPEC)
    click.echo(f"spec: {spec_path} (`batchrun status {spec_path}` shows progress)", err=True)
    click.get_current_context().invoke(
        submit, spec_path=spec_path, task_index=None, num_tasks=None, force_new_run=force_new_run,
        progress=progress, executor="local", dry_run=False,
    )  # fmt: skip


@main.command(epilog=EXIT_CODES)
@click.argument("spec_path", metavar="SPEC")
@_with_task_opts(index_envvar="JOB_COMPLETION_INDEX")
def run(spec_path: str, task_index, num_tasks, force_new_run: bool, progress: bool) -> None:
    """Run one task of SPEC in this process (what each task of a cluster job runs)."""
    _run(spec_path, task_index, num_tasks, force_new_run, progress)


@main.command()
@click.argument("spec_path", metavar="SPEC")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(spec_path: str, as_json: bool) -> None:
    """Show each shard's state (done / partial / pending) and error rows, read from the output; and the
    Slurm array's or Ray tasks' state where the job was submitted there."""
    from jobs.executors import RECORDING, executor
    from jobs.status import job_status

    spec = _load(spec_path, None, None)
    _check_output_path(spec, spec_path)
    report = job_status(spec)
    clusters = {name: executor(name).status(spec) for name in RECORDING}
    if as_json:
        as_dicts = {name: s and s.as_dict() for name, s in clusters.items()}
        click.echo(json.dumps({**report.as_dict(), **as_dicts}, indent=2))
        return
    click.echo("\n".join(report.lines() + [line for s in clusters.values() if s for line in s.lines()]))


@main.command()
@click.argument("spec_path", metavar="SPEC")
@click.option(
    "-o",
    "--out",
    "out_path",
    default=None,
    help="Where to write the PNG (default: <output>/_batchrun/report.png).",
)
def report(spec_path: str, out_path: str | None) -> None:
    """Plot throughput and GPU busy over time and rows per shard into a PNG (needs matplotlib)."""
    from jobs.report import ReportUnavailable, render_png
    from runner.store import OutputStore

    spec = _load(spec_path, None, None)
    _check_output_path(spec, spec_path)
    try:
        png = render_png(spec)
    except ReportUnavailable as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FAILED)
    if out_path:
        with open(out_path, "wb") as f:
            f.write(png)
    else:
        OutputStore.for_output(spec.output).write_state("report.png", png)
        out_path = f"{spec.output.path.rstrip('/')}/_batchrun/report.png"
    click.echo(out_path)


@main.command()
@click.argument("model", required=False)
@click.option("--revision", default=None, help="The model's revision (with MODEL).")
def models(model: str | None, revision: str | None) -> None:
    """List the `model_type`s the engine's fast path runs (the rest run on transformers' continuous
    batching); with MODEL (any model.path a spec takes: builtin:NAME, a folder, a .gguf file, a hub id or
    a folder URL; only its config is read), say which path it takes and why."""
    if model is None:
        from runner.engine.families import FAMILY_CLASSES

        for kind, (module, _) in FAMILY_CLASSES.items():
            click.echo(f"{kind:<12} fast path ({module.rsplit('.', 1)[-1]}.py)")
        click.echo("anything else: the transformers backend")
        return
    from runner.models.resolve import ModelError, resolve_model

    try:
        resolved = resolve_model(model, revision)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolved.local_path, revision=revision)
    except ModelError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD_SPEC)
    except (OSError, ValueError) as e:  # transformers' messages span lines: one line here
        click.echo(f"error: cannot read the config of {model!r}: {' '.join(str(e).split())}", err=True)
        sys.exit(EXIT_BAD_SPEC)
    from runner.engine.models import fast_path_reason

    reason = fast_path_reason(config)
    kind = getattr(config, "model_type", None)
    click.echo(f"{kind}: fast path" if reason is None else f"{kind}: transformers backend ({reason})")


if __name__ == "__main__":
    main()
