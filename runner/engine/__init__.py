"""batchrun's continuous-batching engine: paged KV cache, chunked prefill, device-side sampling."""

from runner.engine.config import EngineConfig, UnsupportedModel
from runner.engine.engine import Engine
from runner.engine.types import Completion, Request, SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "Request", "SamplingParams", "UnsupportedModel"]
