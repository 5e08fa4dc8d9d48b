"""The job: shards in, rows through the engine, committed parts out, shards compacted.

    plan the work → feed prompts (thread) → step the engine → hand rows to the writer (thread)

A stop signal ends admission; finished rows are committed within `runtime.grace_seconds` and the
job exits with `JobInterrupted`; running the same command again finishes exactly what is missing.
"""

from __future__ import annotations

import logging
import string
import time
from dataclasses import dataclass, field

from jobs.checkpoint import OutputStore
from jobs.history import TaskHistory, error_location
from jobs.lease import TaskLease
from jobs.plan import assign_shards, run_fingerprint
from jobs.spec import JobSpec
from jobs.uploads import sweep_stale_uploads
from runner.attempts import attempt_of, summary_from_report, with_history
from runner.backends import load_backend
from runner.budget import HeldBytes
from runner.cpu_threads import configure_cpu_threads, cuda_available
from runner.engine.types import Completion, Request
from runner.error_budget import ErrorBudget, ErrorBudgetExceeded
from runner.faults import fault_point, kill_point
from runner.feeder import Feeder, ShardEnd, ShardFailed, ShardWork
from runner.memory import return_freed_buffers_to_os
from runner.models import ResolvedModel, load_tokenizer, resolve_model
from runner.monitor import Counters, Monitor, clear_heartbeat_temps
from runner.progress import ProgressBar, Summary
from runner.prompts import PreparedRow, PromptBuilder
from runner.signals import StopRequested
from runner.sources import InputError, count_rows, list_shards
from runner.writer import PartWriter

log = logging.getLogger(__name__)

DRAIN_SHARE = 0.5  # of the grace period spent finishing in-flight rows; the rest is for commits


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


@dataclass(slots=True)
class _InFlight:
    prep: PreparedRow
    samples: dict[int, Completion] = field(default_factory=dict)


def run_job(spec: JobSpec, *, force_new_run: bool = False, show_progress: bool = True) -> Summary:
    """Run (or resume) this task's share of the job; returns the summary, also in report.json.

    Raises JobInterrupted after a stop signal, JobFailed if a shard could not be read,
    FingerprintMismatch if the output belongs to a different run, LeaseHeld if another live job
    is running this task on the same output.
    """
    return_freed_buffers_to_os()
    if spec.engine.device == "cpu" or not cuda_available():
        configure_cpu_threads()
    store = OutputStore.for_output(spec.output)
    with TaskLease(store.fs, store.root, spec.runtime.task_index, spec.runtime.num_tasks):
        return _run_leased(spec, store, force_new_run, show_progress)


def check_run(spec: JobSpec, store: OutputStore, force_new_run: bool) -> tuple[ResolvedModel, object]:
    """Resolve the model and record (or check) the run's fingerprint in the output; returns the model
    and its tokenizer (loaded once, at `model.revision`, for the fingerprint and the backend)."""
    model = resolve_model(spec.model.path, spec.model.revision, spec.model.storage_options)
    tokenizer = load_tokenizer(model.local_path, spec.model.revision)
    store.check_fingerprint(run_fingerprint(spec, model.fingerprint, tokenizer), force_new_run)
    return model, tokenizer


def _run_leased(spec: JobSpec, store: OutputStore, force_new_run: bool, show_progress: bool) -> Summary:
    started = time.monotonic()
    shards = assign_shards(
        list_shards(spec.input.path, spec.input.storage_options, spec.input.format),
        spec.runtime.task_index,
        spec.runtime.num_tasks,
    )
    sweep_stale_uploads(store, [s.id for s in shards], spec.runtime.task_index, spec.runtime.num_tasks)
    model, tokenizer = check_run(spec, store, force_new_run)
    rt = spec.runtime
    clear_heartbeat_temps(store, rt.task_index, rt.num_tasks)
    work, done_shards, failed = _plan(store, spec, shards)
    history = TaskHistory(store, spec, shards)
    counters = Counters(
        shards_owned=len(shards),
        shards_done=done_shards,
        rows_total=sum(w.total_rows - len(w.done_rows) for w in work),
    )
    if not work and not failed:
        log.info("all %d shards of this task are done already; nothing to do", len(shards))
        if history.previous:  # the report of the runs that did the work stays as it is
            return summary_from_report(history.previous)
        return _summarize(store, spec, "finished", counters, started, None, {}, {}, history=None)

    backend = load_backend(model.local_path, spec.engine, spec.model.revision, tokenizer)
    job = _Job(spec, backend, work, failed, counters)
    monitor = Monitor(
        store,
        rt.task_index,
        rt.num_tasks,
        [sh.id for sh in shards],
        counters,
        backend.stats,
        rt.heartbeat_seconds,
    )
    state, over_budget = "failed", None
    try:
        with StopRequested() as stop, monitor:
            try:
                job.run(store, stop, show_progress)
            except ErrorBudgetExceeded as e:
                over_budget = str(e)
        engine_stats = backend.stats()
        state = (
            "interrupted" if stop.requested else "failed" if job.failed or job.engine_error else "finished"
        )
        state = "failed" if over_budget else state
    finally:
        monitor.finish(state)
        _close_backend(backend, job.engine_error)
    summary = _summarize(
        store, spec, state, counters, started, monitor.gpu_busy_mean(), job.failed, engine_stats,
        history=history, started_at=monitor.started, stopped=over_budget, error_shards=job.error_shards,
    )  # fmt: skip
    if job.engine_error:
        raise EngineFailed(summary, job.engine_error)
    if over_budget:
        raise JobFailed(summary)
    if stop.requested:
        raise JobInterrupted(stop.signum, summary)
    if job.failed:
        raise JobFailed(summary)
    return summary


