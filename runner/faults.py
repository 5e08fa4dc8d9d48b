"""Test-only kill points, to kill a job at moments that timing alone can't reach, and fault points.

`BATCHRUN_KILL_AT=<point>[:<n>]` makes the n-th (default first) call of `kill_point(<point>)` in
this process SIGKILL the process itself. Unset (always, outside tests) this is a dict lookup.
`BATCHRUN_FAULT_AT=<point>[:<n>]` makes the n-th call of `fault_point(<point>)` raise
`InjectedDeviceError`, as a GPU fault (an illegal memory access) raises out of an engine step.
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


class InjectedDeviceError(RuntimeError):
    """What a fault point raises: stands for a CUDA error out of the engine."""


_fault = ["", 0]  # point, calls left


def fault_point(name: str) -> None:
    """Raise InjectedDeviceError here if BATCHRUN_FAULT_AT names this point and its count is reached."""
    if name != _fault[0]:
        return
    _fault[1] -= 1
    if _fault[1] == 0:
        raise InjectedDeviceError(
            f"CUDA error: an illegal memory access was encountered (injected at {name})"
        )


def _arm_fault(spec: str) -> None:
    point, _, nth = spec.partition(":")
    _fault[:] = [point, int(nth or 1)]


arm(os.environ.get("BATCHRUN_KILL_AT", ""))
_arm_fault(os.environ.get("BATCHRUN_FAULT_AT", ""))
