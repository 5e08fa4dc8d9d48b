"""A task's pipeline, wired from plain settings: the one entry of runner a job calls.

    start_process → open_model → clear_stale_temps → run_pipeline: load the backend → prompt builder
    and output rows → the generation loop (runner/loop.py) under a monitor and the stop signals → close

The job (jobs/worker.py) fills `PipelineSettings` from its spec and plans the work; nothing here reads
the spec. A prompt setting that cannot work with this model raises `PromptSetupError` (the job's
spec error).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from runner.backends import BackendName, load_backend
from runner.cpu_threads import configure_cpu_threads, cuda_available
from runner.engine.config import EngineConfig
from runner.engine.types import SamplingParams
from runner.errors.budget import ErrorBudgetExceeded
from runner.feeder import ShardWork
from runner.io.memory import return_freed_buffers_to_os
from runner.loop import GenerationLoop, LoopSettings, OutputRows, RowBuilder
from runner.models.cache import use_kernel_cache
from runner.models.resolve import ResolvedModel, load_tokenizer, resolve_model
from runner.openai.prompts import BatchRequestBuilder, ModelMismatch
from runner.openai.response import BatchOutputRows
from runner.prompts import PromptBuilder, PromptConfig, PromptSetupError
from runner.signals import StopRequested
from runner.store import OutputStore
from runner.store.uploads import sweep_stale_uploads
from runner.telemetry.monitor import Counters, Monitor, clear_heartbeat_temps
from runner.telemetry.phases import Phases

__all__ = [
    "LoopSettings",
    "OutputRows",
    "PipelineResult",
    "PipelineSettings",
    "PromptConfig",
    "PromptSetupError",
    "clear_stale_temps",
    "open_model",
    "run_pipeline",
    "start_process",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    """What a task's pipeline needs from the job's spec, as plain values (jobs/worker.py fills it)."""

    # the job's model.path: OpenAI output lines name it, requests' body.model is checked against it
    model: str
    local_path: str  # where the model's files are (runner/models/resolve.py)
    revision: str | None
    backend: BackendName
    engine: EngineConfig
    prompt: PromptConfig
    sampling: SamplingParams
    output: OutputRows  # the output rows of the spec's columns (not used for OpenAI batch lines)
    openai_batch: ModelMismatch | None  # input and output are OpenAI batch lines, with this policy; None: not
    loop: LoopSettings
    task_index: int
    num_tasks: int
    heartbeat_seconds: float


@dataclass(frozen=True, slots=True)
class PipelineResult:
    """How a task's pipeline ended, for its summary."""

    state: str  # "finished", "failed" or "interrupted"
    signum: int | None  # the stop signal received, if any
    over_budget: str | None  # why the error budget stopped the job (None: it did not)
    engine_error: str | None  # what the engine raised; the loop stopped there
    failed: dict[str, str]  # shard -> why it could not be read
    error_shards: set[str]  # shards with error rows
    engine_stats: dict
    gpu_busy: float | None
    started_at: float  # when this attempt's monitor started (wall clock)
    startup: dict  # the backend's start-up phase marks


def start_process(device: str, phases: Phases) -> None:
    """What the process does once before the job's work: the kernel cache, torch's import (marked as the
    phase "imports"), freed buffers back to the OS, the CPU threads of a CPU run."""
    log.debug("compiled kernels are kept in %s", use_kernel_cache())  # before any kernel compiles
    importlib.import_module("torch")  # here, where its time shows as a phase of its own
    phases.done("imports")
    return_freed_buffers_to_os()
    if device == "cpu" or not cuda_available():
        configure_cpu_threads()


def clear_stale_temps(
    store: OutputStore, shard_ids: list[str], task_index: int, num_tasks: int, report: str
) -> None:
    """Remove what a killed earlier attempt of this task left half-written: uploads of its shards,
    heartbeat temps, and the temp file of its `report`."""
    sweep_stale_uploads(store, shard_ids, task_index, num_tasks)
    clear_heartbeat_temps(store, task_index, num_tasks)
    store.clear_state_temps(report)


