"""`batchrun report`: the job's metrics over time and its shards, as one PNG (matplotlib extra)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from jobs.spec import JobSpec
from jobs.status import JobStatus, job_status
from runner.store import OutputStore


class ReportUnavailable(Exception):
    """matplotlib is missing, or the output holds no metrics yet."""


@dataclass(slots=True)
class Series:
    task: str
    minutes: list[float]
    tokens_per_s: list[float]
    gpu_busy: list[float | None]


def load_series(store: OutputStore) -> list[Series]:
    """One time series per task from `_batchrun/metrics/`, minutes since the job's first record."""
    raw = {}
    for name in store.list_state("metrics"):
        lines = (store.read_state(f"metrics/{name}") or b"").decode().splitlines()
        raw[name.removesuffix(".jsonl")] = [json.loads(x) for x in lines if x.strip()]
    t0 = min((r[0]["time"] for r in raw.values() if r), default=0.0)
    return [
        Series(
            task,
            [(x["time"] - t0) / 60 for x in rows],
            [x["tokens_per_s"] for x in rows],
            [x["gpu_busy_percent"] for x in rows],
        )
        for task, rows in raw.items()
        if rows
    ]


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
