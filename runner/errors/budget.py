"""The error budget: a job whose rows are mostly errors stops instead of finishing as a job of errors.

One bad row must not stop a job of a million good ones, and a job of only bad rows must never report
success. Error rows are of two kinds, judged apart, each over the rows it can happen to:

- input errors (no prompt could be made: an unreadable or empty value, a missing field, a template
  error, a prompt too long): they finish at once, long before the rows around them finish generating,
  so they are judged over the rows *read* so far (errors and rows sent to the model alike), never over
  the rows finished; `max_input_fraction` of them are allowed (dirty data: a few empty prompts);
- generation errors (a row that reached the model and failed there: its grammar could not end): judged
  over the rows that finished generating; `max_fraction` of them are allowed.

Each kind stops the job once

    errors > max_fraction * max(rows, min(window, rows_total))

(`rows` what that kind is judged over), so a run of errors at the start stops the job after a few rows
(the first `window` rows can no longer come back under the limit), long before a shard of them is
complete, and a job shorter than the window stops before its last row is committed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from runner.errors.reasons import error_reason


class ErrorBudgetExceeded(Exception):
    """Too many error rows; the message names the dominant reason, its shard and an example."""


@dataclass(slots=True)
class ErrorBudget:
    """Counts input rows as they are read and finish; `input_error` and `generated` raise
    ErrorBudgetExceeded when a budget is spent (after the row is counted: it is committed as usual)."""

    max_fraction: float  # of the rows that finished generating (runtime.max_error_fraction)
    max_input_fraction: float  # of the rows read (runtime.max_input_error_fraction)
    window: int  # rows judged together at the start
    rows_total: int  # rows this attempt has to do
    read: int = 0  # rows read: sent to the model, or an input error
    input_errors: int = 0
    generated: int = 0  # rows that finished generating
    generation_errors: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, tuple[str, str]] = field(default_factory=dict)  # reason -> (shard, error)

    @property
    def errors(self) -> int:
        return self.input_errors + self.generation_errors

    def sent(self) -> None:
        """One row went to the model."""
        self.read += 1

    def input_error(self, shard: str, error: str) -> None:
        """One row that never reached the model: an error row."""
        self.read += 1
        self.input_errors += 1
        self._count(shard, error)
        if self._over(self.input_errors, self.read, self.max_input_fraction):
            what = (
                f"{self.input_errors} of the {self.read} rows read are input errors (no prompt could be made)"
            )
            raise ErrorBudgetExceeded(self.message(what, "max_input_error_fraction", self.max_input_fraction))

    def finished(self, shard: str, error: str | None) -> None:
        """One row finished generating (`error`: its error text, None for a good row)."""
        self.generated += 1
        if error is None:
            return
        self.generation_errors += 1
        self._count(shard, error)
        if self._over(self.generation_errors, self.generated, self.max_fraction):
            what = f"{self.generation_errors} of the {self.generated} rows generated are error rows"
            raise ErrorBudgetExceeded(self.message(what, "max_error_fraction", self.max_fraction))

    def _count(self, shard: str, error: str) -> None:
        reason = error_reason(error)
        self.reasons[reason] += 1
        self.examples.setdefault(reason, (shard, error))

    def _over(self, errors: int, rows: int, max_fraction: float) -> bool:
        return max_fraction < 1 and errors > max_fraction * max(rows, min(self.window, self.rows_total))

    def message(self, what: str, knob: str, limit: float) -> str:
        reason, n = self.reasons.most_common(1)[0]
        shard, example = self.examples[reason]
        return (
            f"stopped: {what}, over runtime.{knob} {limit:g} (judged over the first {self.window} rows and "
            f"all rows since); {self.errors} error rows in all. Most common ({n} rows): {reason}; e.g. shard "
            f"{shard}: {example}. Every committed row is kept and the job is not done: fix the cause and run "
            f"again (a changed spec needs --force-new-run), or raise runtime.{knob} if these errors are "
            "expected."
        )
