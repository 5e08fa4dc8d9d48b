"""Engine settings (`EngineConfig`): device, dtype, sizes, parallelism, quantization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from annotated_types import Gt, Le

from runner.engine.types import Positive, check_bounds

if TYPE_CHECKING:  # torch loads when a device is resolved: the job spec reads this module without it
    import torch

DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs.

    These fields, their defaults and their bounds (the annotations) are the only declaration of the
    engine's settings: the job spec's `engine:` section is generated from them (jobs/spec/job.py).
    """

    dtype: DType = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    page_size: Positive = 16  # tokens per KV page
    # tokens (decodes + prefill chunks) in one forward; a prefill step of 8192 tokens of a small model is
    # bound by its launches (W0: 14 ms of host time for 7 ms of kernels), 16384 halves their count
    max_batch_tokens: Positive = 16384
    max_seqs: Positive = 512  # sequences running at once (the KV pool may admit fewer)
    # CUDA: share of free memory (after weights) given to the KV pool; the rest is for activations
    kv_memory_fraction: Annotated[float, Gt(0), Le(0.95)] = 0.85
    kv_cache_tokens: Positive | None = None  # explicit pool size in tokens (CPU default: 32768)
    async_mode: bool = True  # launch step N+1 before waiting for step N (CPU: same order, no overlap)
    cuda_graphs: bool = True  # replay decode-only steps from CUDA graphs (no-op on CPU)
    max_model_len: Positive | None = None  # cap on prompt + generated tokens (default: the model's)
    # fp8: decoder linear weights quantized to fp8 at load (per-channel scales, per-token activation
    # scales; torch._scaled_mm on sm90+). fp8 checkpoints (quantization_config) run in fp8 either way.
    quantization: Literal["none", "fp8"] = "none"
    # fp8: the KV cache stored as float8_e4m3fn (half the bytes of bf16: twice the pages, and decode
    # attention reads half as much), written with scale 1.0 (values clamped to +-448), as vLLM's
    # kv_cache_dtype=fp8 without checkpoint KV scales; auto: the model dtype. CUDA needs sm89+.
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    # ranks (GPUs; processes on the CPU) that split each layer's weights and heads; runtime.gpus then
    # counts groups of this many GPUs
    tensor_parallel: Positive = 1

    def __post_init__(self) -> None:
        check_bounds(self, "engine")
        if self.quantization not in ("none", "fp8"):
            raise ValueError(f"engine.quantization={self.quantization!r}: use 'none' or 'fp8'")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"engine.kv_cache_dtype={self.kv_cache_dtype!r}: use 'auto' or 'fp8'")
        if self.tensor_parallel > 1 and self.device.startswith("cuda:"):
            raise ValueError(
                f"engine.device={self.device!r} with tensor_parallel={self.tensor_parallel}: rank r runs on "
                "cuda:r of the visible GPUs; use 'cuda' (and CUDA_VISIBLE_DEVICES to pick them)"
            )
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.page_size:
            raise ValueError(
                f"engine.kv_cache_tokens={self.kv_cache_tokens}: the pool needs at least one page "
                f"({self.page_size} tokens)"
            )

    def resolve_device(self) -> torch.device:
        """The device to run on: `auto` picks CUDA when it is available."""
        return resolve_device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        """The weight/activation dtype: `auto` is bf16 on CUDA, fp32 on CPU."""
        return resolve_dtype(self.dtype, device)

    def resolve_max_model_len(self, model_max: int) -> int:
        """The longest sequence (prompt + generated): the model's own `model_max`, capped by
        `max_model_len`."""
        return min(model_max, self.max_model_len or model_max)

    def resolve_kv_dtype(self, device: torch.device, dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype: `auto` is `dtype` (the model's), `fp8` float8_e4m3fn. Raises ValueError
        on a CUDA GPU that cannot convert fp8 (compute capability below 8.9: the Triton kernels' e4m3)."""
        import torch

        from runner.engine.layers.fp8.format import FP8

        if self.kv_cache_dtype == "auto":
            return dtype
        if device.type == "cuda" and (cc := torch.cuda.get_device_capability(device)) < (8, 9):
            raise ValueError(
                f"engine.kv_cache_dtype='fp8': {device} has compute capability {cc[0]}.{cc[1]}; the fp8 KV "
                "cache needs 8.9+ (Ada, Hopper) for its e4m3 conversions: use 'auto' on this GPU"
            )
        return FP8


def resolve_device(device: str) -> torch.device:
    """`device` as a torch device: `auto` picks CUDA when it is available (shared by both backends)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"engine.device={device!r}: CUDA is not available here (use 'cpu' or 'auto')")
    return resolved


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    """`dtype` as a torch dtype: `auto` is bf16 on CUDA, fp32 on CPU (shared by both backends)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
