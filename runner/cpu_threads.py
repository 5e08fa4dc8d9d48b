"""Thread counts for the CPU path, from the CPUs this process may actually use.

torch sizes its pools from the machine's cores, not from the process' affinity mask or its cgroup
quota (a container, a Slurm allocation), and the tokenizer adds a pool of its own: more threads than
CPUs, and every small op's fork/join waits for a thread that is not running.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU limit in CPUs (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_cpu_threads() -> int:
    """Size torch's intra-op pool to the usable CPUs, its inter-op pool to one thread, and keep the
    tokenizer single-threaded (it tokenizes on the feeder thread, beside the model). Returns the count.

    An explicit OMP_NUM_THREADS / TOKENIZERS_PARALLELISM from the user wins.
    """
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = int(os.environ.get("OMP_NUM_THREADS") or usable_cpus())
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # settable only before the first inter-op work
        torch.set_num_interop_threads(1)
    log.info("CPU threads: %d (of %d cores on this machine)", threads, os.cpu_count() or 1)
    return threads
