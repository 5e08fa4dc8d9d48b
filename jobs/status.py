"""`batchrun status`: where a job stands, read from its output alone (safe while the job runs)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from jobs.lease import process_alive
from jobs.spec.job import JobSpec
from runner.errors.reasons import error_reason
from runner.io.sources import count_rows, list_shards
from runner.store import OutputStore


@dataclass(slots=True)
class ShardStatus:
    shard: str
    state: str  # "done" | "partial" | "pending"
    rows_total: int
    rows_committed: int
    error_rows: int | None  # None: not counted (a done shard's errors live in its final file)


@dataclass(slots=True)
class TaskStatus:
    task: str  # "task-<i>-of-<n>"
    # "running" | "stale" (no heartbeat for 3 intervals) | "dead" (its process on this host is gone)
    # | "finished" | "interrupted" | "failed"
    state: str
    host: str
    pid: int
    heartbeat_age_s: float
    rows_done: int
    rows_inflight: float  # the work done on the rows in flight, in rows
    rows_total: int
    rows_error: int
    tokens_per_s: float  # Counters.tokens_per_s: generated tokens per second of generation
    rows_per_s: float
    gpu_busy_percent: float | None


@dataclass(slots=True)
class JobStatus:
    output: str
    fingerprint_recorded: bool
    shards: list[ShardStatus] = field(default_factory=list)
    tasks: list[TaskStatus] = field(default_factory=list)
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    eta_seconds: float | None = None
    last_report: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        counts = {s: sum(1 for x in self.shards if x.state == s) for s in ("done", "partial", "pending")}
        total = sum(s.rows_total for s in self.shards)
        committed = sum(s.rows_committed for s in self.shards)
        errors = sum(s.error_rows or 0 for s in self.shards)
        out = [f"output {self.output}" + ("" if self.fingerprint_recorded else " (no run started yet)")]
        for s in self.shards:
            detail = f"{s.rows_committed}/{s.rows_total} rows"
            if s.error_rows:
                detail += f", {s.error_rows} error rows"
            out.append(f"  {s.state:<8} {s.shard}  {detail}")
        for t in self.tasks:
            busy = "" if t.gpu_busy_percent is None else f", GPU {t.gpu_busy_percent:.0f}%"
            inflight = (
                f" (+{t.rows_inflight:.1f} in flight)" if t.state == "running" and t.rows_inflight else ""
            )
            out.append(
                f"  {t.task}: {t.state} on {t.host} (pid {t.pid}), heartbeat {t.heartbeat_age_s:.0f} s ago, "
                f"{t.rows_done}/{t.rows_total} rows this attempt{inflight}, {t.tokens_per_s:.0f} tok/s{busy}"
            )
        out.append(
            f"{len(self.shards)} shards: {counts['done']} done, {counts['partial']} partial, "
            f"{counts['pending']} pending; {committed}/{total} rows committed, {errors} error rows"
        )
        if self.eta_seconds is not None:
            out.append(f"ETA {_duration(self.eta_seconds)} at the running tasks' current rate")
        for reason, n in sorted(self.errors_by_reason.items(), key=lambda kv: -kv[1]):
            out.append(f"  {n} x {reason}")
        if self.last_report:  # while a task runs, the report is of the attempts before it
            r = self.last_report
            last = "earlier attempts" if any(t.state == "running" for t in self.tasks) else "last run"
            out.append(f"{last}: {r.get('status')}, {r.get('generated_tokens_per_s')} generated tok/s")
        return out


def job_status(spec: JobSpec) -> JobStatus:
    """Each shard's state (done / partial / pending), each task's heartbeat, errors by reason, ETA."""
    store = OutputStore.for_output(spec.output)
    status = JobStatus(
        spec.output.path, store.read_json("run.json") is not None, last_report=store.read_json("report.json")
    )
    reasons: Counter[str] = Counter()
    for shard in list_shards(spec.input.path, spec.input.storage_options, spec.input.shard_format):
        progress = store.scan(shard.id, repair=False)
        total = count_rows(shard, spec.input.storage_options)
        reasons.update(map(error_reason, store.error_reasons(shard.id)))
        if progress.done:
            status.shards.append(ShardStatus(shard.id, "done", total, total, store.error_count(shard.id)))
            continue
        state = "partial" if progress.rows else "pending"
        status.shards.append(ShardStatus(shard.id, state, total, len(progress.rows), progress.error_rows))
    status.errors_by_reason = dict(reasons)
    status.tasks = [_task_status(store, name) for name in store.list_state("progress")]
    rate = sum(t.rows_per_s for t in status.tasks if t.state == "running")
    remaining = sum(s.rows_total - s.rows_committed for s in status.shards)
    if rate > 0 and remaining:
        status.eta_seconds = round(remaining / rate, 1)
    return status


def _task_status(store: OutputStore, name: str) -> TaskStatus:
    beat = store.read_json(f"progress/{name}")
    age = max(0.0, time.time() - beat["updated_at"])
    state = beat["state"]
    if state == "running" and process_alive(beat["host"], beat["pid"]) is False:
        state = "dead"  # killed on this host: no need to wait for the heartbeat to age
    elif state == "running" and age > 3 * beat["interval_s"]:
        state = "stale"
    c = beat["counters"]
    return TaskStatus(
        name.removesuffix(".json"),
        state,
        beat["host"],
        beat["pid"],
        round(age, 1),
        c["rows_done"],
        round(c.get("inflight_progress", 0.0), 2),  # heartbeats before it had none
        c["rows_total"],
        c["rows_error"],
        beat["tokens_per_s"],
        beat["rows_per_s"],
        beat["gpu_busy_percent"],
    )


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