def _close_backend(backend, engine_error: str | None) -> None:
    """Close the backend; after an engine failure a device error may raise again here: log it only."""
    try:
        backend.close()
    except Exception as e:
        if engine_error is None:
            raise
        log.warning("closing the engine after its failure: %s: %s", type(e).__name__, e)


def input_columns(spec: JobSpec) -> list[str] | None:
    """The input fields the job reads (None: all of them, for keep_columns: all)."""
    if spec.output.keep_columns == "all":
        return None
    p = spec.prompt
    names = [p.column, p.messages_column, spec.input.id_column, spec.sampling.overrides_column]
    if p.template:
        names += [
            field.split(".")[0].split("[")[0]
            for _, field, _, _ in string.Formatter().parse(p.template)
            if field
        ]
    names += spec.output.keep_columns
    return list(dict.fromkeys(n for n in names if n))


def _plan(store: OutputStore, spec: JobSpec, shards) -> tuple[list[ShardWork], int, dict[str, str]]:
    """The shards still to do with their committed rows; shards already done; unreadable shards."""
    work, done, failed = [], 0, {}
    for shard in shards:
        progress = store.scan(shard.id)
        if progress.done:
            done += 1
            continue
        try:
            total = count_rows(shard, spec.input.storage_options)
        except InputError as e:
            log.error("shard %s cannot be read: %s", shard.id, e)
            failed[shard.id] = str(e)
            continue
        work.append(ShardWork(shard, progress.rows, total))
    log.info(
        "%d shards: %d done, %d to do (%d rows left)",
        len(shards),
        done,
        len(work),
        sum(w.total_rows - len(w.done_rows) for w in work),
    )
    return work, done, failed


