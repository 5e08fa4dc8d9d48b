"""Engine settings (`EngineConfig`) and the error that sends a model to the fallback backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


class UnsupportedModel(Exception):
    """The fast path cannot run this model; the caller falls back to the transformers backend.

    The message says why (architecture, rope type, ...), so the caller can log it.
    """


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs. The job spec's `engine:` section maps onto these names."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    page_size: int = 16  # tokens per KV page
    max_batch_tokens: int = 8192  # tokens (decodes + prefill chunks) in one forward
    max_seqs: int = 512  # sequences running at once
    kv_memory_fraction: float = 0.85  # CUDA: share of free memory (after weights) given to the KV pool
    kv_cache_tokens: int | None = None  # explicit pool size in tokens (CPU default: 32768)
    async_mode: bool = True  # launch step N+1 before waiting for step N (CPU: same order, no overlap)
    cuda_graphs: bool = True  # replay decode-only steps from CUDA graphs (no-op on CPU)
    max_model_len: int | None = None  # cap on prompt + generated tokens (default: the model's)
    # fp8: decoder linear weights quantized to fp8 at load (per-channel scales, per-token activation
    # scales; torch._scaled_mm on sm90+). fp8 checkpoints (quantization_config) run in fp8 either way.
    quantization: Literal["none", "fp8"] = "none"

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.max_batch_tokens < 1 or self.max_seqs < 1:
            raise ValueError("engine: page_size, max_batch_tokens and max_seqs must be positive integers")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"engine.kv_memory_fraction={self.kv_memory_fraction}: use a value in (0, 1]")
        if self.quantization not in ("none", "fp8"):
            raise ValueError(f"engine.quantization={self.quantization!r}: use 'none' or 'fp8'")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.page_size:
            raise ValueError(
                f"engine.kv_cache_tokens={self.kv_cache_tokens}: the pool needs at least one page "
                f"({self.page_size} tokens)"
            )

    def resolve_device(self) -> torch.device:
        """The device to run on: `auto` picks CUDA when it is available."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"engine.device={self.device!r}: CUDA is not available here (use 'cpu' or 'auto')"
            )
        return device

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        """The weight/activation dtype: `auto` is bf16 on CUDA, fp32 on CPU."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