def open_model(
    path: str, revision: str | None, storage_options: dict, phases: Phases
) -> tuple[ResolvedModel, object]:
    """Resolve the model and load its tokenizer at `revision`; marks the phases resolve_model and
    tokenizer (transformers' import included)."""
    model = resolve_model(path, revision, storage_options)
    phases.done("resolve_model")
    tokenizer = load_tokenizer(model.local_path, revision)
    phases.done("tokenizer")
    return model, tokenizer


def prompt_builder(settings: PipelineSettings, tokenizer, max_model_len: int) -> PromptBuilder:
    """The task's prompt builder: over OpenAI request lines for openai-batch input. Raises
    PromptSetupError for a prompt setting that cannot work with this model."""
    if settings.openai_batch is None:
        return PromptBuilder(settings.prompt, settings.sampling, tokenizer, max_model_len)
    return BatchRequestBuilder(
        settings.prompt, settings.sampling, tokenizer, max_model_len, settings.model, settings.openai_batch
    )


def row_builder(settings: PipelineSettings, tokenizer) -> RowBuilder:
    """How the output rows are made: the spec's columns, or OpenAI output lines."""
    if settings.openai_batch is not None:
        return BatchOutputRows(settings.model, lambda token_id: tokenizer.decode([token_id]))
    return settings.output


def run_pipeline(
    settings: PipelineSettings,
    tokenizer,
    store: OutputStore,
    work: list[ShardWork],
    failed: dict[str, str],
    counters: Counters,
    shard_ids: list[str],
    show_progress: bool,
) -> PipelineResult:
    """Load the backend and generate the planned `work` into `store` under a monitor (the task's
    heartbeat) and the stop signals; the backend is closed on the way out, whatever happens.

    `tokenizer`: the model's, already loaded (open_model); `failed`: shards that could not be read
    (grows as the feeder finds more); `shard_ids`: every shard of this task, for the heartbeat.
    """
    monitor = Monitor(
        store, settings.task_index, settings.num_tasks, shard_ids, counters, dict, settings.heartbeat_seconds
    )
    monitor.starting()  # before the model loads: `status` shows this attempt, and a kill now is recorded
    try:
        backend = load_backend(
            settings.local_path, settings.backend, settings.engine, settings.revision, tokenizer
        )
    except BaseException as e:
        monitor.finish("interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
    monitor.engine_stats = backend.stats
    loop = GenerationLoop(
        settings.loop, row_builder(settings, backend.tokenizer), backend, work, failed, counters
    )
    state, over_budget = "failed", None
    try:
        with StopRequested() as stop, monitor:
            builder = prompt_builder(settings, backend.tokenizer, backend.max_model_len)
            try:
                loop.run(store, builder, stop, show_progress)
            except ErrorBudgetExceeded as e:
                over_budget = str(e)
            if isinstance(builder, BatchRequestBuilder):
                for line in builder.report():
                    log.warning("%s", line)
        engine_stats = backend.stats()
        state = (
            "interrupted" if stop.requested else "failed" if loop.failed or loop.engine_error else "finished"
        )
        state = "failed" if over_budget else state
    except KeyboardInterrupt:  # a second Ctrl-C while finished rows were committed
        state = "interrupted"
        raise
    finally:
        monitor.finish(state)
        _close_backend(backend, loop.engine_error)
    return PipelineResult(
        state=state,
        signum=stop.signum if stop.requested else None,
        over_budget=over_budget,
        engine_error=loop.engine_error,
        failed=loop.failed,
        error_shards=loop.error_shards,
        engine_stats=engine_stats,
        gpu_busy=monitor.gpu_busy_mean(),
        started_at=monitor.started,
        startup=backend.startup,
    )


def _close_backend(backend, engine_error: str | None) -> None:
    """Close the backend; after an engine failure a device error may raise again here: log it only."""
    try:
        backend.close()
    except Exception as e:
        if engine_error is None:
            raise
        log.warning("closing the engine after its failure: %s: %s", type(e).__name__, e)
