"""`batchrun report`: the job's metrics over time and its shards, as one PNG (matplotlib extra)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from jobs.spec.job import JobSpec
from jobs.status import JobStatus, job_status
from runner.store import OutputStore


class ReportUnavailable(Exception):
    """matplotlib is missing, or the output holds no metrics yet."""


@dataclass(slots=True)
class Series:
    """One task's metrics; a NaN point breaks the line where no heartbeat came (a kill, a requeue)."""

    task: str
    minutes: list[float]
    tokens_per_s: list[float]
    gpu_busy: list[float | None]
    full: list[bool]  # measured over a whole heartbeat interval (a shorter one is too noisy to scale by)


GAP_HEARTBEATS = 3  # no record for this many heartbeat intervals: a gap, not a slow interval
DEFAULT_HEARTBEAT_S = 5.0  # for records written before they carried their interval


def load_series(store: OutputStore) -> list[Series]:
    """One time series per task from `_batchrun/metrics/`, minutes since the job's first record."""
    raw = {}
    for name in store.list_state("metrics"):
        lines = (store.read_state(f"metrics/{name}") or b"").decode().splitlines()
        raw[name.removesuffix(".jsonl")] = [json.loads(x) for x in lines if x.strip()]
    t0 = min((r[0]["time"] for r in raw.values() if r), default=0.0)
    return [_series(task, rows, t0) for task, rows in raw.items() if rows]


def _series(task: str, rows: list[dict], t0: float) -> Series:
    s = Series(task, [], [], [], [])
    prev = None
    for x in rows:
        beat = x.get("heartbeat_s", DEFAULT_HEARTBEAT_S)
        dt = x.get("interval_s", x["time"] - prev if prev is not None else 0.0)
        if prev is not None and x["time"] - prev > GAP_HEARTBEATS * beat:
            _point(s, (prev - t0) / 60 + 1e-9, float("nan"), None, False)
        _point(s, (x["time"] - t0) / 60, x["tokens_per_s"], x["gpu_busy_percent"], dt >= 0.9 * beat)
        prev = x["time"]
    return s


def _point(s: Series, minute: float, tok_s: float, busy: float | None, full: bool) -> None:
    s.minutes.append(minute)
    s.tokens_per_s.append(tok_s)
    s.gpu_busy.append(busy)
    s.full.append(full)


def y_limit(series: list[Series]) -> float:
    """The throughput axis' top: the highest rate measured over a whole heartbeat (5% headroom)."""
    top = max(
        (v for s in series for v, full in zip(s.tokens_per_s, s.full, strict=True) if full and v == v),
        default=0.0,
    )
    return top * 1.05 or 1.0


def render_png(spec: JobSpec) -> bytes:
    """Throughput and GPU busy over time (per task) and rows per shard, as PNG bytes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportUnavailable(
            "batchrun report needs matplotlib: pip install 'batchrun-llm[report]'"
        ) from None
    store = OutputStore.for_output(spec.output)
    series = load_series(store)
    if not series:
        raise ReportUnavailable(f"{spec.output.path} holds no metrics yet: run the job first")
    status = job_status(spec)
    fig, (ax_tok, ax_gpu, ax_rows) = plt.subplots(3, 1, figsize=(10, 10), dpi=100)
    for s in series:
        ax_tok.plot(s.minutes, s.tokens_per_s, marker=".", label=s.task)
    ax_tok.set_ylim(0, y_limit(series))
    _decorate(ax_tok, "generated tokens/s", "tokens/s")
    gpu = [s for s in series if any(b is not None for b in s.gpu_busy)]
    for s in gpu:
        ax_gpu.plot(
            s.minutes, [b if b is not None else float("nan") for b in s.gpu_busy], marker=".", label=s.task
        )
    if not gpu:
        ax_gpu.text(0.5, 0.5, "no GPU in this run", ha="center", va="center", transform=ax_gpu.transAxes)
    ax_gpu.set_ylim(0, 105)
    _decorate(ax_gpu, "GPU busy (NVML)", "%")
    _rows_per_shard(ax_rows, status)
    fig.suptitle(f"batchrun: {spec.name or spec.output.path}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _decorate(ax, title: str, unit: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("minutes since start")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def _rows_per_shard(ax, status: JobStatus) -> None:
    names = [s.shard for s in status.shards]
    ok = [s.rows_committed - (s.error_rows or 0) for s in status.shards]
    errors = [s.error_rows or 0 for s in status.shards]
    left = [s.rows_total - s.rows_committed for s in status.shards]
    ax.bar(names, ok, label="committed", color="tab:green")
    ax.bar(names, errors, bottom=ok, label="error rows", color="tab:red")
    ax.bar(
        names, left, bottom=[a + b for a, b in zip(ok, errors, strict=True)], label="to do", color="lightgray"
    )
    ax.set_title("rows per shard")
    ax.set_ylabel("rows")
    ax.tick_params(axis="x", labelrotation=45, labelsize="small")
    ax.legend(loc="best", fontsize="small")
