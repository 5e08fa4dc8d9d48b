"""The `transformers` backend: transformers' own continuous batching behind the batchrun engine contract.

transformers' `ContinuousBatchingManager` runs a background thread over a paged KV cache; this backend
feeds it request by request (`add`) and collects finished ones (`step`), so the caller keeps the number
in flight bounded (back-pressure) instead of handing over one giant `generate_batch` list. It runs on
CUDA and on the CPU. On the CPU its greedy tokens equal `model.generate`'s (checked in the tests). On
an H100 with transformers 5.23, bf16 differs from `generate` only at near-ties, but fp32 is wrong when
several prompts are prefilled in one batch (22 of 64 greedy sequences equal, first tokens off by top-2
logit gaps up to 0.5; one prompt at a time is exact): use bf16 on CUDA, the default.

transformers fixes a few settings per manager rather than per request — greedy vs sampling, min-p,
logprobs, the random seed — and each manager takes most of the free GPU memory for its KV cache, so
one manager runs at a time: a request that needs other settings waits until the running manager has
drained, then a new one starts (a job with one SamplingParams never switches). Temperature, top-k and
top-p are per request. `seed` is best effort: the manager is seeded once with the seed of the request
that starts it, so samples depend on what else is in flight. Stop strings are checked on the decoded
text of streamed tokens, and the request is cancelled as soon as one appears.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

from runner.engine.config import resolve_device, resolve_dtype
from runner.engine.core.stops import find_stop, whole_characters
from runner.engine.text.eos import eos_token_ids
from runner.engine.types import Completion, InFlight, Request, SamplingParams

_POLL_S = 0.05  # how long step() waits for the first finished request before returning []
# On the CPU transformers would size the KV cache from host RAM; bigger batches only cost memory there
_CPU_PAGE_SIZE = 64
_CPU_KV_TOKENS = 8192  # also the longest sequence the backend takes on the CPU
_CPU_MAX_BATCH_TOKENS = 256


@dataclass(slots=True)
class _Sample:
    """One transformers request: a sample of a caller's Request (`copies` > 1: identical greedy samples)."""

    request: Request
    key: int  # internal id of the caller's request
    sample_index: int
    copies: int
    stop_ids: frozenset[int]


@dataclass(slots=True, frozen=True)
class _ManagerKey:
    greedy: bool
    min_p: float
    logprobs: bool


