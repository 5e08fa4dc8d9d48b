"""What the user sees while the job runs (a tqdm bar) and after (a summary, also in report.json)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from runner.telemetry.monitor import Counters
from runner.telemetry.phases import describe


@dataclass(slots=True)
class Summary:
    """The end-of-run figures printed to the user and written to `_batchrun/report.json`."""

    status: str  # "finished" | "interrupted" | "failed"
    shards: int
    shards_done: int
    rows_ok: int
    rows_error: int
    rows_remaining: int
    prompt_tokens: int
    generated_tokens: int
    wall_seconds: float
    generated_tokens_per_s: float
    gpu_busy_percent: float | None
    failed_shards: dict[str, str]
    engine: dict
    # seconds since the first row was sent (start-up excluded): generated_tokens_per_s is over these
    generation_seconds: float = 0.0
    failed_workers: dict[str, str] = field(default_factory=dict)  # worker processes that died
    stopped: str | None = None  # why the job stopped early on its own (the error budget)
    error_files: dict[str, str] = field(default_factory=dict)  # shard -> where its error rows are
    # start-up seconds by phase (runner/telemetry/phases.py): this attempt's, summed over attempts in a report
    phases: dict[str, float] = field(default_factory=dict)
    # every attempt so far (runner/telemetry/attempts.py); rows, tokens, time and phases above are their sums
    attempts: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        busy = "n/a (no GPU)" if self.gpu_busy_percent is None else f"{self.gpu_busy_percent:.0f}%"
        over = f" over {len(self.attempts)} attempts" if len(self.attempts) > 1 else ""
        out = [
            f"{self.status}: {self.shards_done}/{self.shards} shards done, {self.rows_ok} rows ok, "
            f"{self.rows_error} error rows, {self.rows_remaining} rows remaining{over}",
            f"tokens{over}: {self.prompt_tokens} prompt, {self.generated_tokens} generated in "
            f"{self.generation_seconds:.1f} s of generation ({self.wall_seconds:.1f} s in all) = "
            f"{self.generated_tokens_per_s:.1f} generated tok/s; GPU busy {busy}",
        ]
        if len(self.attempts) > 1:
            a = self.attempts[-1]
            out.append(
                f"this attempt: {a['rows_ok']} rows ok, {a['rows_error']} error rows, "
                f"{a['generated_tokens']} tokens generated in {a['wall_seconds']:.1f} s"
            )
        phases = self.attempts[-1].get("phases") if self.attempts else self.phases
        if phases:
            out.append(f"start-up{' of this attempt' if len(self.attempts) > 1 else ''}: {describe(phases)}")
        if self.error_files:
            out.append(f"error rows (with their reasons) are in: {', '.join(self.error_files.values())}")
        out += [f"shard {s} failed: {why}" for s, why in self.failed_shards.items()]
        out += [f"{w} died: {why}" for w, why in self.failed_workers.items()]
        out += [self.stopped] if self.stopped else []
        return out


# tqdm's default with the rows done to a tenth: the rows in flight count by the work done on them
_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} rows [{elapsed}<{remaining}{postfix}]"


class ProgressBar:
    """Rows done out of the rows this run has to do, with the work done on the rows in flight (a long
    prompt's prefill moves the bar before its row finishes), and the tok/s of Counters.tokens_per_s."""

    def __init__(self, counters: Counters, enabled: bool):
        self.counters = counters
        self._bar = tqdm(
            total=counters.rows_total,
            unit="row",
            disable=not enabled,
            dynamic_ncols=True,
            desc="batchrun",
            smoothing=0.05,
            bar_format=_BAR,
        )
        self._last_postfix = 0.0

    def update(self) -> None:
        """Catch up with the counters (rows finished, or work done on the rows in flight)."""
        c = self.counters
        self._bar.update(min(c.rows_done + c.inflight_progress, c.rows_total) - self._bar.n)
        now = time.monotonic()
        if now - self._last_postfix > 1.0:
            self._last_postfix = now
            self._postfix()

    def close(self) -> None:
        self._postfix()
        self._bar.close()

    def _postfix(self) -> None:
        c = self.counters
        self._bar.set_postfix_str(
            f"{c.tokens_per_s(time.time()):.0f} tok/s, {c.rows_error} errors", refresh=False
        )
