"""How much device memory the engine may take, and the message when the model or its KV cache won't fit.

The KV pool gets `kv_memory_fraction` of the memory left after the weights, minus the step's
workspace: activations of a `max_batch_tokens` forward (twice with piece graphs: their pool holds one
step's, and a step that fills too little of its bucket runs eagerly beside it) and the sampling buffers
of `max_seqs` rows ([rows, vocab] in fp32/int64, once for eager steps and once more in the CUDA graphs'
pool). The workspace grows with the config, so a pool sized from a constant share alone leaves too
little room at a large `max_seqs` over a large vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
SAMPLING_BYTES_PER_LOGIT = 64  # live bytes per (row, vocab entry) in non-greedy sampling (sort, ids, hash)


class DeviceMemoryError(RuntimeError):
    """The model or a KV cache large enough for it does not fit on the device; the message has the
    numbers and the ways out."""


@dataclass(slots=True, frozen=True)
class MemoryPlan:
    """The numbers a KV pool is sized from (bytes)."""

    free: int  # device memory free now (after the weights)
    total: int
    weights: int
    workspace: int
    page_bytes: int  # one KV page, every layer, K and V
    page_size: int


def step_workspace_bytes(
    max_batch_tokens: int, max_seqs: int, activation_width: int, vocab: int, dtype_bytes: int,
    cuda_graphs: bool, piece_graphs: bool,
) -> int:  # fmt: skip
    """Device memory a step needs beside the weights and the KV pool (an upper estimate).

    `activation_width`: activation elements per token live in a forward, as the model reports it
    (`PagedModel.activation_width`: residual, q/k/v, and its widest MLP, routed experts included).
    `piece_graphs`: eager steps run from piece graphs (`worker/piece_graphs.py`) where they fill their
    bucket."""
    activations = max_batch_tokens * activation_width * dtype_bytes
    rows = min(max_seqs, max_batch_tokens)
    sampling = rows * vocab * SAMPLING_BYTES_PER_LOGIT
    return activations * (2 if piece_graphs else 1) + sampling * (2 if cuda_graphs else 1)


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def check_weights_fit(weights: int, free: int, total: int, device: str, dtype: str) -> None:
    """Raise DeviceMemoryError when `weights` bytes can't be copied to a device with `free` bytes free."""
    if weights <= free:
        return
    raise DeviceMemoryError(
        f"engine: the model's weights need {_size(weights)} in {dtype}, {device} has "
        f"{_size(free)} free of {_size(total)}. Ways out: fp8 weights or tensor "
        "parallelism (weights split over GPUs), a GPU with more free memory, or a smaller model."
    )


def kv_pool_pages(plan: MemoryPlan, kv_memory_fraction: float, max_model_len: int, max_seqs: int,
                  max_batch_tokens: int) -> int:  # fmt: skip
    """KV pages for the pool: `kv_memory_fraction` of the free memory less the step workspace.

    Raises DeviceMemoryError when the pool could not hold one sequence of `max_model_len` tokens.
    """
    pool = int(plan.free * kv_memory_fraction) - plan.workspace
    pages = max(0, pool) // plan.page_bytes
    need_pages = -(-max_model_len // plan.page_size)
    if pages >= need_pages:
        return pages
    need = need_pages * plan.page_bytes
    raise DeviceMemoryError(
        f"engine: the KV cache does not fit: one sequence of max_model_len {max_model_len} tokens needs "
        f"{_size(need)} of KV, and {_size(max(0, pool))} are left for it "
        f"({_size(plan.free)} free of {_size(plan.total)} after {_size(plan.weights)} "
        f"of weights, x kv_memory_fraction {kv_memory_fraction}, less {_size(plan.workspace)} of "
        f"step workspace for max_seqs {max_seqs} and max_batch_tokens {max_batch_tokens}). Ways out: "
        "lower engine.max_seqs or engine.max_batch_tokens, raise engine.kv_memory_fraction, lower "
        "engine.max_model_len, an fp8 KV cache (engine.kv_cache_dtype), fp8 weights or tensor parallelism, "
        "or a GPU with more free memory."
    )
