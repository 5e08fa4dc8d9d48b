"""What a task's earlier attempts left: its report, and the heartbeat of one killed outright.

Read when an attempt starts, before its monitor replaces the heartbeat; `runner/telemetry/attempts.py` adds
this attempt to them.
"""

from __future__ import annotations

from jobs.spec.job import JobSpec
from runner.io.sources import Shard, count_rows
from runner.io.storage import is_local
from runner.store import OutputStore
from runner.telemetry.attempts import killed_attempt, with_killed
from runner.telemetry.monitor import task_name


def report_name(task_index: int, num_tasks: int) -> str:
    """The task's report under `_batchrun/`: report.json for a single task."""
    return "report.json" if num_tasks == 1 else f"report-task{task_index}.json"


class TaskHistory:
    """This task's report of earlier attempts, with the last one added if it was killed (its heartbeat
    still says "running"); read before this attempt's monitor replaces the heartbeat."""

    def __init__(self, store: OutputStore, spec: JobSpec, shards: list[Shard]):
        rt = spec.runtime
        self.name = report_name(rt.task_index, rt.num_tasks)
        self.previous = store.read_json(self.name)
        beat = store.read_json(f"progress/{task_name(rt.task_index, rt.num_tasks)}.json")

        error_shards: list[str] = []  # shards with error rows, as committed() finds them

        def committed() -> tuple[int, int]:  # (rows, error rows) in the output now
            rows = errors = 0
            for shard in shards:
                progress = store.scan(shard.id, repair=False)
                if progress.done:
                    rows += count_rows(shard, spec.input.storage_options)
                    shard_errors = store.error_count(shard.id)
                else:
                    rows, shard_errors = rows + len(progress.rows), progress.error_rows
                errors += shard_errors
                if shard_errors:
                    error_shards.append(shard.id)
            return rows, errors

        killed = killed_attempt(beat, (self.previous or {}).get("attempts", []), committed)
        if killed is not None:  # recorded now: this attempt's heartbeat replaces the killed one's
            self.previous = with_killed(self.previous, killed, len(shards))
            self.previous["error_files"] |= {s: error_location(store, s) for s in error_shards}
            store.write_json(self.name, self.previous)


def error_location(store: OutputStore, shard_id: str) -> str:
    """Where a shard's error rows are: its errors file once done, else its parts."""
    parts, _, errors = store.shard_paths(shard_id)
    if store.fs.exists(errors):
        return errors if is_local(store.fs) else store.fs.unstrip_protocol(errors)
    parts = parts if is_local(store.fs) else store.fs.unstrip_protocol(parts)
    return f"{parts} (rows with finish_reason 'error')"
