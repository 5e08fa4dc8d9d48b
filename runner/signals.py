"""Stop signals: SIGINT, SIGTERM and SIGUSR1 (Slurm's preemption warning) ask the job to drain."""

from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequested:
    """Installed on the main thread for the job's duration. SIGTERM / SIGUSR1 (a scheduler's notice, with
    a grace period) let the rows in flight finish; Ctrl-C (SIGINT: a user waiting at the terminal) leaves
    them at the next step boundary, and a second Ctrl-C raises KeyboardInterrupt at once (mid-step)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at: float | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def drains(self) -> bool:
        """Whether the rows in flight may finish (within the grace period) before the job stops."""
        return self.signum not in (None, signal.SIGINT)

    def __enter__(self) -> StopRequested:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user wants out now
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
            rest = (
                "committing finished ones; the rows in flight stop at the next step (Ctrl-C again: at once)"
                if signum == signal.SIGINT
                else "the rows in flight finish within the grace period, then finished rows are committed"
            )
            log.warning("%s received: admitting no more rows; %s", signal.Signals(signum).name, rest)
