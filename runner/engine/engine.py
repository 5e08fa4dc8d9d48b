"""The engine: requests in, completions out, one scheduler step at a time."""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from runner.engine.config import EngineConfig
from runner.engine.core.scheduler import ScheduledBatch, Scheduler
from runner.engine.core.sequence import Sequence
from runner.engine.core.stops import StopChecker
from runner.engine.loading.source import ModelSource
from runner.engine.models import model_shape
from runner.engine.parallel.group import Group, rank_device, start_group
from runner.engine.parallel.weight_split import check_split
from runner.engine.sample.grammar import GrammarError
from runner.engine.sample.grammar_worker import Grammars
from runner.engine.text.eos import eos_token_ids
from runner.engine.text.tokenizer import load_tokenizer
from runner.engine.types import Completion, InFlight, Request
from runner.engine.worker.build import build_runner, follow
from runner.engine.worker.model_runner import LaunchedStep

log = logging.getLogger(__name__)


class Engine:
    """Continuous-batching generation over a paged KV cache for Llama-family models.

    `add` queues requests (cheap); each `step` launches one forward over decodes and prefill chunks
    and returns the completions that finished; `generate` drives both for an iterable of requests.
    With `async_mode` a step launches forward N+1 before it waits for forward N's tokens, so the
    host schedules while the device computes; completions then come one step later. A step with
    grammar rows (structured output) launches forward N+1, takes N's tokens and starts filling N+1's
    grammar bitmask in the grammar worker; the host hands out N's completions and schedules N+2 while
    the fill runs, and the next step launches N+1's sampling under the bitmask before N+2's forward.
    """

    def __init__(
        self, model, config: EngineConfig | None = None, tokenizer=None, group: Group | None = None
    ) -> None:
        """`model`: a loaded transformers causal LM (its weights are copied to the engine's device/dtype).
        `group`: with `tensor_parallel` > 1, the group `from_source` started (`model` is then rank 0's
        slice)."""
        self.config = config = config or EngineConfig()
        if config.tensor_parallel > 1 and group is None:
            raise ValueError(
                f"engine.tensor_parallel={config.tensor_parallel}: every rank loads its own slice of the "
                "model; build the engine with Engine.from_pretrained or Engine.from_source"
            )
        shape = model_shape(model.config)  # raises UnsupportedModel first, before any copying
        self.tokenizer = tokenizer
        self.max_model_len = config.resolve_max_model_len(shape.max_model_len)
        self.model, self.kv, self.model_runner = build_runner(model, config, group)
        device, dtype, num_pages = self.model.device, self.model.dtype, self.kv.num_pages
        self._eos_ids = eos_token_ids(model, tokenizer)
        self._vocab = shape.vocab
        self._grammars: Grammars | None = None  # built on the first request with a grammar
        stops = StopChecker(self._eos_ids, tokenizer, self.max_model_len)
        self.scheduler = Scheduler(self.kv, stops, config.max_batch_tokens)
        self._in_flight: deque[tuple[ScheduledBatch, LaunchedStep]] = deque()  # oldest first
        self._filling: LaunchedStep | None = None  # a masked step whose bitmask the grammar worker fills
        self._unreleased: list[Sequence] = []  # finished while a step that may use them is in flight
        self._graph_steps = 0
        kv_cache = self.model_runner.kv_cache
        self._page_bytes = kv_cache[:, :, 0].numel() * kv_cache.element_size()
        self._num_added = 0
        self._num_unfinished = 0
        self._samples_left: dict[int, int] = {}  # request order -> samples not yet completed
        self._host_wait_s = 0.0
        self._grammar_s = 0.0  # host time the loop spends on grammars: matcher updates, waits for bitmasks
        self._rng = random.Random()
        # start-up phases, as {phase: time.monotonic() at its end} (runner/telemetry/phases.py reads them)
        self.startup: dict[str, float] = {"engine_build": time.monotonic()}
        if self.model_runner.capture_graphs():
            self.startup["graph_capture"] = time.monotonic()
        ranks = f" x {config.tensor_parallel} ranks (tensor parallel)" if group is not None else ""
        log.info(
            "batchrun engine: %s on %s%s (%s), %d KV pages x %d tokens",
            model.config.model_type,
            device,
            ranks,
            dtype,
            num_pages,
            config.page_size,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: EngineConfig | None = None,
        *,
        revision: str | None = None,
        tokenizer=None,
    ) -> Engine:
        """Load a local Hugging Face folder (or hub id, at `revision`) and build the engine on it.
        `tokenizer`: one the caller already loaded (else it is loaded from `path` too).

        fp8 checkpoints (`quantization_config`), and any safetensors folder with `quantization="fp8"`,
        load tensor by tensor straight to the device (`loading/loader.py`); others load with transformers.
        """
        from runner.engine.loading.loader import load_config, load_hf_model

        config = config or EngineConfig()
        hf_config = load_config(path, revision)
        model_shape(hf_config)  # unsupported models fail before loading weights
        if config.tensor_parallel > 1:
            if tokenizer is None:
                tokenizer = _load_tokenizer(path, revision)
            return cls.from_source(ModelSource(path=str(path), revision=revision), config, tokenizer)
        device = config.resolve_device()
        marks = {}
        if device.type == "cuda":
            torch.zeros(1, device=device)  # the CUDA context: a phase of its own, not part of the load
            marks["cuda_init"] = time.monotonic()
        dtype = config.resolve_dtype(device)
        fp8 = config.quantization == "fp8"
        model = load_hf_model(path, dtype, device, fp8, hf_config, revision=revision)
        if tokenizer is None:
            tokenizer = _load_tokenizer(path, revision)
        marks["model_load"] = time.monotonic()
        engine = cls(model, config, tokenizer)
        engine.startup = marks | engine.startup
        return engine

    @classmethod
    def from_source(cls, source: ModelSource, config: EngineConfig, tokenizer=None) -> Engine:
        """An engine over `config.tensor_parallel` ranks: spawns ranks 1..N-1, each loading its slice of
        the model from `source` and following this process's steps, which runs rank 0."""
        device = config.resolve_device()
        if source.path is not None:  # a factory's model is checked as each rank cuts it
            from runner.engine.loading.loader import load_config

            check_split(load_config(source.path, source.revision), config.tensor_parallel)
        if device.type == "cuda" and torch.cuda.device_count() < config.tensor_parallel:
            raise ValueError(
                f"engine.tensor_parallel={config.tensor_parallel} needs as many GPUs; "
                f"{torch.cuda.device_count()} visible"
            )
        group = start_group(source, config, device, follow)
        try:
            dtype = config.resolve_dtype(device)
            model = source.load(dtype, rank_device(device, 0), config.quantization == "fp8", group.tp)
            marks = {"model_load": time.monotonic()}
            engine = cls(model, config, tokenizer, group)
        except BaseException:
            group.close()
            raise
        engine.startup = marks | engine.startup
        return engine

    @property
    def num_unfinished(self) -> int:
        """Requests added and not yet completed (all their samples)."""
        return self._num_unfinished

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._in_flight)

    def progress(self) -> InFlight:
        """How far the requests in flight are: each sample's computed tokens (prompt chunks, then generated
        ones) over its prompt + max_new_tokens, over its request's samples; and the tokens generated."""
        seqs = (*self.scheduler.running, *self.scheduler.waiting)
        return InFlight(
            sum(s.num_computed / ((s.prompt_len + s.params.max_new_tokens) * s.params.n) for s in seqs),
            sum(s.num_generated for s in seqs),
        )

    def add(self, request: Request) -> None:
        """Queue a request; raises ValueError when it can never run (too long, stop strings, no tokenizer)."""
        sp = request.sampling
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0:
            raise ValueError(f"request {request.id!r}: empty prompt")
        if prompt_len >= self.max_model_len:
            raise ValueError(
                f"request {request.id!r}: prompt of {prompt_len} tokens leaves no room to generate "
                f"(max_model_len {self.max_model_len}); shorten or skip it"
            )
        if sp.stop and self.tokenizer is None:
            raise ValueError(f"request {request.id!r}: stop strings need a tokenizer (pass tokenizer=...)")
        if sp.n < 1 or sp.max_new_tokens < 1:
            raise ValueError(f"request {request.id!r}: n and max_new_tokens must be >= 1")
        pages = self.kv.pages_for(min(prompt_len + sp.max_new_tokens, self.max_model_len))
        if pages > self.kv.num_pages:
            raise ValueError(
                f"request {request.id!r} needs {pages} KV pages, the pool has {self.kv.num_pages}: raise "
                f"engine.kv_cache_tokens (or kv_memory_fraction) or lower max_new_tokens"
            )
        matchers = self._matchers(request) if sp.grammar is not None else [None] * sp.n
        seed = sp.seed if sp.seed is not None else self._rng.getrandbits(63)
        seqs = [
            Sequence(
                request_id=request.id,
                sample_index=i,
                params=sp,
                prompt_len=prompt_len,
                tokens=list(request.prompt_ids),
                seed=seed,
                order=self._num_added,
                logprobs=[] if sp.logprobs else None,
                matcher=matchers[i],
            )
            for i in range(sp.n)
        ]
        seqs[0].siblings = seqs[1:]
        self.scheduler.add(seqs[0])
        self._num_added += 1
        self._num_unfinished += 1
        self._samples_left[seqs[0].order] = sp.n

    def _matchers(self, request: Request) -> list:
        """One grammar matcher (its key) per sample of `request`; ValueError naming the field if the
        grammar cannot compile."""
        kind = request.sampling.grammar[0]
        if self.tokenizer is None:
            raise ValueError(
                f"request {request.id!r}: sampling.{kind} needs a tokenizer (pass tokenizer=...)"
            )
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self._vocab, self._eos_ids, pin=self.model_runner.cuda)
        try:
            return self._grammars.matchers(request.sampling.grammar, request.sampling.n)
        except GrammarError as e:
            raise ValueError(f"request {request.id!r}: sampling.{kind}: {e}") from None

    def step(self) -> list[Completion]:
        """Launch the next forward, take the tokens of the previous one; returns the samples that finished.

        Synchronous mode takes the tokens of the forward it just launched. A masked step (grammar rows)
        takes every earlier step's tokens first, then starts the fill of its bitmask; its sampling is
        launched when the next step needs it (or at once in synchronous mode).
        """
        batch = self.scheduler.schedule()
        self._sample_masked()
        masked = self._launch(batch)
        keep = self._steps_to_keep_in_flight(batch)
        finished: list[Sequence] = []
        while len(self._in_flight) > max(keep, masked):
            finished += self._postprocess(*self._wait_oldest())
        if masked:
            self._start_fill(batch)
        while len(self._in_flight) > keep:
            self._sample_masked()
            finished += self._postprocess(*self._wait_oldest())
        return [self._complete(seq) for seq in finished]

    def _launch(self, batch: ScheduledBatch) -> bool:
        """Queue `batch`'s forward on the device (returns at once); True if its sampling waits for a
        grammar bitmask (`_sample_masked`)."""
        if not batch.seqs:
            assert self._in_flight or not self.scheduler.has_work(), "scheduler stalled with work left"
            return False
        masked = any(batch.seqs[r].matcher is not None for r in batch.sample_rows)
        self._in_flight.append((batch, self.model_runner.launch(batch, masked)))
        return masked

    def _start_fill(self, batch: ScheduledBatch) -> None:
        """Start filling the bitmask of the step just launched (every earlier step's tokens are known)."""
        launched = self._in_flight[-1][1]
        t0 = time.perf_counter()
        self._grammars.start_fill(
            [batch.seqs[r] for r in batch.sample_rows], self.model_runner.mask_rows(launched)
        )
        self._filling = launched
        self._grammar_s += time.perf_counter() - t0

    def _sample_masked(self) -> None:
        """Queue the sampling of the step whose bitmask is being filled, once it is filled (no-op if none)."""
        if self._filling is None:
            return
        t0 = time.perf_counter()
        bitmask = self._grammars.wait_fill()
        self._grammar_s += time.perf_counter() - t0
        self.model_runner.sample(self._filling, bitmask)
        self._filling = None

    def _steps_to_keep_in_flight(self, batch: ScheduledBatch) -> int:
        """Async: the step just launched runs on while the host takes the one before; sync: none."""
        return 1 if self.config.async_mode and batch.seqs else 0

    def _wait_oldest(self) -> tuple[ScheduledBatch, list[int], list[float] | None]:
        """Block until the oldest launched step's sampled tokens are on the host."""
        batch, launched = self._in_flight.popleft()
        t0 = time.perf_counter()
        tokens, logprobs = self.model_runner.wait(launched)
        self._host_wait_s += time.perf_counter() - t0
        self.startup.setdefault("first_token", time.monotonic())
        self._graph_steps += launched.graphed
        return batch, tokens, logprobs

    def _postprocess(
        self, batch: ScheduledBatch, tokens: list[int], logprobs: list[float] | None
    ) -> list[Sequence]:
        """Apply a completed step's tokens; frees the finished sequences that no step in flight uses."""
        for seq in self._unreleased:  # finished while this step was in flight: it is done now
            self.scheduler.release(seq)
        if self._grammars is not None:
            t0 = time.perf_counter()
            self._grammars.advance([batch.seqs[r] for r in batch.sample_rows], tokens)
            self._grammar_s += time.perf_counter() - t0
        finished = self.scheduler.postprocess(batch, tokens, logprobs)
        self._unreleased = finished if self._in_flight else []
        if not self._in_flight:
            for seq in finished:
                self.scheduler.release(seq)
        return finished

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Add every request, then step until all are done, yielding completions as they finish."""
        for request in requests:
            self.add(request)
        while self.has_unfinished():
            yield from self.step()

    def stats(self) -> dict[str, float | int]:
        """Plain counters since the engine was built."""
        st = self.scheduler.stats
        out: dict[str, float | int] = {name: getattr(st, name) for name in st.__slots__}
        out.update(
            kv_pages_total=self.kv.num_pages,
            kv_pages_used=self.kv.num_used_pages,
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            kv_page_size=self.kv.page_size,
            kv_page_bytes=self._page_bytes,
            host_wait_s=round(self._host_wait_s, 6),
            grammar_s=round(self._grammar_s, 6),
            graph_steps=self._graph_steps,
            graphs_captured=len(self.model_runner.graphs or ()),
            graph_capture_s=round(self.model_runner.graphs.capture_seconds, 3)
            if self.model_runner.graphs
            else 0.0,
            piece_graphs=len(self.model_runner.pieces or ()),
            piece_capture_s=round(self.model_runner.pieces.capture_seconds, 3)
            if self.model_runner.pieces
            else 0.0,
            requests_added=self._num_added,
        )
        return out

    def close(self) -> None:
        """Give back everything the engine took on the device: the engine's copy of the weights, the KV
        cache, the CUDA graphs and their memory pool, the token and staging buffers, and the cuBLAS
        workspaces of its streams; the engine is done. Requests still queued or in flight are dropped.
        """
        cuda = self.model_runner.cuda
        group = self.model_runner.group
        if cuda and not (group is not None and group.lost):  # a lost rank's collectives never complete
            torch.cuda.synchronize(self.model.device)
        if self._grammars is not None:
            self._grammars.close()
        self.model_runner.close()
        self._in_flight.clear()
        self._filling = None
        self._unreleased = []
        self.scheduler.waiting.clear()
        self.scheduler.running.clear()
        self.model = None
        if cuda:
            torch._C._cuda_clearCublasWorkspaces()  # kept per stream by torch until cleared
            torch.cuda.empty_cache()

    def _complete(self, seq: Sequence) -> Completion:
        assert seq.finish_reason is not None
        if self._grammars is not None:
            self._grammars.release(seq)
        self._samples_left[seq.order] -= 1
        if self._samples_left[seq.order] == 0:
            del self._samples_left[seq.order]
            self._num_unfinished -= 1
        return Completion(
            id=seq.request_id,
            token_ids=seq.generated,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.prompt_len,
            text=None if self.tokenizer is None else self.scheduler.stops.text(seq),
            sample_index=seq.sample_index,
            logprobs=seq.logprobs,
        )


def _load_tokenizer(path: str | Path, revision: str | None):
    """The model folder's tokenizer (`tokenizer.load_tokenizer`), or None (with a warning) if it has none."""
    try:
        return load_tokenizer(path, revision)
    except (OSError, ValueError):
        log.warning("no tokenizer in %s: completions will carry token ids only", path)
        return None
