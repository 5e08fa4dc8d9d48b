"""Which shards this task owns, and the run fingerprint that a resume must match."""

from __future__ import annotations

import hashlib
from typing import Any

from jobs.spec import JobSpec
from runner.sources import Shard


def assign_shards(shards: list[Shard], task_index: int, num_tasks: int) -> list[Shard]:
    """Round-robin over the sorted listing: stable across requeues and resubmits of the same input."""
    assert 0 <= task_index < num_tasks
    return [s for i, s in enumerate(shards) if i % num_tasks == task_index]


def run_fingerprint(spec: JobSpec, model_fingerprint: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Everything that changes what a row's output would be; a resume must match it exactly."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "model": {**model_fingerprint, "revision": spec.model.revision},
        "tokenizer": {
            "vocab_size": len(tokenizer),
            "eos_token": tokenizer.eos_token,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
        },
        "prompt": spec.prompt.model_dump(mode="json"),
        "sampling": spec.sampling.model_dump(mode="json"),
        "input": spec.input.model_dump(mode="json", exclude={"storage_options"}),
        "output": spec.output.model_dump(
            mode="json", include={"format", "compression", "keep_columns", "include_token_ids"}
        ),
    }
