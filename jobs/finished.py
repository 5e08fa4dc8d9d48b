"""A task with nothing to do, answered from the output alone: before torch, the tokenizer or a GPU.

A cron slot, a requeued Slurm task or a second `batchrun submit` of a finished job asks the output:
are all of this task's shards done, did its last attempt end cleanly, and is the run recorded there
this spec's run? If so, the report of the attempts that did the work is the answer, and nothing is
written. Anything less certain (a shard not done, leftover parts, the lease of a killed or running
attempt, no recorded run, a fingerprint that differs) goes the full way, which repairs, clears what a
killed attempt left, resumes, or refuses with the whole fingerprint diff.
"""

from __future__ import annotations

import json
import logging

from jobs.history import report_name
from jobs.lease import lease_path
from jobs.plan import assign_shards, spec_fingerprint
from jobs.spec.job import JobSpec
from runner.io.retry import StorageError
from runner.io.sources import InputError, list_shards
from runner.models.resolve import ModelError, resolve_model
from runner.store import OutputStore
from runner.telemetry.attempts import summary_from_report
from runner.telemetry.progress import Summary

log = logging.getLogger(__name__)


def finished_summary(spec: JobSpec) -> Summary | None:
    """This task's summary when every one of its shards is done and the output's recorded run matches
    `spec` (the report of the runs that did the work; zeros where a task has no report of its own);
    None when there is anything to do or to check, which the full run then does."""
    store = OutputStore.for_output(spec.output)
    rt = spec.runtime
    if store.fs.exists(lease_path(store.root, rt.task_index, rt.num_tasks)):
        return None  # a killed attempt's (its heartbeat temps and report need the full run) or a live one's
    try:
        listing = list_shards(spec.input.path, spec.input.storage_options, spec.input.shard_format)
        shards = assign_shards(listing, rt.task_index, rt.num_tasks)
        if not all(_cleanly_done(store, s.id) for s in shards) or not _same_run(spec, store):
            return None
    except (InputError, ModelError, StorageError):  # the full run's preflight reports these, with the fix
        return None
    log.info("all %d shards of this task are done already; nothing to do", len(shards))
    report = store.read_json(report_name(rt.task_index, rt.num_tasks))
    if report is not None:
        return summary_from_report(report)
    return Summary("finished", len(shards), len(shards), 0, 0, 0, 0, 0, 0.0, 0.0, None, {}, {})


def _cleanly_done(store: OutputStore, shard_id: str) -> bool:
    """The shard's final file exists and no parts are left beside it (a kill during compaction's
    clean-up leaves some: the full run removes them)."""
    return store.scan(shard_id, repair=False).done and not store.fs.exists(store.parts_dir(shard_id))


def _same_run(spec: JobSpec, store: OutputStore) -> bool:
    """The recorded run fingerprint agrees with `spec` and the model's files on every part but the
    tokenizer's (which comes with the model's files)."""
    recorded = store.read_json("run.json")
    if recorded is None:
        return False
    model = resolve_model(spec.model.path, spec.model.revision, spec.model.storage_options)
    mine = json.loads(json.dumps(spec_fingerprint(spec, model.fingerprint), default=str))
    return all(recorded.get(k) == v for k, v in mine.items())
