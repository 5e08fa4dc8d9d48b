"""The generation loop: prepared rows into the backend, finished rows out to the writer.

    feed prompts (thread) → admit them to the backend → step it → hand rows to the writer (thread)

The job (jobs/worker.py) plans the work; runner/pipeline.py wires this loop and drives it. A stop signal
ends admission; after SIGTERM or SIGUSR1 rows still generating get `DRAIN_SHARE` of the grace period to
finish, after Ctrl-C they stop at the next step (runner/signals.py); the writer commits every finished
row.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from runner.backends import Backend
from runner.engine.types import Completion, Request
from runner.errors.budget import ErrorBudget
from runner.faults import fault_point, kill_point
from runner.feeder import Feeder, ShardEnd, ShardFailed, ShardWork
from runner.held_bytes import HeldBytes
from runner.prompts import PreparedRow, PromptBuilder
from runner.signals import StopRequested
from runner.store import OutputStore
from runner.telemetry.monitor import Counters
from runner.telemetry.progress import ProgressBar
from runner.writer import PartWriter

log = logging.getLogger(__name__)

DRAIN_SHARE = 0.5  # of the grace period spent finishing in-flight rows; the rest is for commits


class RowBuilder(Protocol):
    """Makes the output rows of one input row: `OutputRows`, or OpenAI lines (runner/openai/response.py).
    Each row holds `_shard`, `_row`, `finish_reason`, `error`, `prompt_tokens`, `generated_tokens`."""

    def error_rows(self, prep: PreparedRow, error: str) -> list[dict]: ...

    def sample_rows(
        self, prep: PreparedRow, samples: list[Completion], errors: list[str | None]
    ) -> list[dict]: ...


@dataclass(slots=True, frozen=True)
class OutputRows:
    """What an output row holds besides the generation (the spec's output and input sections)."""

    keep_columns: list[str] | Literal["all"]  # input columns copied to each output row
    id_column: str | None  # an input column copied as well
    samples: int  # samples per input row (`_sample` is added when > 1)
    include_token_ids: bool
    parse_json: bool = False  # add `generated_json`: the parsed output of rows under a JSON schema

    def error_rows(self, prep: PreparedRow, error: str) -> list[dict]:
        """The error row of an input row that could not run."""
        return [self.row(prep, error=error)]

    def sample_rows(
        self, prep: PreparedRow, samples: list[Completion], errors: list[str | None]
    ) -> list[dict]:
        """One row per sample, with its error (if any)."""
        return [self.row(prep, s, e) for s, e in zip(samples, errors, strict=True)]

    def row(self, prep: PreparedRow, completion: Completion | None = None, error: str | None = None) -> dict:
        """The output row of one sample of `prep`, or its error row (with what was generated, if any)."""
        values = prep.values or {}
        keep = self.keep_columns
        kept = dict(values) if keep == "all" else {c: values.get(c) for c in keep}
        if self.id_column:
            kept[self.id_column] = values.get(self.id_column)
        row = {**kept, "_shard": prep.shard, "_row": prep.row}
        if self.samples > 1:
            row["_sample"] = completion.sample_index if completion else 0
        if completion is None:
            row |= {
                "generated_text": None,
                "finish_reason": "error",
                "prompt_tokens": len(prep.prompt_ids or ()),
                "generated_tokens": 0,
                "error": error,
            }
            if self.include_token_ids:
                row["generated_token_ids"] = None
        else:
            row |= {
                "generated_text": completion.text,
                "finish_reason": "error" if error else completion.finish_reason,
                "prompt_tokens": completion.prompt_tokens,
                "generated_tokens": completion.generated_tokens,
                "error": error,
            }
            if self.include_token_ids:
                row["generated_token_ids"] = completion.token_ids
        if self.parse_json:
            ok = completion is not None and not error and prep.sampling.json_schema is not None
            row["generated_json"] = json.loads(completion.text) if ok else None
        return row


@dataclass(slots=True, frozen=True)
class LoopSettings:
    """The loop's knobs, as plain values (jobs/worker.py takes them from the spec)."""

    max_inflight: int  # requests kept in the backend at once
    grace_seconds: float  # after a stop signal: time to finish rows and commit them
    flush_rows: int  # commit a part every this many rows ...
    flush_seconds: float  # ... or this often
    max_held_bytes: int  # input values held between reading and committing
    storage_options: dict  # for reading the input
    columns: list[str] | None  # input columns to read (None: all)
    max_error_fraction: float  # the error budget (runner/errors/budget.py): rows that reached the model
    max_input_error_fraction: float  # rows that could not become a prompt
    error_window_rows: int


@dataclass(slots=True)
class _PendingSamples:
    """An input row in the backend, and those of its `n` samples that have finished."""

    prep: PreparedRow
    samples: dict[int, Completion] = field(default_factory=dict)


class GenerationLoop:
    """The main loop's state: what is in flight in the backend, and where finished rows go."""

    def __init__(
        self,
        settings: LoopSettings,
        rows: RowBuilder,
        backend: Backend,
        work: list[ShardWork],
        failed: dict[str, str],
        counters: Counters,
    ):
        self.settings = settings
        self.rows = rows
        self.backend = backend
        self.work = work
        self.inflight: dict[tuple[str, int], _PendingSamples] = {}
        self.max_inflight = settings.max_inflight
        self.failed = failed  # shard -> why it could not be read; grows as the feeder finds more
        self.counters = counters
        self.held_bytes = HeldBytes(settings.max_held_bytes)
        self.engine_error: str | None = None  # what the engine raised; the loop stopped there
        self.errors = ErrorBudget(
            settings.max_error_fraction,
            settings.max_input_error_fraction,
            settings.error_window_rows,
            counters.rows_total,
        )
        self.error_shards: set[str] = set()
        self.writer: PartWriter
        self.bar: ProgressBar

    def run(
        self, store: OutputStore, builder: PromptBuilder, stop: StopRequested, show_progress: bool
    ) -> None:
        """Generate every row of the work (until `stop`); returns once finished rows are committed."""
        s = self.settings
        self.writer = PartWriter(store, s.flush_rows, s.flush_seconds, self.held_bytes)
        for w in self.work:
            self.writer.open_shard(w.shard.id, len(w.done_rows))
        feeder = Feeder(self.work, builder, s.storage_options, s.columns, self.held_bytes)
        self.bar = ProgressBar(self.counters, show_progress)
        self.counters.generating_since = time.time()
        try:
            self._loop(feeder, stop)
        except KeyboardInterrupt:  # a second Ctrl-C: out now, with what is finished
            log.warning("stopped at once: %d rows in flight are left for the next run", len(self.inflight))
        finally:
            feeder.stop()
            self.writer.close()
            c = self.counters
            c.generating_until = time.time()
            c.inflight_progress, c.inflight_tokens = 0.0, 0  # the rows in flight are left for the next run
            self.bar.close()
            self.counters.shards_done += self.writer.shards_compacted

    def _loop(self, feeder: Feeder, stop: StopRequested) -> None:
        drain_until = None
        while True:
            if stop.requested and drain_until is None:
                feeder.stop()
                drain_until = stop.at + (DRAIN_SHARE * self.settings.grace_seconds if stop.drains else 0.0)
            if drain_until is not None and time.monotonic() > drain_until:
                if self.inflight:
                    log.warning("%d rows still generating are left for the next run", len(self.inflight))
                return
            if drain_until is None:
                self._admit(feeder)
            if self.backend.has_unfinished():
                try:
                    done = self._step()
                except Exception as e:  # a GPU fault leaves nothing of the engine usable: stop, commit
                    self.engine_error = f"{type(e).__name__}: {e}"
                    log.error("the engine failed (%s); committing the %d rows finished so far",
                              self.engine_error, self.counters.rows_done)  # fmt: skip
                    return
                for completion in done:
                    self._finish_sample(completion)
                inflight = self.backend.progress()
                self.counters.inflight_progress = inflight.requests
                self.counters.inflight_tokens = inflight.generated_tokens
            elif feeder.exhausted:
                return
            elif self.held_bytes.waiting:
                self.writer.flush()  # nothing generating and the reader waits for room: commit the rows
            self.writer.poll()
            self.bar.update()  # here, not per row: the work on the rows in flight is as of the last step

    def _step(self) -> list[Completion]:
        fault_point("engine_step")
        return self.backend.step()

    def _admit(self, feeder: Feeder) -> None:
        """Top up the engine to `max_inflight` requests; wait for input only when the engine is idle."""
        while self.backend.num_unfinished < self.max_inflight:
            item = feeder.get(timeout=0 if self.backend.has_unfinished() else 0.05)
            if item is None:
                break
            if isinstance(item, ShardEnd):
                self.writer.shard_total(item.shard, item.total_rows)
            elif isinstance(item, ShardFailed):
                self.counters.rows_total -= self._rows_of(item.shard)
                self.failed[item.shard] = item.reason
            elif item.error is not None:
                self._input_error(item, item.error)
            else:
                try:
                    self.backend.add(Request((item.shard, item.row), item.prompt_ids, item.sampling))
                except ValueError as e:  # a request this backend can never run: this row's error
                    self._input_error(item, str(e))
                    continue
                self.errors.sent()
                self.inflight[(item.shard, item.row)] = _PendingSamples(item)
        self.counters.inflight = self.backend.num_unfinished

    def _finish_sample(self, c: Completion) -> None:
        entry = self.inflight[c.id]
        entry.samples[c.sample_index] = c
        if len(entry.samples) < entry.prep.sampling.n:
            return
        del self.inflight[c.id]
        prep = entry.prep
        samples = [entry.samples[i] for i in range(prep.sampling.n)]
        errors = [_grammar_unfinished(prep, s) for s in samples]
        rows = self.rows.sample_rows(prep, samples, errors)
        self._emit(prep, rows, is_error=any(errors))
        error = next((r["error"] for r in rows if r["error"]), None)
        self.errors.finished(prep.shard, error if any(errors) else None)  # may raise: the row is counted

    def _input_error(self, prep: PreparedRow, error: str) -> None:
        """A row that never reached the model: its error row, counted against the input budget."""
        self._emit(prep, self.rows.error_rows(prep, error), is_error=True)
        self.errors.input_error(prep.shard, error)  # may raise: the row is counted

    def _emit(self, prep: PreparedRow, rows: list[dict], is_error: bool) -> None:
        if is_error:
            self.error_shards.add(prep.shard)
        self.writer.add(prep.shard, rows, nbytes=prep.nbytes)
        kill_point("row_finished")
        c = self.counters
        c.rows_done += 1
        c.rows_error += is_error
        c.prompt_tokens += rows[0]["prompt_tokens"]
        c.generated_tokens += sum(r["generated_tokens"] for r in rows)

    def _rows_of(self, shard: str) -> int:
        return next(w.total_rows - len(w.done_rows) for w in self.work if w.shard.id == shard)


def _grammar_unfinished(prep: PreparedRow, c: Completion) -> str | None:
    """The error of a sample that hit its length limit before its grammar could end (else None)."""
    grammar = prep.sampling.grammar
    if grammar is None or c.finish_reason != "length":
        return None
    what = {"json_schema": "the JSON schema", "regex": "the regex", "choice": "a choice"}[grammar[0]]
    limit = prep.sampling.max_new_tokens
    where = f"max_new_tokens ({limit})" if c.generated_tokens >= limit else "the model's length limit"
    return f"reached {where} before {what} could end: the output is incomplete"
