"""Test-only kill points, to kill a job at moments that timing alone can't reach.

`BATCHRUN_KILL_AT=<point>[:<n>]` makes the n-th (default first) call of `kill_point(<point>)` in
this process SIGKILL the process itself. Unset (always, outside tests) this is a dict lookup.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("BATCHRUN_KILL_AT", "")
_point, _, _nth = _spec.partition(":")
_remaining = int(_nth or 1)


def kill_point(name: str) -> None:
    """SIGKILL this process here if BATCHRUN_KILL_AT names this point and its count is reached."""
    global _remaining
    if name != _point:
        return
    _remaining -= 1
    if _remaining == 0:
        os.kill(os.getpid(), signal.SIGKILL)
