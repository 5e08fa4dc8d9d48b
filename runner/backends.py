"""Pick and load the generation backend: the batchrun engine, or transformers as the fallback."""

from __future__ import annotations

import logging

from jobs.spec import EngineSpec

log = logging.getLogger(__name__)


def load_backend(model_path: str, spec: EngineSpec, revision: str | None = None, tokenizer=None):
    """An object with the engine contract (add / step / has_unfinished / num_unfinished).

    `auto` takes the batchrun engine and falls back to transformers' continuous batching, with a
    log line saying why, for models the engine's fast path can't run. Config, weights and (unless
    `tokenizer` is given, already loaded) the tokenizer are all loaded at `revision`.
    """
    if spec.backend in ("auto", "batchrun"):
        from runner.engine import Engine, EngineConfig, UnsupportedModel

        config = EngineConfig(
            dtype=spec.dtype,
            device=spec.device,
            page_size=spec.page_size,
            max_batch_tokens=spec.max_batch_tokens,
            max_seqs=spec.max_seqs,
            kv_memory_fraction=spec.kv_memory_fraction,
            kv_cache_tokens=spec.kv_cache_tokens,
            max_model_len=spec.max_model_len,
            async_mode=spec.async_mode,
            cuda_graphs=spec.cuda_graphs,
            quantization=spec.quantization,
        )
        try:
            return Engine.from_pretrained(model_path, config=config, revision=revision, tokenizer=tokenizer)
        except UnsupportedModel as e:
            if spec.backend == "batchrun":
                raise
            log.warning("the batchrun engine can't run this model (%s); using the transformers backend", e)
            if spec.quantization != "none":
                log.warning("engine.quantization=%s: not applied by transformers", spec.quantization)
    from runner.hf_backend import TransformersBackend

    return TransformersBackend.from_pretrained(
        model_path,
        dtype=spec.dtype,
        device=spec.device,
        max_batch_tokens=spec.max_batch_tokens,
        revision=revision,
        tokenizer=tokenizer,
    )
