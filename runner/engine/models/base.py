"""What every model family offers the engine: its shape, read from the HF config, and a paged forward."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from runner.engine.layers.attention.torch import AttentionBatch, AttentionFn
from runner.engine.parallel.layers import TensorParallel


@dataclass(slots=True, frozen=True)
class ModelShape:
    num_layers: int
    hidden: int
    intermediate: int  # dense MLP width (`intermediate_size`; the model reports its MLP workspace)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_model_len: int  # positions the model can take (capped by a sliding window)


def local_shape(shape: ModelShape, tp: TensorParallel) -> ModelShape:
    """The shape one rank of `tp` runs: its share of the q heads and of the KV heads (one KV head each
    when the ranks outnumber them: `parallel/weight_split.py` gives ranks copies) and of the MLP width."""
    if tp.size == 1:
        return shape
    return replace(
        shape,
        num_heads=shape.num_heads // tp.size,
        num_kv_heads=max(shape.num_kv_heads // tp.size, 1),
        intermediate=shape.intermediate // tp.size,
    )


class MLP(Protocol):
    """A decoder layer's MLP (`layers.linear.GatedMLP`, `layers.moe.SparseMoE`)."""

    fp8_input: bool  # its input comes quantized per token (`layers.fp8.Fp8Activations`)

    def __call__(self, x, ops) -> torch.Tensor:
        """x: [T, hidden] (quantized when `fp8_input`) -> [T, hidden]; `ops` gives the activation (fused
        kernel or torch)."""
        ...

    def activation_width(self) -> int:
        """Activation elements per token live while it runs (sizes the step workspace)."""
        ...


class PagedModel(Protocol):
    """A model family's forward over a ragged batch and the paged KV cache."""

    shape: ModelShape
    device: torch.device
    dtype: torch.dtype

    @staticmethod
    def shape_of(config) -> ModelShape:
        """The shape of a transformers `config`; raises UnsupportedModel (with the reason) for a feature
        the family's forward does not implement. Called before any weights are copied."""
        ...

    def __init__(
        self, hf_model, device: torch.device, dtype: torch.dtype, fp8: bool = False, tp: TensorParallel = ...
    ) -> None:
        """Copy the weights of a loaded transformers model to `device` / `dtype`; `fp8`: quantize the
        decoder's linear weights (weights stored in fp8 stay fp8 either way). `tp`: the rank's group
        (one rank by default); the decoder layers of `hf_model` are then already this rank's slice."""
        ...

    def activation_width(self) -> int:
        """Activation elements per token live in a forward (its widest layer, MoE experts included):
        the step workspace is sized from it (worker/build.py, core/kv/sizing.py)."""
        ...

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [layers, 2, pages + 1, page_size, Hkv, D]
        batch: AttentionBatch,
        logits_rows: torch.Tensor,  # [S] int64: token rows whose next-token logits are wanted
        attention: AttentionFn,
    ) -> torch.Tensor:
        """Logits [S, V] for `logits_rows` in the model dtype, as transformers' LM head computes them (the
        sampler takes them to fp32 where it does more than an argmax); writes the new tokens' K/V into
        `kv_cache`."""
        ...
