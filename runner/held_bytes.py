"""A byte bound on the input values held between reading a row and committing its output.

Kept input columns travel with their row from the feeder's queue through the engine's in-flight
rows to the writer's buffer and pending commits. Counts bound each of those stages; `HeldBytes`
bounds all of them together by the size of the values: the feeder acquires a batch's bytes before
queueing it (waiting while the bound is reached) and the writer releases a row's bytes once its
part is committed.
"""

from __future__ import annotations

import threading
from typing import Any


class HeldBytes:
    """Bytes of row values held by the job, at most `limit` (one batch may exceed it when none are held)."""

    def __init__(self, limit: int):
        assert limit > 0
        self.limit = limit
        self._held = 0
        self._waiting = False
        self._changed = threading.Condition()

    @property
    def held(self) -> int:
        return self._held

    @property
    def waiting(self) -> bool:
        """Whether a reader waits for room (then rows buffered for a part should be committed)."""
        return self._waiting

    def acquire(self, n: int, stop: threading.Event) -> bool:
        """Hold `n` more bytes, waiting until they fit; False (nothing held) if `stop` is set first."""
        with self._changed:
            while self._held and self._held + n > self.limit:
                if stop.is_set():
                    self._waiting = False
                    return False
                self._waiting = True
                self._changed.wait(timeout=0.1)
            self._waiting = False
            self._held += n
            return True

    def release(self, n: int) -> None:
        """Give back `n` bytes (rows committed, or dropped)."""
        with self._changed:
            self._held -= n
            assert self._held >= 0, "released more bytes than were held"
            self._changed.notify_all()


def value_bytes(value: Any) -> int:
    """About how many bytes `value` (a row's values: str, bytes, numbers, lists, dicts) holds."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return sum(value_bytes(k) + value_bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(map(value_bytes, value))
    return 8
