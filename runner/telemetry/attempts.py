"""A job's figures over all its attempts: each run of the same command adds one, none is forgotten.

`report.json` holds the totals (start-up phases too: what the job paid for each) and one record per
attempt. An attempt that ended (finished, interrupted, failed) wrote its own record; one killed
outright (`kill -9`, node loss) left only its last heartbeat, which the next attempt folds in as a
"killed" attempt. A run with nothing to do adds nothing and writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

from runner.telemetry.phases import summed
from runner.telemetry.progress import Summary

_SUMMED = ("rows_ok", "rows_error", "prompt_tokens", "generated_tokens", "wall_seconds", "generation_seconds")


@dataclass(slots=True)
class Attempt:
    """One run of the job (or of one task of it)."""

    started_at: float  # wall-clock seconds
    status: str  # "finished" | "interrupted" | "failed" | "killed"
    rows_ok: int
    rows_error: int
    prompt_tokens: int
    generated_tokens: int
    wall_seconds: float
    generated_tokens_per_s: float  # generated_tokens / generation_seconds (Counters.tokens_per_s)
    generation_seconds: float = 0.0  # since its first row was sent
    phases: dict[str, float] = field(default_factory=dict)  # start-up seconds by phase (none if killed)


def attempt_of(summary: Summary, started_at: float) -> Attempt:
    """This attempt's own figures, from the summary of its rows alone."""
    return Attempt(
        started_at,
        summary.status,
        summary.rows_ok,
        summary.rows_error,
        summary.prompt_tokens,
        summary.generated_tokens,
        summary.wall_seconds,
        summary.generated_tokens_per_s,
        summary.generation_seconds,
        summary.phases,
    )


def killed_attempt(
    heartbeat: dict | None, known: list[dict], committed: Callable[[], tuple[int, int]]
) -> Attempt | None:
    """The attempt behind a heartbeat still saying "running" that no report records: it was killed.

    Its rows are the committed rows (and error rows) that no recorded attempt accounts for:
    `committed()` gives the output's totals now. Its tokens and time are its last heartbeat's.
    """
    if not heartbeat or heartbeat.get("state") != "running":
        return None
    if any(a["started_at"] == heartbeat["started_at"] for a in known):
        return None
    c = heartbeat["counters"]
    wall = max(0.0, heartbeat["updated_at"] - heartbeat["started_at"])
    since = c.get("generating_since") or 0.0  # heartbeats before it had none
    generating = max(0.0, heartbeat["updated_at"] - since) if since else wall
    rows, errors = committed()
    errors -= sum(a["rows_error"] for a in known)
    rows -= sum(a["rows_ok"] + a["rows_error"] for a in known)
    return Attempt(
        heartbeat["started_at"],
        "killed",
        rows - errors,
        errors,
        c["prompt_tokens"],
        c["generated_tokens"],
        round(wall, 3),
        round(c["generated_tokens"] / generating, 1) if generating else 0.0,
        round(generating, 3),
    )


def with_killed(previous: dict | None, killed: Attempt, shards: int) -> dict:
    """The report `previous` with the `killed` attempt added: written as soon as the next attempt starts,
    whose heartbeat replaces the killed one's (a second kill would otherwise lose the first)."""
    empty = Summary("killed", shards, 0, 0, 0, 0, 0, 0, 0.0, 0.0, None, {}, {})
    base = summary_from_report(previous) if previous else empty
    return with_history(replace(base, status="killed"), killed, previous).as_dict()


def with_history(summary: Summary, this: Attempt, previous: dict | None) -> Summary:
    """`summary` (this attempt's) with rows, tokens and time added up over every attempt so far."""
    attempts = [*(previous or {}).get("attempts", []), asdict(this)]
    # reports from before generation_seconds: their wall time stands for it
    totals = {k: sum(a.get(k, a["wall_seconds"]) for a in attempts) for k in _SUMMED}
    totals["wall_seconds"] = round(totals["wall_seconds"], 3)
    totals["generation_seconds"] = round(totals["generation_seconds"], 3)
    rate = round(totals["generated_tokens"] / max(totals["generation_seconds"], 1e-9), 1)
    phases = summed([a.get("phases", {}) for a in attempts])  # reports before phases have none
    return replace(summary, **totals, generated_tokens_per_s=rate, phases=phases, attempts=attempts)


def summary_from_report(report: dict) -> Summary:
    """A Summary read back from `report.json` (a run with nothing to do reports the last one's)."""
    names = {f.name for f in fields(Summary)}
    return Summary(**{k: v for k, v in report.items() if k in names})
