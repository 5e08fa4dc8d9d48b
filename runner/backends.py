"""The generation backend contract (`Backend`), and picking one: the batchrun engine, or transformers as
the fallback (runner/hf_backend.py)."""

from __future__ import annotations

import logging
from typing import Literal, Protocol, runtime_checkable

from runner.engine.config import EngineConfig
from runner.engine.types import Completion, InFlight, Request

log = logging.getLogger(__name__)

BackendName = Literal["auto", "batchrun", "transformers"]


@runtime_checkable
class Backend(Protocol):
    """What the generation loop drives: the batchrun `Engine` and `TransformersBackend` both are one."""

    tokenizer: object  # the model's tokenizer (prompts are tokenized with it)
    max_model_len: int  # prompt + generated tokens that one request may take
    # start-up phases so far, {phase: time.monotonic() at its end}: model_load ... first_token
    startup: dict[str, float]

    @property
    def num_unfinished(self) -> int:
        """Requests added and not yet completed (all their samples)."""
        ...

    def add(self, request: Request) -> None:
        """Queue a request; cheap, never waits on generation."""
        ...

    def step(self) -> list[Completion]:
        """Advance generation; returns the samples that finished since the last call."""
        ...

    def has_unfinished(self) -> bool: ...

    def progress(self) -> InFlight:
        """How far the requests in flight are (a long prompt's prefill moves it)."""
        ...

    def stats(self) -> dict:
        """Plain counters for the heartbeat and the summary."""
        ...

    def close(self) -> None:
        """Free the model and its caches; unfinished requests are dropped."""
        ...


def load_backend(
    model_path: str, backend: BackendName, config: EngineConfig, revision: str | None = None, tokenizer=None
) -> Backend:
    """The backend for a resolved model folder.

    `auto` takes the batchrun engine and falls back to transformers' continuous batching, with a
    log line saying why, for models the engine's fast path can't run. Config, weights and (unless
    `tokenizer` is given, already loaded) the tokenizer are all loaded at `revision`.
    """
    if backend in ("auto", "batchrun"):
        from runner.engine import Engine, UnsupportedModel

        try:
            return Engine.from_pretrained(model_path, config=config, revision=revision, tokenizer=tokenizer)
        except UnsupportedModel as e:
            if backend == "batchrun":
                raise
            log.warning("the batchrun engine can't run this model (%s); using the transformers backend", e)
            if config.quantization != "none":
                log.warning("engine.quantization=%s: not applied by transformers", config.quantization)
            if config.kv_cache_dtype != "auto":
                log.warning("engine.kv_cache_dtype=%s: not applied by transformers", config.kv_cache_dtype)
    from runner.hf_backend import TransformersBackend

    return TransformersBackend.from_pretrained(
        model_path,
        dtype=config.dtype,
        device=config.device,
        max_batch_tokens=config.max_batch_tokens,
        max_model_len=config.max_model_len,
        revision=revision,
        tokenizer=tokenizer,
    )
