"""Where an attempt's start-up time goes, phase by phase, from the process's own start.

The phases are contiguous: each one runs from the end of the one before (the first from the moment
the process started, read from /proc), so together they add up to the time from the command's start
to the last one, the first generated token. A job marks its own phases (imports, the model's
fingerprint, planning and resume scans); the backend hands over its timestamps (CUDA init, model
load, engine build, graph captures, first token) as plain `{phase: time.monotonic() at its end}`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def process_start() -> float:
    """When this process started, on the `time.monotonic()` clock (now where /proc is not there)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return time.monotonic()
    started_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command's name
    age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - max(0.0, age)


class Phases:
    """Seconds spent in each start-up phase of one attempt, in the order they ran."""

    def __init__(self, origin: float | None = None) -> None:
        """`origin`: when the first phase began (default: when the process started)."""
        self._last = process_start() if origin is None else origin
        self.seconds: dict[str, float] = {}

    def done(self, name: str, at: float | None = None) -> None:
        """Close phase `name`: it ran from the end of the previous phase until `at` (default: now)."""
        at = time.monotonic() if at is None else at
        self.seconds[name] = round(self.seconds.get(name, 0.0) + max(0.0, at - self._last), 3)
        self._last = max(self._last, at)

    def add_marks(self, marks: dict[str, float]) -> None:
        """Close the phases of `marks` ({phase: monotonic time at its end}), in their order."""
        for name, at in marks.items():
            self.done(name, at)


def summed(per_attempt: list[dict[str, float]]) -> dict[str, float]:
    """Each phase's seconds added up over attempts (what the job paid for it in all), in first-seen order."""
    out: dict[str, float] = {}
    for phases in per_attempt:
        for name, seconds in phases.items():
            out[name] = round(out.get(name, 0.0) + seconds, 3)
    return out


# the order phases run in (report.json stores them sorted by name); a node's workers' come after its own
ORDER = (
    "launch", "count_gpus", "imports", "resolve_model", "tokenizer", "fingerprint", "start_workers", "plan",
    "cuda_init", "model_load", "engine_build", "graph_capture", "first_token",
)  # fmt: skip


def describe(phases: dict[str, float]) -> str:
    """`phases` in the order they run, as a summary line's words: `launch 0.3 s, imports 2.1 s, ...
    (9.4 s in all)`."""

    def rank(name: str) -> tuple[bool, int]:
        base = name.removeprefix("worker_")
        return base != name, ORDER.index(base) if base in ORDER else len(ORDER)

    words = ", ".join(f"{name} {phases[name]:.1f} s" for name in sorted(phases, key=rank))
    return f"{words} ({sum(phases.values()):.1f} s in all)"
