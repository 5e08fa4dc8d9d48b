"""Thread counts for the CPU path, from the CPUs this process may actually use.

torch sizes its pools from the machine's cores, not from the process' affinity mask, its cgroup
quota (a container, a Slurm allocation) or the other processes already keeping cores busy, and the
tokenizer adds a pool of its own: more threads than free CPUs, and every small op's fork/join waits
for a thread that is not running (the demo ran 14x slower beside one busy process on 2 cores).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
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


def busy_cpus(sample_s: float = 0.3, stat: Path = Path("/proc/stat")) -> float:
    """How many CPUs other processes keep busy now: the machine's non-idle time over `sample_s`
    seconds, taken before the job starts working (the 1-minute load average where /proc is missing)."""

    def times() -> tuple[int, int]:  # (idle incl. iowait, total) jiffies over all CPUs
        values = [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]
        return values[3] + values[4], sum(values[:8])

    try:
        idle0, total0 = times()
        time.sleep(sample_s)
        idle1, total1 = times()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
    return busy * (os.cpu_count() or 1)


def cpu_threads(usable: int, busy: float) -> int:
    """Intra-op threads for `usable` CPUs when other processes keep `busy` CPUs busy: the free ones,
    at least one."""
    return max(1, min(usable, round(usable - busy)))


def configure_cpu_threads() -> int:
    """Size torch's intra-op pool to the free usable CPUs, its inter-op pool to one thread, and keep
    the tokenizer single-threaded (it tokenizes on the feeder thread, beside the model). Returns the
    count. An explicit OMP_NUM_THREADS / TOKENIZERS_PARALLELISM from the user wins.
    """
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    busy = busy_cpus()
    threads = int(os.environ.get("OMP_NUM_THREADS") or cpu_threads(usable_cpus(), busy))
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # settable only before the first inter-op work
        torch.set_num_interop_threads(1)
    log.info(
        "CPU threads: %d (%d usable CPUs, %.1f kept busy by other processes, %d cores on this machine)",
        threads, usable_cpus(), busy, os.cpu_count() or 1,
    )  # fmt: skip
    return threads
