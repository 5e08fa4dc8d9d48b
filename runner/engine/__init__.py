"""batchrun's continuous-batching engine: paged KV cache, chunked prefill, device-side sampling.

The names below load on first use: `import runner.engine.config` (the job spec's settings) must not
import torch, so that a job with nothing to do, `batchrun status` and `batchrun validate` start fast.
"""

import importlib

_HOMES = {
    "Completion": "runner.engine.types",
    "Engine": "runner.engine.engine",
    "EngineConfig": "runner.engine.config",
    "Request": "runner.engine.types",
    "SamplingParams": "runner.engine.types",
    "UnsupportedModel": "runner.engine.types",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'runner.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
