"""Every GPU of a node: one worker process per GPU, each running its own share of this task's shards.

Worker w of W on task t of T runs as task `t*W + w` of `T*W`: the same round-robin that splits shards
across Slurm tasks splits them across workers, so a shard has exactly one writer (each worker holds
the lease of its share). The parent shows one progress bar fed by the workers' heartbeats, forwards
SIGTERM/SIGUSR1 to them, and sums their summaries into one for the node. A worker that dies is
reported; its shards stay resumable (its lease is taken over by the next run).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait

from tqdm import tqdm

from jobs.spec.job import JobSpec, SpecError
from jobs.worker import JobFailed, JobInterrupted, open_checked_model, run_worker
from runner.store import OutputStore
from runner.telemetry.attempts import attempt_of, summary_from_report, with_history
from runner.telemetry.phases import Phases
from runner.telemetry.progress import Summary

log = logging.getLogger(__name__)


def worker_devices(gpus: str | int | list[int], names: list[str], per_worker: int = 1) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker ([None]: one worker, in this process, as it is), from the
    `names` of the GPUs this process sees (`visible_gpus`; `gpus` ids index them). A worker takes
    `per_worker` GPUs (engine.tensor_parallel): consecutive ids, so `gpus` counts groups."""
    visible = len(names)
    if gpus == "auto":
        if visible <= per_worker:
            return [None]
        ids = list(range(visible - visible % per_worker))
    elif isinstance(gpus, int):
        if not visible:
            return [""] * gpus if gpus > 1 else [None]  # CPU workers: useful for small models and tests
        ids = list(range(gpus * per_worker))
    else:
        ids = gpus
        if len(ids) % per_worker:
            raise SpecError(
                f"runtime.gpus: {len(ids)} GPU ids do not make groups of engine.tensor_parallel={per_worker}"
            )
    too_high = [i for i in ids if i >= visible]
    if too_high:
        groups = f" ({len(ids) // per_worker} groups of {per_worker})" if per_worker > 1 else ""
        raise SpecError(f"runtime.gpus: GPU {too_high[0]} does not exist here ({visible} visible){groups}")
    return [",".join(names[i] for i in ids[k : k + per_worker]) for k in range(0, len(ids), per_worker)]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them, found without importing torch
    (3-4 s that a node's workers would wait for): the variable's entries when it is set (up to a
    negative one, which hides the rest from CUDA), else one per GPU that `nvidia-smi -L` lists; torch
    counts them where nvidia-smi is missing."""
    names = os.environ.get("CUDA_VISIBLE_DEVICES")
    if names is not None:
        entries = [e.strip() for e in names.split(",")]
        hidden = next((i for i, e in enumerate(entries) if not e or e.startswith("-")), len(entries))
        return entries[:hidden]
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
        if listed.returncode == 0:
            gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
            return [str(i) for i in range(len(gpus))]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_workers(
    spec: JobSpec, *, force_new_run: bool = False, show_progress: bool = True, phases: Phases | None = None
) -> Summary:
    """Run this task's workers, one per GPU group of the node (see the module docstring; one, in this
    process, when there is one group); same errors as run_worker.
    `phases`: as run_worker's (default: from this process's start)."""
    if phases is None:
        phases = Phases()
    phases.done("launch")
    had_torch = "torch" in sys.modules
    names = visible_gpus()
    if not had_torch and "torch" in sys.modules:  # no nvidia-smi: torch counted them, its import is "imports"
        phases.done("imports")
    devices = worker_devices(spec.runtime.gpus, names, spec.engine.tensor_parallel)
    phases.done("count_gpus")
    if len(devices) == 1:
        if devices[0] is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = devices[0]
        return run_worker(spec, force_new_run=force_new_run, show_progress=show_progress, phases=phases)
    store = OutputStore.for_output(spec.output)
    if force_new_run:  # once, before the workers: they must not discard each other's new progress
        open_checked_model(spec, store, force_new_run, phases)
    # else each worker checks the fingerprint itself, all at once (the first to find none records it)
    return _Node(spec, store, devices, phases).run(show_progress)


class _Node:
    def __init__(self, spec: JobSpec, store: OutputStore, devices: list[str], phases: Phases):
        self.spec = spec
        self.store = store
        self.devices = devices
        self.phases = phases
        rt = spec.runtime
        self.total = rt.num_tasks * len(devices)
        self.tasks = [rt.task_index * len(devices) + w for w in range(len(devices))]
        self.results: mp.Queue
        self.procs: list[mp.Process] = []

    def run(self, show_progress: bool) -> Summary:
        started = time.monotonic()
        self.started_at = time.time()
        ctx = mp.get_context(_start_method())
        self.results = ctx.Queue()
        for device, task in zip(self.devices, self.tasks, strict=True):
            sub = self.spec.model_copy(
                update={
                    "runtime": self.spec.runtime.model_copy(
                        update={"task_index": task, "num_tasks": self.total, "gpus": 1}
                    )
                }
            )
            p = ctx.Process(
                target=_worker,
                args=(sub.model_dump(mode="json", by_alias=True), device, self.results),
                name=f"batchrun-worker-{task}",
            )
            p.start()
            self.procs.append(p)
        self.phases.done("start_workers")
        log.info(
            "started %d workers (tasks %s of %d) on devices %s",
            len(self.procs),
            self.tasks,
            self.total,
            self.devices,
        )
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            self._watch(show_progress)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return self._summarize(started)

    def _forward(self, signum: int, frame) -> None:
        log.warning("%s: asking the workers to stop", signal.Signals(signum).name)
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    def _watch(self, show_progress: bool) -> None:
        bar = tqdm(
            unit="row", disable=not show_progress, desc=f"batchrun x{len(self.procs)}", dynamic_ncols=True
        )
        try:
            while any(p.is_alive() for p in self.procs):
                beats = [self.store.read_json(f"progress/task-{t}-of-{self.total}.json") for t in self.tasks]
                counters = [b["counters"] for b in beats if b]
                bar.total = sum(c["rows_total"] for c in counters) or None
                bar.update(sum(c["rows_done"] for c in counters) - bar.n)
                bar.set_postfix_str(f"{sum(b['tokens_per_s'] for b in beats if b):.0f} tok/s", refresh=True)
                wait([p.sentinel for p in self.procs if p.is_alive()], timeout=1.0)  # back when one ends
        finally:
            bar.close()
        for p in self.procs:
            p.join()

    def _summarize(self, started: float) -> Summary:
        outcomes: dict[int, tuple[str, dict | str]] = {}
        while not self.results.empty():
            task, state, payload = self.results.get()
            outcomes[task] = (state, payload)
        self.results.close()
        self.results.join_thread()
        summaries = [payload for state, payload in outcomes.values() if isinstance(payload, dict)]
        failed: dict[str, str] = {}
        for s in summaries:
            failed |= s["failed_shards"]
        dead = {}
        for task, p in zip(self.tasks, self.procs, strict=True):
            state, payload = outcomes.get(task, ("crashed", f"exit code {p.exitcode}"))
            if state in ("crashed", "error"):
                dead[f"worker {task} of {self.total}"] = f"{state} ({payload}); its shards stay resumable"
        wall = time.monotonic() - started
        # this run's own figures: each worker's latest attempt, if it started now (else it had nothing to do)
        attempts = [a for s in summaries for a in s["attempts"][-1:] if a["started_at"] >= self.started_at]
        generated = sum(a["generated_tokens"] for a in attempts)
        generating = max((a.get("generation_seconds", 0.0) for a in attempts), default=0.0)  # side by side
        busy = [s["gpu_busy_percent"] for s in summaries if s["gpu_busy_percent"] is not None]
        states = {state for state, _ in outcomes.values()}
        stopped = [s["stopped"] for s in summaries if s.get("stopped")]
        status = "interrupted" if "interrupted" in states else "finished"
        status = "failed" if failed or dead or stopped else status
        summary = Summary(
            status=status,
            shards=sum(s["shards"] for s in summaries),
            shards_done=sum(s["shards_done"] for s in summaries),
            rows_ok=sum(a["rows_ok"] for a in attempts),
            rows_error=sum(a["rows_error"] for a in attempts),
            rows_remaining=sum(s["rows_remaining"] for s in summaries),
            prompt_tokens=sum(a["prompt_tokens"] for a in attempts),
            generated_tokens=generated,
            wall_seconds=round(wall, 3),
            generated_tokens_per_s=round(generated / generating, 1) if generating else 0.0,
            generation_seconds=round(generating, 3),
            gpu_busy_percent=round(sum(busy) / len(busy), 1) if busy else None,
            failed_shards=failed,
            failed_workers=dead,
            engine={
                f"task-{t}": payload.get("engine", {})
                for t, (_, payload) in outcomes.items()
                if isinstance(payload, dict)
            },
            stopped="\n".join(stopped) or None,
            error_files={k: v for s in summaries for k, v in s["error_files"].items()},
            phases=self.phases.seconds | _slowest_start(attempts),
        )
        if self.spec.runtime.num_tasks == 1:  # else the workers' own reports are the task's record
            previous = self.store.read_json("report.json")
            if not attempts and previous and not (failed or dead):
                return summary_from_report(previous)  # nothing to do: the report of earlier runs stays
            summary = with_history(summary, attempt_of(summary, self.started_at), previous)
            self.store.write_json("report.json", summary.as_dict())
        if failed or dead or stopped:
            raise JobFailed(summary)
        if status == "interrupted":
            raise JobInterrupted(signal.SIGTERM, summary)
        return summary


def _start_method() -> str:
    """fork while this process has neither torch nor another thread (a GPU node's parent: `visible_gpus`
    asks nvidia-smi): the workers start with the job's modules already imported, about a second
    sooner; else spawn, since CUDA, torch's thread pools and other threads do not survive a fork."""
    return "fork" if "torch" not in sys.modules and threading.active_count() == 1 else "spawn"