class _Job:
    """The main loop's state: what is in flight in the engine, and where finished rows go."""

    def __init__(
        self, spec: JobSpec, backend, work: list[ShardWork], failed: dict[str, str], counters: Counters
    ):
        self.spec = spec
        self.backend = backend
        self.work = work
        self.inflight: dict[tuple[str, int], _InFlight] = {}
        self.max_inflight = spec.engine.max_inflight or 4 * spec.engine.max_seqs
        self.failed = failed
        self.counters = counters
        self.budget = HeldBytes(spec.runtime.max_held_bytes)
        self.engine_error: str | None = None  # what the engine raised; the job stopped there
        rt = spec.runtime
        self.errors = ErrorBudget(rt.max_error_fraction, rt.error_window_rows, counters.rows_total)
        self.error_shards: set[str] = set()
        self.writer: PartWriter
        self.bar: ProgressBar

    def run(self, store: OutputStore, stop: StopRequested, show_progress: bool) -> None:
        spec = self.spec
        builder = PromptBuilder(
            spec.prompt, spec.sampling, self.backend.tokenizer, self.backend.max_model_len
        )
        self.writer = PartWriter(store, spec.output.flush_rows, spec.output.flush_seconds, self.budget)
        for w in self.work:
            self.writer.open_shard(w.shard.id, len(w.done_rows))
        feeder = Feeder(self.work, builder, spec.input.storage_options, input_columns(spec), self.budget)
        self.bar = ProgressBar(self.counters, show_progress)
        try:
            self._loop(feeder, stop)
        finally:
            feeder.stop()
            self.bar.close()
            self.writer.close()
            self.counters.shards_done += self.writer.counts.shards_compacted

    def _loop(self, feeder: Feeder, stop: StopRequested) -> None:
        drain_until = None
        while True:
            if stop.requested and drain_until is None:
                feeder.stop()
                drain_until = stop.at + DRAIN_SHARE * self.spec.runtime.grace_seconds
            if drain_until is None:
                self._admit(feeder)
            if self.backend.has_unfinished():
                try:
                    done = self._step()
                except Exception as e:  # a GPU fault leaves nothing of the engine usable: stop, commit
                    self.engine_error = f"{type(e).__name__}: {e}"
                    log.error("the engine failed (%s); committing the %d rows finished so far",
                              self.engine_error, self.counters.rows_done)  # fmt: skip
                    return
                for completion in done:
                    self._finish_sample(completion)
            elif feeder.exhausted:
                return
            elif self.budget.waiting:
                self.writer.flush()  # nothing generating and the reader waits for room: commit the rows
            self.writer.poll()
            if drain_until is not None and time.monotonic() > drain_until:
                log.warning(
                    "grace period: %d rows still generating are left for the next run", len(self.inflight)
                )
                return

    def _step(self) -> list[Completion]:
        fault_point("engine_step")
        return self.backend.step()

    def _admit(self, feeder: Feeder) -> None:
        """Top up the engine to `max_inflight` requests; wait for input only when the engine is idle."""
        while self.backend.num_unfinished < self.max_inflight:
            item = feeder.get(timeout=0 if self.backend.has_unfinished() else 0.05)
            if item is None:
                break
            if isinstance(item, ShardEnd):
                self.writer.shard_total(item.shard, item.total_rows)
            elif isinstance(item, ShardFailed):
                self.counters.rows_total -= self._rows_of(item.shard)
                self.failed[item.shard] = item.reason
            elif item.error is not None:
                self._emit(item, [self._row(item, error=item.error)], is_error=True)
            else:
                self.inflight[(item.shard, item.row)] = _InFlight(item)
                self.backend.add(Request((item.shard, item.row), item.prompt_ids, item.sampling))
        self.counters.inflight = self.backend.num_unfinished

    def _finish_sample(self, c: Completion) -> None:
        entry = self.inflight[c.id]
        entry.samples[c.sample_index] = c
        if len(entry.samples) < entry.prep.sampling.n:
            return
        del self.inflight[c.id]
        rows = [self._row(entry.prep, completion=entry.samples[i]) for i in range(entry.prep.sampling.n)]
        self._emit(entry.prep, rows, is_error=False)

    def _emit(self, prep: PreparedRow, rows: list[dict], is_error: bool) -> None:
        self.errors.add(prep.shard, rows[0]["error"] if is_error else None)  # raises before a commit
        if is_error:
            self.error_shards.add(prep.shard)
        self.writer.add(prep.shard, rows, is_error, prep.nbytes)
        kill_point("row_finished")
        c = self.counters
        c.rows_done += 1
        c.rows_error += is_error
        c.prompt_tokens += rows[0]["prompt_tokens"]
        c.generated_tokens += sum(r["generated_tokens"] for r in rows)
        self.bar.update()

    def _rows_of(self, shard: str) -> int:
        return next(w.total_rows - len(w.done_rows) for w in self.work if w.shard.id == shard)

    def _row(self, prep: PreparedRow, completion: Completion | None = None, error: str | None = None) -> dict:
        values = prep.values or {}
        keep = self.spec.output.keep_columns
        kept = dict(values) if keep == "all" else {c: values.get(c) for c in keep}
        if self.spec.input.id_column:
            kept[self.spec.input.id_column] = values.get(self.spec.input.id_column)
        row = {**kept, "_shard": prep.shard, "_row": prep.row}
        if self.spec.sampling.n > 1:
            row["_sample"] = completion.sample_index if completion else 0
        if completion is None:
            row |= {
                "generated_text": None,
                "finish_reason": "error",
                "prompt_tokens": len(prep.prompt_ids or ()),
                "generated_tokens": 0,
                "error": error,
            }
            if self.spec.output.include_token_ids:
                row["generated_token_ids"] = None
            return row
        row |= {
            "generated_text": completion.text,
            "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens,
            "generated_tokens": completion.generated_tokens,
            "error": None,
        }
        if self.spec.output.include_token_ids:
            row["generated_token_ids"] = completion.token_ids
        return row


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
) -> Summary:
    """This attempt's summary with every earlier attempt added in, written to report.json (not for a
    run with nothing to do: `history` None)."""
    wall = time.monotonic() - started
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
        generated_tokens_per_s=round(c.generated_tokens / max(wall, 1e-9), 1),
        gpu_busy_percent=gpu_busy,
        failed_shards=failed,
        engine=engine_stats,
        stopped=stopped,
    )
    if history is None:
        return summary
    previous = history.previous or {}
    shards = set(previous.get("error_files", {})) | (error_shards or set())
    summary = with_history(summary, attempt_of(summary, started_at), previous, history.killed)
    summary.error_files = {s: error_location(store, s) for s in sorted(shards)}
    store.write_json(history.name, summary.as_dict())
    return summary
