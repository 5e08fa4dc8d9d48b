"""Cut a transformers model's decoder layers to one tensor-parallel rank's slice, tensor by tensor.

Column-parallel (each rank keeps its rows, its outputs are its own): q by query heads, k and v by
KV heads (a rank keeps a copy of its group's KV head when the ranks outnumber the KV heads), gate
and up (also fused `gate_up_proj`, Phi-3's fused `qkv_proj`, and the stacked experts of an MoE) by
MLP width. Row-parallel (each rank keeps its columns; `layers.parallel.Reduced` sums the outputs):
o and down; their biases stay on rank 0 only. Norms, routers and the rest are whole on every rank.
`cut` applies to one named tensor, so the safetensors loader can cut each tensor as it reads it;
`split_decoder` cuts a model already in memory. Embeddings and the LM head are split by the families
(`layers.parallel.VocabSlice`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runner.engine.parallel.layers import TensorParallel
from runner.engine.types import UnsupportedModel

COLUMN = {"gate_proj", "up_proj", "w1", "w3"}  # MLP rows (w1 / w3: Mixtral's gate / up)
ROW = {"o_proj", "down_proj", "w2"}
PARAMS = ("weight", "bias", "weight_scale")


@dataclass(frozen=True, slots=True)
class HeadSplit:
    """Which rows of the attention projections a rank keeps."""

    q: slice  # rows of q (and columns of o), in query heads x head_dim
    kv: slice  # rows of k and of v

    @classmethod
    def of(cls, config, tp: TensorParallel) -> HeadSplit:
        """The split of `config`'s heads over `tp`; UnsupportedModel when the ranks cannot share them."""
        config = getattr(config, "text_config", None) or config  # an image-text checkpoint: its text tower
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % tp.size or (kv_heads % tp.size and tp.size % kv_heads):
            raise UnsupportedModel(
                f"tensor_parallel={tp.size} does not split {heads} query heads and {kv_heads} KV heads evenly"
            )
        q = tp.part(heads, "query heads")
        if kv_heads >= tp.size:
            kv = tp.part(kv_heads, "KV heads")
        else:  # ranks share a KV head: each keeps a copy of the one its query heads read
            head = tp.rank * kv_heads // tp.size
            kv = slice(head, head + 1)
        return cls(slice(q.start * dim, q.stop * dim), slice(kv.start * dim, kv.stop * dim))

    @property
    def q_rows(self) -> int:
        return self.q.stop - self.q.start


def cut(
    name: str, t: torch.Tensor, split: HeadSplit, tp: TensorParallel, transposed: bool = False
) -> torch.Tensor:
    """This rank's part of the decoder-layer tensor `name` (a transformers parameter name, e.g.
    `model.layers.3.self_attn.q_proj.weight`); `transposed`: stacked experts stored [E, H, 2 I]."""
    module, _, param = name.rpartition(".")
    leaf = module.rpartition(".")[2]
    if t.dim() == 3 and param in ("gate_up_proj", "down_proj"):  # stacked experts [E, 2 I, H], [E, H, I]
        if param == "gate_up_proj":
            return _halves(t, 2 if transposed else 1, tp)
        return t.narrow(1 if transposed else 2, *_span(t.shape[1 if transposed else 2], tp))
    if param not in PARAMS or t.dim() == 0 or (param == "weight_scale" and t.numel() == 1):
        return _whole(leaf, t, split)
    if param == "weight_scale" and t.dim() == 2 and t.shape[1] != 1:
        raise UnsupportedModel(f"tensor_parallel: block-wise fp8 scales ({name}) are not split")
    rows = t.shape[0]
    if leaf == "q_proj":
        return t[split.q]
    if leaf in ("k_proj", "v_proj"):
        return t[split.kv]
    if leaf == "qkv_proj":  # Phi-3: [q; k; v] rows
        q_total = split.q_rows * tp.size
        kv_rows = (rows - q_total) // 2
        q, k, v = t[:q_total], t[q_total : q_total + kv_rows], t[q_total + kv_rows :]
        return torch.cat((q[split.q], k[split.kv], v[split.kv]))
    if leaf == "gate_up_proj":  # Phi-3's dense MLP: [gate; up] rows
        return _halves(t, 0, tp)
    if leaf in COLUMN:
        return t.narrow(0, *_span(rows, tp))
    if leaf in ROW:
        if param == "weight":
            cols = split.q if leaf == "o_proj" else slice(*_bounds(t.shape[1], tp))
            return t[:, cols]
        if param == "bias":  # added once, on rank 0
            return t if tp.rank == 0 else torch.zeros_like(t)
        return t  # per-output-row scales: the same on every rank
    return _whole(leaf, t, split)


NOT_SPLIT = {"olmo2": "its q/k norms span all heads", "olmoe": "its q/k norms span all heads"}


def check_split(config, size: int) -> None:
    """Raise UnsupportedModel (with the reason) if `config`'s model cannot run over `size` ranks."""
    if config.model_type in NOT_SPLIT:
        raise UnsupportedModel(
            f"tensor_parallel: {config.model_type} is not split ({NOT_SPLIT[config.model_type]})"
        )
    HeadSplit.of(config, TensorParallel(0, size))


def split_decoder(model: nn.Module, tp: TensorParallel) -> None:
    """Replace every decoder-layer tensor of a transformers model in memory by this rank's part."""
    if tp.size == 1:
        return
    split = HeadSplit.of(model.config, tp)
    for module_name, module in model.named_modules():
        if ".layers." not in f".{module_name}.":
            continue
        transposed = getattr(module, "is_transposed", False)
        for param, t in list(module.named_parameters(recurse=False)):
            part = cut(f"{module_name}.{param}", t.detach(), split, tp, transposed)  # a view
            module._parameters[param] = nn.Parameter(part, requires_grad=False)
        scale = getattr(module, "weight_scale", None)
        if isinstance(scale, torch.Tensor):
            module.weight_scale = cut(f"{module_name}.weight_scale", scale, split, tp)


def _whole(leaf: str, t: torch.Tensor, split: HeadSplit) -> torch.Tensor:
    """A tensor every rank keeps as it is; a q/k norm over all heads (OLMo 2) would need the ranks'
    sum of squares, which is not implemented."""
    if leaf in ("q_norm", "k_norm") and t.numel() > split.q_rows and t.dim() == 1:
        raise UnsupportedModel("tensor_parallel: q/k norms over all heads (OLMo 2, OLMoE) are not split")
    return t


def _span(n: int, tp: TensorParallel) -> tuple[int, int]:
    """(start, length) of this rank's share of `n` rows."""
    part = tp.part(n, "MLP rows")
    return part.start, part.stop - part.start


def _bounds(n: int, tp: TensorParallel) -> tuple[int, int]:
    part = tp.part(n, "MLP columns")
    return part.start, part.stop


def _halves(t: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    """[gate; up] stacked along `dim`: this rank's share of each half, stacked the same way."""
    gate, up = t.chunk(2, dim)
    return torch.cat([h.narrow(dim, *_span(h.shape[dim], tp)) for h in (gate, up)], dim)