def _slowest_start(attempts: list[dict]) -> dict[str, float]:
    """The start-up phases of the worker that took longest to its last phase (its first token), named
    `worker_<phase>`: the workers start together, so the node waits for that one."""
    slowest = max((a.get("phases", {}) for a in attempts), key=lambda p: sum(p.values()), default={})
    return {f"worker_{name}": seconds for name, seconds in slowest.items()}


def _worker(spec_data: dict, device: str, results: mp.Queue) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    tqdm.set_lock(threading.RLock())  # the default, a process-shared semaphore, would outlive os._exit below
    spec = JobSpec.model_validate(spec_data)
    task = spec.runtime.task_index
    logging.basicConfig(  # force: a forked worker has the node's handlers
        level=logging.INFO,
        format=f"%(asctime)s worker {task}: %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    try:
        summary = run_worker(spec, show_progress=False)
        results.put((task, "finished", summary.as_dict()))
    except JobInterrupted as e:
        results.put((task, "interrupted", e.summary.as_dict()))
    except JobFailed as e:
        results.put((task, "failed", e.summary.as_dict()))
    except Exception as e:
        log.exception("worker %d failed", task)
        results.put((task, "error", f"{type(e).__name__}: {e}"))
    results.close()
    results.join_thread()  # the outcome is in the pipe to the node
    logging.shutdown()
    # the shards are committed and the outcome delivered: Python's teardown of torch and CUDA (about a
    # second) would only keep the node waiting
    os._exit(0)
