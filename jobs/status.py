"""`batchrun status`: where a job stands, read from its output alone (safe while the job runs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from jobs.checkpoint import OutputStore
from jobs.spec import JobSpec
from runner.sources import count_rows, list_shards


@dataclass(slots=True)
class ShardStatus:
    shard: str
    state: str  # "done" | "partial" | "pending"
    rows_total: int
    rows_committed: int
    error_rows: int | None  # None: not counted (a done shard's errors live in its final file)


@dataclass(slots=True)
class JobStatus:
    output: str
    fingerprint_recorded: bool
    shards: list[ShardStatus] = field(default_factory=list)
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
        out.append(
            f"{len(self.shards)} shards: {counts['done']} done, {counts['partial']} partial, "
            f"{counts['pending']} pending; {committed}/{total} rows committed, {errors} error rows"
        )
        if self.last_report:
            r = self.last_report
            out.append(f"last run: {r.get('status')}, {r.get('generated_tokens_per_s')} generated tok/s")
        return out


def job_status(spec: JobSpec) -> JobStatus:
    """Each shard's state: done (final file), partial (committed parts), pending (nothing yet)."""
    store = OutputStore(
        spec.output.path, spec.output.storage_options, spec.output.format, spec.output.compression
    )
    status = JobStatus(
        spec.output.path, store.read_json("run.json") is not None, last_report=store.read_json("report.json")
    )
    for shard in list_shards(spec.input.path, spec.input.storage_options, spec.input.format):
        progress = store.scan(shard.id, repair=False)
        total = count_rows(shard, spec.input.storage_options)
        if progress.done:
            status.shards.append(ShardStatus(shard.id, "done", total, total, store.error_count(shard.id)))
            continue
        state = "partial" if progress.rows else "pending"
        status.shards.append(ShardStatus(shard.id, state, total, len(progress.rows), progress.error_rows))
    return status
