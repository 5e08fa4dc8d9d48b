"""Tensor parallelism inside a forward: the rank's group, the layers whose outputs are summed or
gathered over the ranks, and the vocabulary split.

Each rank holds a slice of every decoder projection (`runner/engine/parallel/weight_split.py` cuts
them): q/k/v and
gate/up by output rows (heads, MLP width), o and down by input columns, so that a rank's o or down
output is a partial sum and one all-reduce (`Reduced`) restores the full value on every rank. The
embedding and the LM head are split by vocabulary rows (`VocabSlice`): a lookup sums the ranks'
masked rows, the logits are gathered. All ranks end a forward with the same logits, sample the
same tokens (seeded, on the device) and so keep the same token buffer without exchanging it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This process's place in its tensor-parallel group (`size` 1: no group, nothing exchanged)."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup: NCCL on CUDA, gloo on the CPU

    def part(self, n: int, what: str) -> slice:
        """This rank's contiguous share of `n` items (`what` names them in the error)."""
        if n % self.size:
            raise ValueError(f"tensor_parallel={self.size} does not divide the model's {n} {what}")
        step = n // self.size
        return slice(self.rank * step, (self.rank + 1) * step)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (a no-op on one rank)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' column blocks side by side: [R, C] on each rank -> [R, size * C], rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def reduced(self, layer):
        """`layer` with its output summed over the ranks (`layer` itself on one rank)."""
        return layer if self.size == 1 else Reduced(layer, self)


SINGLE = TensorParallel()


class Reduced:
    """A layer whose output on each rank is a partial sum (row-parallel o or down, a whole MLP or MoE
    block): calls it, then sums over the ranks. Other attributes are the layer's own."""

    def __init__(self, layer, tp: TensorParallel) -> None:
        self.layer = layer
        self.tp = tp

    def __call__(self, *args) -> torch.Tensor:
        return self.tp.all_reduce(self.layer(*args))

    def __getattr__(self, name: str):
        return getattr(self.layer, name)


@dataclass(slots=True)
class VocabSlice:
    """Embedding rows [V_r, hidden] for vocabulary ids [start, start + V_r) (all of them on one rank):
    the token embedding and, tied or not, the LM head."""

    weight: torch.Tensor  # [V_r, hidden]
    start: int
    vocab: int  # the whole vocabulary
    tp: TensorParallel

    @classmethod
    def load(
        cls, weight: torch.Tensor, device: torch.device, dtype: torch.dtype, tp: TensorParallel
    ) -> VocabSlice:
        """This rank's rows of a full [V, hidden] matrix, copied to `device` / `dtype`; the vocabulary is
        padded (with zero rows) to a multiple of the ranks."""
        vocab = weight.shape[0]
        per_rank = -(-vocab // tp.size)
        start = tp.rank * per_rank
        rows = weight.detach()[start : start + per_rank].to(device=device, dtype=dtype)
        if rows.shape[0] < per_rank:
            rows = torch.cat((rows, rows.new_zeros(per_rank - rows.shape[0], rows.shape[1])))
        return cls(rows, start, vocab, tp)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of token ids: [T] -> [T, hidden]."""
        if self.tp.size == 1:
            return self.weight[ids]
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        rows = self.weight[local.clamp(0, self.weight.shape[0] - 1)] * mine[:, None].to(self.weight.dtype)
        return self.tp.all_reduce(rows)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary: [S, hidden] -> [S, V] (model dtype)."""
        return self.tp.gather_columns(F.linear(x, self.weight))[:, : self.vocab]