class TransformersBackend:
    """Runs requests on transformers' continuous batching; same contract as the batchrun engine."""

    def __init__(self, model, tokenizer, max_batch_tokens: int | None = None):
        """`model`: a loaded causal LM on its device. `max_batch_tokens` bounds the tokens of one forward
        (None: transformers' choice). On CUDA transformers sizes the KV cache from free memory; on the CPU
        the cache holds 8192 tokens and batches are capped at 256 tokens."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.startup: dict[str, float] = {}  # {phase: time.monotonic() at its end}, as the engine's
        positions = model.config.get_text_config().max_position_embeddings
        if model.device.type == "cpu":
            self.max_model_len: int = min(positions, _CPU_KV_TOKENS)
            self._cache_sizes = dict(
                page_size=_CPU_PAGE_SIZE,
                num_blocks=_CPU_KV_TOKENS // _CPU_PAGE_SIZE,
                max_batch_tokens=min(max_batch_tokens or _CPU_MAX_BATCH_TOKENS, _CPU_MAX_BATCH_TOKENS),
            )
        else:
            self.max_model_len = positions
            self._cache_sizes = dict(max_batch_tokens=max_batch_tokens)
        self._eos_ids = eos_token_ids(model, tokenizer)
        self._vocab_size: int = model.config.get_text_config().vocab_size
        self._manager = None  # the running transformers manager, and what it was made for
        self._manager_key: _ManagerKey | None = None
        self._managers_started = 0
        self._waiting: deque[tuple[int, Request]] = deque()  # requests for the next manager
        self._samples: dict[str, _Sample] = {}  # transformers request id -> sample in the running manager
        self._remaining: dict[int, int] = {}  # caller request key -> samples not yet completed
        self._keys = itertools.count()
        self._completed = self._generated = 0

    @classmethod
    def from_pretrained(
        cls,
        local_path: str,
        dtype: str = "auto",
        device: str = "auto",
        max_batch_tokens: int | None = None,
        max_model_len: int | None = None,
        *,
        revision: str | None = None,
        tokenizer=None,
    ) -> TransformersBackend:
        """Load a model folder (or hub id, at `revision`): `dtype` "auto" is bf16 on CUDA and fp32 on the
        CPU; `device` "auto" is CUDA when available (the engine's rules: runner/engine/config.py).
        `max_model_len` caps prompt + generated tokens below the model's own limit; `tokenizer`: one the
        caller already loaded."""
        from transformers import AutoModelForCausalLM

        from runner.models.resolve import load_tokenizer

        torch_device = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(
            local_path, dtype=resolve_dtype(dtype, torch_device), revision=revision
        ).to(torch_device)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(local_path, revision)
        backend = cls(model, tokenizer, max_batch_tokens=max_batch_tokens)
        backend.startup["model_load"] = time.monotonic()
        if max_model_len is not None:
            backend.max_model_len = min(backend.max_model_len, max_model_len)
        return backend

    # --- the engine contract -------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue `request`; never blocks on generation."""
        sampling = request.sampling
        if not request.prompt_ids:
            raise ValueError(f"request {request.id!r}: empty prompt")
        if sampling.grammar is not None:
            raise ValueError(
                f"request {request.id!r}: sampling.{sampling.grammar[0]} (structured output) needs the "
                "batchrun engine; the transformers backend does not constrain output "
                "(set engine.backend: batchrun)"
            )
        if len(request.prompt_ids) + sampling.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"request {request.id!r}: prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                f"({sampling.max_new_tokens}) exceeds the model's {self.max_model_len} positions "
                "(shorten the prompt or lower max_new_tokens)"
            )
        key = next(self._keys)
        self._remaining[key] = sampling.n
        if self._manager_key == _manager_key(sampling) and not self._waiting:
            self._submit(key, request)
        else:  # after the running manager drains (transformers fixes these settings per manager)
            self._waiting.append((key, request))
            self._maybe_switch_manager()

    def step(self) -> list[Completion]:
        """Return the completions that finished since the last call (waits briefly for at least one)."""
        done: list[Completion] = []
        if self._manager is not None and self._samples:
            _raise_if_dead(self._manager)
            output = self._manager.get_result(timeout=_POLL_S)
            while output is not None:
                done.extend(self._on_output(output))
                output = self._manager.get_result(timeout=0)
        self._maybe_switch_manager()
        return done

    def has_unfinished(self) -> bool:
        return bool(self._remaining)

    @property
    def num_unfinished(self) -> int:
        """Requests added and not yet fully completed (all their samples)."""
        return len(self._remaining)

    def progress(self) -> InFlight:
        """transformers' batching does not say how far its requests are: rows count when they finish."""
        return InFlight(0.0, 0)

    def stats(self) -> dict:
        return {
            "backend": "transformers",
            "completions": self._completed,
            "generated_tokens": self._generated,
            "unfinished": self.num_unfinished,
            "managers_started": self._managers_started,
        }

    def close(self) -> None:
        """Stop transformers' background thread (unfinished requests are dropped)."""
        self._stop_manager()
        self._waiting.clear()

    # --- internals -----------------------------------------------------------------------------------

    def _submit(self, key: int, request: Request) -> None:
        sampling = request.sampling
        stop_ids = frozenset(sampling.stop_token_ids) | (
            frozenset() if sampling.ignore_eos else self._eos_ids
        )
        # greedy samples are identical: generate one and copy it
        runs = [(0, sampling.n)] if sampling.greedy else [(i, 1) for i in range(sampling.n)]
        for sample_index, copies in runs:
            rid = f"{key}:{sample_index}"
            self._samples[rid] = _Sample(request, key, sample_index, copies, stop_ids)
            self._manager.add_request(
                list(request.prompt_ids),
                request_id=rid,
                max_new_tokens=sampling.max_new_tokens,
                streaming=bool(sampling.stop),
                eos_token_id=sorted(stop_ids),
                **_per_request_kwargs(sampling, self._vocab_size),
            )

    def _maybe_switch_manager(self) -> None:
        """Once the running manager has drained, start the one the waiting requests need."""
        if self._samples or not self._waiting:
            return
        self._stop_manager()
        first = self._waiting[0][1].sampling
        self._manager_key = _manager_key(first)
        self._manager = self._start_manager(self._manager_key, first.seed)
        while self._waiting and _manager_key(self._waiting[0][1].sampling) == self._manager_key:
            self._submit(*self._waiting.popleft())

    def _stop_manager(self) -> None:
        if self._manager is not None:
            self._manager.stop(block=True, hard_stop=True)
            self._manager.destroy()
        self._manager = self._manager_key = None
        self._samples.clear()

    def _start_manager(self, key: _ManagerKey, seed: int | None):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if key.greedy:
            generation = GenerationConfig(do_sample=False)
        else:
            # values that make transformers create the temperature/top-k/top-p processors; every request
            # then passes its own values (`_per_request_kwargs`)
            generation = GenerationConfig(
                do_sample=True,
                temperature=0.5,
                top_k=self._vocab_size,
                top_p=0.5,
                min_p=key.min_p or None,
            )
        generation.eos_token_id = -1  # every request passes its own stop ids
        cb_config = ContinuousBatchingConfig(
            return_logprobs=key.logprobs,
            seed=seed,
            per_request_processors=not key.greedy,
            **self._cache_sizes,
        )
        manager = self.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=cb_config
        )
        # A caller that never calls close() must still be able to exit: threads inherit daemon-ness from
        # their creator, so starting the manager from a daemon thread makes its loop a daemon (the
        # interpreter does not wait for it), and the atexit hook stops it between two steps.
        starter = threading.Thread(target=manager.start, daemon=True)
        starter.start()
        starter.join()
        _running_managers.add(manager)
        self._managers_started += 1
        return manager

    def _on_output(self, output) -> list[Completion]:
        if output.error is not None:
            raise RuntimeError(f"transformers backend: request {output.request_id} failed: {output.error}")
        sample = self._samples.get(output.request_id)
        if sample is None:  # a streamed output that arrived after we cut the request at a stop string
            return []
        tokens = list(output.generated_tokens)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = find_stop(text, sample.request.sampling.stop)
        if cut is None and not output.is_finished():
            return []
        if cut is not None:
            text, reason = text[:cut], "stop"
            if not output.is_finished():
                self._manager.cancel_request(output.request_id)
        else:
            reason = "stop" if tokens and tokens[-1] in sample.stop_ids else "length"
            text = whole_characters(self.tokenizer, tokens) if reason == "length" else text
        del self._samples[output.request_id]
        logprobs = list(output.logprobs) if sample.request.sampling.logprobs else None
        completions = [
            Completion(
                id=sample.request.id,
                token_ids=list(tokens),
                finish_reason=reason,
                prompt_tokens=len(sample.request.prompt_ids),
                text=text,
                sample_index=sample.sample_index + copy,
                logprobs=None if logprobs is None else list(logprobs),
            )
            for copy in range(sample.copies)
        ]
        self._remaining[sample.key] -= len(completions)
        if self._remaining[sample.key] == 0:
            del self._remaining[sample.key]
        self._completed += len(completions)
        self._generated += len(tokens) * len(completions)
        return completions


def _manager_key(sampling: SamplingParams) -> _ManagerKey:
    return _ManagerKey(sampling.greedy, 0.0 if sampling.greedy else sampling.min_p, sampling.logprobs)


_running_managers: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_running_managers() -> None:
    for manager in list(_running_managers):
        if manager.is_running():
            manager.stop(block=True, hard_stop=True)


def _per_request_kwargs(sampling: SamplingParams, vocab_size: int) -> dict:
    if sampling.greedy:
        return {}
    return {
        "temperature": float(sampling.temperature),
        "top_k": int(sampling.top_k) if sampling.top_k > 0 else vocab_size,
        "top_p": float(sampling.top_p),
    }


def _raise_if_dead(manager) -> None:
    error = manager.background_thread_status.fatal_error
    if error is not None:
        raise RuntimeError(f"transformers backend: the generation thread died: {error}") from error
