"""Test-only kill points, to kill a job at moments that timing alone can't reach.

`BATCHRUN_KILL_AT=<point>[:<n>]` makes the n-th (default first) call of `kill_point(<point>)` in
this process SIGKILL the process itself. Unset (always, outside tests) this is a dict lookup.
The torture harness (scripts/torture.py) forks its jobs from one warm process and so arms them with
`arm()` instead of the environment, and counts the points a whole run passes with `count_points()`.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_point = ""
_remaining = 0
_counts: Counter[str] | None = None


def arm(spec: str) -> None:
    """Kill this process at the n-th call of `kill_point(point)`; spec is `<point>[:<n>]` ("" disarms)."""
    global _point, _remaining
    _point, _, nth = spec.partition(":")
    _remaining = int(nth or 1)


def count_points() -> Counter[str]:
    """Start counting the calls of each kill point in this process; returns the live counter."""
    global _counts
    _counts = Counter()
    return _counts


def kill_point(name: str) -> None:
    """SIGKILL this process here if BATCHRUN_KILL_AT names this point and its count is reached."""
    global _remaining
    if _counts is not None:
        _counts[name] += 1
    if name != _point:
        return
    _remaining -= 1
    if _remaining == 0:
        os.kill(os.getpid(), signal.SIGKILL)


arm(os.environ.get("BATCHRUN_KILL_AT", ""))
