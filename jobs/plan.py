"""Which shards this task owns and what is left of them, the columns it reads, and the run
fingerprint that a resume must match."""

from __future__ import annotations

import hashlib
import logging
import string
from typing import Any

from jobs.spec.job import JobSpec
from runner.feeder import ShardWork
from runner.io.sources import InputError, Shard, count_rows
from runner.store import OutputStore

log = logging.getLogger(__name__)


def assign_shards(shards: list[Shard], task_index: int, num_tasks: int) -> list[Shard]:
    """Round-robin over the sorted listing: stable across requeues and resubmits of the same input."""
    assert 0 <= task_index < num_tasks
    return [s for i, s in enumerate(shards) if i % num_tasks == task_index]


def run_fingerprint(spec: JobSpec, model_fingerprint: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Everything that changes what a row's output would be; a resume must match it exactly."""
    template = getattr(tokenizer, "chat_template", None) or ""
    tokenizer_part = {
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
        # on by default for a model with a chat template: what applied, not only the spec's setting
        "chat_template_applied": spec.prompt.uses_chat_template(bool(template)),
    }
    return {**spec_fingerprint(spec, model_fingerprint), "tokenizer": tokenizer_part}


def spec_fingerprint(spec: JobSpec, model_fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The run fingerprint less its tokenizer part: what the spec and the model's files alone decide
    (known without loading the tokenizer, so without importing transformers or torch)."""
    return {
        "model": {**model_fingerprint, "revision": spec.model.revision},
        "prompt": spec.prompt.model_dump(mode="json"),
        "sampling": spec.sampling.model_dump(mode="json"),
        "input": spec.input.model_dump(mode="json", exclude={"storage_options"}),
        "output": spec.output.model_dump(
            mode="json", include={"format", "compression", "keep_columns", "include_token_ids"}
        ),
    }


def plan_work(
    store: OutputStore, shards: list[Shard], storage_options: dict
) -> tuple[list[ShardWork], int, dict[str, str]]:
    """The shards still to do with their committed rows; shards already done; unreadable shards."""
    work, done, failed = [], 0, {}
    for shard in shards:
        progress = store.scan(shard.id)
        if progress.done:
            done += 1
            continue
        try:
            total = count_rows(shard, storage_options)
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


def input_columns(spec: JobSpec) -> list[str] | None:
    """The input fields the job reads (None: all of them, for keep_columns: all)."""
    if spec.output.keep_columns == "all" or spec.openai_batch:  # a request line is read whole
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
