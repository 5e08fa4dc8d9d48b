"""The error budget: a job whose rows are mostly errors stops instead of finishing as a job of errors.

One bad row must not stop a job of a million good ones, and a job of only bad rows must never report
success. The budget allows `max_fraction` of the rows to be error rows, judged over the first
`window` rows and over every row since:

    stop once  errors > max_fraction * max(rows, window)
           or  every row so far is an error and they are the whole window (a job shorter than it)

so a run of errors at the start stops the job after a few rows (the window can no longer come back
under the limit), long before a shard of them is complete and compacted; and a small job of only
errors stops before its last row is committed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from runner.errors.reasons import error_reason


class ErrorBudgetExceeded(Exception):
    """Too many error rows; the message names the dominant reason, its shard and an example."""


@dataclass(slots=True)
class ErrorBudget:
    """Counts rows as they finish; `add` raises ErrorBudgetExceeded when the budget is spent."""

    max_fraction: float
    window: int  # rows judged together at the start
    rows_total: int  # rows this attempt has to do
    rows: int = 0
    errors: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, tuple[str, str]] = field(default_factory=dict)  # reason -> (shard, error)

    def add(self, shard: str, error: str | None) -> None:
        """Count one finished row (`error` is its error text, None for a good row)."""
        self.rows += 1
        if error is None:
            return
        self.errors += 1
        reason = error_reason(error)
        self.reasons[reason] += 1
        self.examples.setdefault(reason, (shard, error))
        if self.max_fraction >= 1:
            return
        only_errors = self.errors == self.rows == min(self.window, self.rows_total)
        if only_errors or self.errors > self.max_fraction * max(self.rows, self.window):
            raise ErrorBudgetExceeded(self.message())

    def message(self) -> str:
        reason, n = self.reasons.most_common(1)[0]
        shard, example = self.examples[reason]
        return (
            f"stopped: {self.errors} of the {self.rows} rows finished are error rows, over "
            f"runtime.max_error_fraction {self.max_fraction:g} (judged over the first {self.window} rows "
            f"and all rows since). Most common ({n} rows): {reason}; e.g. shard {shard}: {example}. "
            "Every committed row is kept and the job is not done: fix the cause and run again (a changed "
            "spec needs --force-new-run), or raise runtime.max_error_fraction if these errors are expected."
        )
