"""One worker: the task (or, on a node of several GPU groups, its share of the task, executors/node.py)
that one engine generates in this process: lease, fingerprint check, plan, the pipeline, summary.

    lease the task → resolve the model, check the fingerprint → plan the shards → run the pipeline
    (runner/pipeline.py: the loop under a monitor and the stop signals) → write the summary (report.json)

A stop signal ends admission; finished rows are committed within `runtime.grace_seconds` and the
job exits with `JobInterrupted`; running the same command again finishes exactly what is missing.
"""

from __future__ import annotations

import logging
import time

from jobs.history import TaskHistory, error_location, report_name
from jobs.lease import TaskLease
from jobs.plan import assign_shards, input_columns, plan_work, run_fingerprint
from jobs.spec.job import JobSpec, PromptSpec, SamplingSpec, SpecError
from runner.io.sources import list_shards
from runner.models.resolve import ResolvedModel
from runner.pipeline import (
    LoopSettings,
    OutputRows,
    PipelineSettings,
    PromptConfig,
    PromptSetupError,
    clear_stale_temps,
    open_model,
    run_pipeline,
    start_process,
)
from runner.store import OutputStore
from runner.telemetry.attempts import attempt_of, summary_from_report, with_history
from runner.telemetry.monitor import Counters
from runner.telemetry.phases import Phases
from runner.telemetry.progress import Summary

log = logging.getLogger(__name__)


class JobInterrupted(Exception):
    """A stop signal ended the job early; everything finished was committed."""

    def __init__(self, signum: int, summary: Summary):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
        self.summary = summary


class JobFailed(Exception):
    """Some shards could not be read, a worker died, or the error budget was spent; what finished is
    committed."""

    def __init__(self, summary: Summary):
        failures = summary.failed_shards | summary.failed_workers
        reasons = [f"{s}: {why}" for s, why in failures.items()]
        super().__init__("; ".join(reasons + ([summary.stopped] if summary.stopped else [])))
        self.summary = summary


class EngineFailed(JobFailed):
    """The engine raised mid-run (a GPU fault such as an illegal memory access, or a bug): the job stopped
    at once, every row finished before it is committed, and a rerun finishes the rest."""

    def __init__(self, summary: Summary, reason: str):
        Exception.__init__(self, reason)
        self.summary = summary
        self.reason = reason


def run_worker(
    spec: JobSpec, *, force_new_run: bool = False, show_progress: bool = True, phases: Phases | None = None
) -> Summary:
    """Run (or resume) task `runtime.task_index` of `runtime.num_tasks` with one engine in this process;
    returns the summary, also in report.json.

    `phases`: the start-up phases this process went through already (default: from its start to now,
    as "launch"); the job adds its own. Raises JobInterrupted after a stop signal, JobFailed if a
    shard could not be read, FingerprintMismatch if the output belongs to a different run, LeaseHeld
    if another live job is running this task on the same output.
    """
    if phases is None:
        phases = Phases()
        phases.done("launch")
    start_process(spec.engine.device, phases)
    store = OutputStore.for_output(spec.output)
    rt = spec.runtime
    # Ray runs a task again as soon as its node died, maybe on another node: wait out the dead lease
    with TaskLease(store.fs, store.root, rt.task_index, rt.num_tasks, wait_for_expiry=rt.executor == "ray"):
        return _run_leased(spec, store, force_new_run, show_progress, phases)


def open_checked_model(
    spec: JobSpec, store: OutputStore, force_new_run: bool, phases: Phases
) -> tuple[ResolvedModel, object]:
    """Resolve the model and record (or check) the run's fingerprint in the output; returns the model
    and its tokenizer (loaded once, at `model.revision`, for the fingerprint and the backend). Marks
    the phases resolve_model, tokenizer (transformers' import included) and fingerprint."""
    model, tokenizer = open_model(spec.model.path, spec.model.revision, spec.model.storage_options, phases)
    store.check_fingerprint(run_fingerprint(spec, model.fingerprint, tokenizer), force_new_run)
    phases.done("fingerprint")
    return model, tokenizer


def pipeline_settings(spec: JobSpec, model: ResolvedModel, tokenizer) -> PipelineSettings:
    """What the task's pipeline needs from the spec, as plain values; settings that cannot work with
    this model are spec errors (raised when the pipeline starts)."""
    out, rt = spec.output, spec.runtime
    return PipelineSettings(
        model=spec.model.path,
        local_path=model.local_path,
        revision=spec.model.revision,
        backend=spec.engine.backend,
        engine=spec.engine.config(),
        prompt=prompt_config(spec.prompt, spec.sampling, tokenizer),
        sampling=spec.sampling.params(),
        output=OutputRows(
            out.keep_columns, spec.input.id_column, spec.sampling.n, out.include_token_ids, out.parse_json
        ),
        openai_batch=spec.input.model_mismatch if spec.openai_batch else None,
        loop=LoopSettings(
            max_inflight=spec.engine.max_inflight or 4 * spec.engine.max_seqs,
            grace_seconds=rt.grace_seconds,
            flush_rows=out.flush_rows,
            flush_seconds=out.flush_seconds,
            max_held_bytes=int(rt.max_held_bytes),
            storage_options=spec.input.storage_options,
            columns=input_columns(spec),
            max_error_fraction=rt.max_error_fraction,
            max_input_error_fraction=rt.max_input_error_fraction,
            error_window_rows=rt.error_window_rows,
        ),
        task_index=rt.task_index,
        num_tasks=rt.num_tasks,
        heartbeat_seconds=rt.heartbeat_seconds,
    )


