"""What the user sees while the job runs (a tqdm bar) and after (a summary, also in report.json)."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from tqdm import tqdm


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

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        busy = "n/a (no GPU)" if self.gpu_busy_percent is None else f"{self.gpu_busy_percent:.0f}%"
        out = [
            f"{self.status}: {self.shards_done}/{self.shards} shards done, {self.rows_ok} rows ok, "
            f"{self.rows_error} error rows, {self.rows_remaining} rows remaining",
            f"tokens: {self.prompt_tokens} prompt, {self.generated_tokens} generated in "
            f"{self.wall_seconds:.1f} s = {self.generated_tokens_per_s:.1f} generated tok/s; GPU busy {busy}",
        ]
        out += [f"shard {s} failed: {why}" for s, why in self.failed_shards.items()]
        return out


class GpuBusy:
    """Samples NVML's GPU utilisation every 0.5 s on a thread; `mean()` is None without a GPU."""

    def __init__(self) -> None:
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.utilization()  # raises without NVML
                self._thread = threading.Thread(target=self._run, name="batchrun-nvml", daemon=True)
        except Exception:
            self._thread = None

    def __enter__(self) -> GpuBusy:
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def mean(self) -> float | None:
        return sum(self._samples) / len(self._samples) if self._samples else None

    def _run(self) -> None:
        import torch

        while not self._stop.wait(0.5):
            self._samples.append(float(torch.cuda.utilization()))


class ProgressBar:
    """Rows done out of the rows this run has to do, with the generated tokens/s."""

    def __init__(self, total_rows: int, enabled: bool):
        self.start = time.monotonic()
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self._bar = tqdm(
            total=total_rows,
            unit="row",
            disable=not enabled,
            dynamic_ncols=True,
            desc="batchrun",
            smoothing=0.05,
        )
        self._last_postfix = 0.0

    def update(self, rows: int, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated_tokens
        self._bar.update(rows)
        now = time.monotonic()
        if now - self._last_postfix > 1.0:
            self._last_postfix = now
            self._bar.set_postfix_str(f"{self.tokens_per_s():.0f} tok/s", refresh=False)

    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(time.monotonic() - self.start, 1e-9)

    def close(self) -> None:
        self._bar.close()
