"""Heartbeats and metrics: what a running task tells the world, written into the output.

A thread samples the GPU (NVML) twice a second and, every `interval` seconds, writes
  `_batchrun/progress/task-<i>-of-<n>.json`   this task's latest state (atomic, one small object)
  `_batchrun/metrics/task-<i>-of-<n>.jsonl`   one line per interval: tok/s, batch, KV use, GPU busy
Both survive the task: `batchrun status` and `batchrun report` read them, also from a 64-task array.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from runner.store import StateStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Counters:
    """What the main loop knows; read by the monitor thread (plain ints: safe to read racily)."""

    rows_total: int = 0  # rows this attempt has to do
    rows_done: int = 0
    rows_error: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    inflight: int = 0  # requests in the engine
    inflight_progress: float = 0.0  # of those, the work done, in rows (Backend.progress)
    inflight_tokens: int = 0  # and the tokens they generated so far
    shards_owned: int = 0
    shards_done: int = 0
    generating_since: float = 0.0  # time.time() when this attempt sent its first row (0: not yet)
    generating_until: float = 0.0  # time.time() when its last finished row was committed (0: not yet)

    def generation_seconds(self, now: float) -> float:
        """Seconds this attempt has been generating: its start-up (model load, ...) is not counted."""
        if not self.generating_since:
            return 0.0
        return max((self.generating_until or now) - self.generating_since, 0.0)

    def tokens_per_s(self, now: float) -> float:
        """batchrun's tok/s, the same in the bar, `status`, the summary and report.json: tokens generated
        (by the rows finished, and so far by the rows in flight) over `generation_seconds`. Once the
        attempt ends, the rows it left in flight are dropped: the figure is its finished rows'."""
        seconds = self.generation_seconds(now)
        return round((self.generated_tokens + self.inflight_tokens) / seconds, 1) if seconds else 0.0

    def rows_per_s(self, now: float) -> float:
        """Rows finished (with the work done on the rows in flight) per second of generation."""
        seconds = self.generation_seconds(now)
        return round((self.rows_done + self.inflight_progress) / seconds, 3) if seconds else 0.0


@dataclass(slots=True)
class Heartbeat:
    task_index: int
    num_tasks: int
    host: str
    pid: int
    state: str  # "running" | "finished" | "interrupted" | "failed"
    interval_s: float
    started_at: float
    updated_at: float
    counters: dict
    shards: list[str]  # the shards this task owns
    tokens_per_s: float  # Counters.tokens_per_s: since the attempt began generating
    rows_per_s: float  # Counters.rows_per_s
    gpu_busy_percent: float | None
    gpu_memory_gb: float | None
    engine: dict = field(default_factory=dict)


def _gpu_sampler() -> Callable[[], tuple[float, float]] | None:
    """(busy %, used GB) from NVML through torch, or None without a GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        torch.cuda.utilization()  # raises without NVML

        def sample() -> tuple[float, float]:
            # NVML only: a CUDA runtime call from this thread (mem_get_info) while the engine captures a
            # CUDA graph on the main thread is work the capture forbids, and breaks it
            return float(torch.cuda.utilization()), torch.cuda.device_memory_used() / 1e9

        return sample
    except Exception:
        return None


def task_name(task_index: int, num_tasks: int) -> str:
    return f"task-{task_index}-of-{num_tasks}"


def clear_heartbeat_temps(store: StateStore, task_index: int, num_tasks: int) -> None:
    """A kill during this task's last heartbeat leaves temp files that no later heartbeat replaces
    when the rerun has nothing to do: remove them on every start."""
    name = task_name(task_index, num_tasks)
    for relpath in (f"progress/{name}.json", f"metrics/{name}.jsonl"):
        store.clear_state_temps(relpath)


class Monitor:
    """Runs for the duration of a `with` block; `finish(state)` writes the last heartbeat."""

    def __init__(
        self,
        store: StateStore,
        task_index: int,
        num_tasks: int,
        shards: list[str],
        counters: Counters,
        engine_stats: Callable[[], dict],
        interval_s: float,
    ):
        self.store = store
        self.counters = counters
        self.shards = shards
        self.engine_stats = engine_stats
        self.interval_s = interval_s
        self.name = task_name(task_index, num_tasks)
        self.task = (task_index, num_tasks)
        self.started = time.time()
        self._gpu = _gpu_sampler()
        self._busy: list[float] = []
        self._memory: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batchrun-monitor", daemon=True)
        previous = store.read_state(f"metrics/{self.name}.jsonl") or b""
        self._metrics = previous.decode().splitlines()  # earlier attempts' lines are kept
        self._last = (time.monotonic(), 0, {})  # (t, generated, engine stats)
        self._window: list[float] = []

    def __enter__(self) -> Monitor:
        self._write("running")  # visible to `batchrun status` from the start
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()

    def starting(self) -> None:
        """The first heartbeat, before the model loads (the block's start writes the next)."""
        self._write("running")

    def gpu_busy_mean(self) -> float | None:
        return round(sum(self._busy) / len(self._busy), 1) if self._busy else None

    def finish(self, state: str) -> None:
        """Stop sampling and record the task's final state."""
        self.__exit__()
        self._write(state)

    def _run(self) -> None:
        next_write = time.monotonic() + self.interval_s
        while not self._stop.wait(min(0.5, self.interval_s)):
            if self._gpu:
                busy, self._memory = self._gpu()
                self._busy.append(busy)
                self._window.append(busy)
            if time.monotonic() >= next_write:
                next_write += self.interval_s
                try:
                    self._write("running")
                except Exception as e:  # a heartbeat must never stop the job
                    log.warning("could not write the progress record: %s", e)

    def _write(self, state: str) -> None:
        now = time.monotonic()
        c = self.counters
        stats = self.engine_stats()
        t0, gen0, stats0 = self._last
        dt = max(now - t0, 1e-9)
        tok_s = (c.generated_tokens - gen0) / dt
        self._last = (now, c.generated_tokens, stats)
        busy = round(sum(self._window) / len(self._window), 1) if self._window else None
        self._window = []
        wall = time.time()
        beat = Heartbeat(
            *self.task,
            socket.gethostname(),
            os.getpid(),
            state,
            self.interval_s,
            self.started,
            wall,
            asdict(c),
            self.shards,
            c.tokens_per_s(wall),
            c.rows_per_s(wall),
            busy,
            None if self._memory is None else round(self._memory, 2),
            stats,
        )
        self.store.write_json(f"progress/{self.name}.json", asdict(beat))
        steps = stats.get("steps", 0) - stats0.get("steps", 0)
        tokens = sum(stats.get(k, 0) - stats0.get(k, 0) for k in ("prefill_tokens", "decode_tokens"))
        self._metrics.append(
            json.dumps(
                {
                    "time": round(beat.updated_at, 2),
                    "task": self.task[0],
                    "state": state,
                    "tokens_per_s": round(tok_s, 1),  # the same definition, over the last interval
                    "interval_s": round(dt, 3),  # what tokens_per_s is measured over
                    "heartbeat_s": self.interval_s,
                    "rows_done": c.rows_done,
                    "generated_tokens": c.generated_tokens,
                    "inflight": c.inflight,
                    "mean_batch_tokens": round(tokens / steps, 1) if steps else None,
                    "kv_pages_used": stats.get("kv_pages_used"),
                    "kv_pages_total": stats.get("kv_pages_total"),
                    "preemptions": stats.get("preemptions"),
                    "gpu_busy_percent": busy,
                }
            )
        )
        self.store.write_state(f"metrics/{self.name}.jsonl", ("\n".join(self._metrics) + "\n").encode())