def prompt_config(prompt: PromptSpec, sampling: SamplingSpec, tokenizer) -> PromptConfig:
    """The prompt section as the prompt builder takes it, for this model's tokenizer."""
    return PromptConfig(
        column=prompt.column,
        template=prompt.template,
        messages_column=prompt.messages_column,
        uses_chat_template=prompt.uses_chat_template(bool(getattr(tokenizer, "chat_template", None))),
        system=prompt.system,
        max_tokens=prompt.max_tokens,
        on_too_long=prompt.on_too_long,
        overrides_column=sampling.overrides_column,
    )


def _run_leased(
    spec: JobSpec, store: OutputStore, force_new_run: bool, show_progress: bool, phases: Phases
) -> Summary:
    started = time.monotonic()
    rt = spec.runtime
    model, tokenizer = open_checked_model(spec, store, force_new_run, phases)
    shards = assign_shards(
        list_shards(spec.input.path, spec.input.storage_options, spec.input.shard_format),
        rt.task_index,
        rt.num_tasks,
    )
    # a report killed mid-write too: a run with nothing to do writes none to replace its temp file
    clear_stale_temps(
        store, [s.id for s in shards], rt.task_index, rt.num_tasks, report_name(rt.task_index, rt.num_tasks)
    )
    work, done_shards, failed = plan_work(store, shards, spec.input.storage_options)
    history = TaskHistory(store, spec, shards)
    phases.done("plan")
    counters = Counters(
        shards_owned=len(shards),
        shards_done=done_shards,
        rows_total=sum(w.total_rows - len(w.done_rows) for w in work),
    )
    if not work and not failed:
        log.info("all %d shards of this task are done already; nothing to do", len(shards))
        if history.previous:  # the report of the runs that did the work stays as it is
            return summary_from_report(history.previous)
        return _summarize(
            store, spec, "finished", counters, started, None, {}, {}, history=None, phases=phases.seconds
        )

    try:
        result = run_pipeline(
            pipeline_settings(spec, model, tokenizer),
            tokenizer,
            store,
            work,
            failed,
            counters,
            [sh.id for sh in shards],
            show_progress,
        )
    except PromptSetupError as e:
        raise SpecError(str(e)) from None
    phases.add_marks(result.startup)
    summary = _summarize(
        store, spec, result.state, counters, started, result.gpu_busy, result.failed, result.engine_stats,
        history=history, started_at=result.started_at, stopped=result.over_budget,
        error_shards=result.error_shards, phases=phases.seconds,
    )  # fmt: skip
    if result.engine_error:
        raise EngineFailed(summary, result.engine_error)
    if result.over_budget:
        raise JobFailed(summary)
    if result.signum is not None:
        raise JobInterrupted(result.signum, summary)
    if result.failed:
        raise JobFailed(summary)
    return summary


def _summarize(
    store: OutputStore,
    spec: JobSpec,
    status: str,
    c: Counters,
    started: float,
    gpu_busy: float | None,
    failed: dict[str, str],
    engine_stats: dict,
    *,
    history: TaskHistory | None,
    started_at: float = 0.0,
    stopped: str | None = None,
    error_shards: set[str] | None = None,
    phases: dict[str, float],
) -> Summary:
    """This attempt's summary with every earlier attempt added in, written to report.json (not for a
    run with nothing to do: `history` None)."""
    wall, now = time.monotonic() - started, time.time()
    summary = Summary(
        status=status,
        shards=c.shards_owned,
        shards_done=c.shards_done,
        rows_ok=c.rows_done - c.rows_error,
        rows_error=c.rows_error,
        rows_remaining=c.rows_total - c.rows_done,
        prompt_tokens=c.prompt_tokens,
        generated_tokens=c.generated_tokens,
        wall_seconds=round(wall, 3),
        generated_tokens_per_s=c.tokens_per_s(now),
        generation_seconds=round(c.generation_seconds(now), 3),
        gpu_busy_percent=gpu_busy,
        failed_shards=failed,
        engine=engine_stats,
        stopped=stopped,
        phases=phases,
    )
    if history is None:
        return summary
    previous = history.previous or {}
    shards = set(previous.get("error_files", {})) | (error_shards or set())
    summary = with_history(summary, attempt_of(summary, started_at), previous)
    summary.error_files = {s: error_location(store, s) for s in sorted(shards)}
    store.write_json(history.name, summary.as_dict())
    return summary
