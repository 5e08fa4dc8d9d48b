"""Where a job's tasks run, each executor behind the same interface (`base.Executor`).

local.py   here: one worker process per GPU of this node (also what each cluster task runs)
slurm.py   a Slurm array, one element per task, requeued when preempted
ray.py     Ray tasks on a cluster, waited for
Kubernetes needs no executor: an Indexed Job runs `batchrun run` per index (scripts/k8s/).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.executors.base import Executor
    from jobs.spec.job import JobSpec
    from runner.store import OutputStore

# the executors that record a submission in the output (`batchrun status` shows theirs)
RECORDING = ("slurm", "ray")


def executor(name: str) -> Executor:
    """The executor called `name` (`runtime.executor`: local, slurm or ray)."""
    return importlib.import_module(f"jobs.executors.{name}")


def refuse_if_any_active(spec: JobSpec, store: OutputStore) -> None:
    """Raise ExecutorError while a submission recorded in this output is still queued or running."""
    for name in RECORDING:
        executor(name).refuse_if_active(spec, store)
