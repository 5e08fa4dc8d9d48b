"""The shell a checkpoint's tensors load into without transformers' model classes (`loading/hf_config.py`).

A tree of empty modules named as the checkpoint names its tensors (`model.layers.3.self_attn.q_proj`),
built from the safetensors headers alone: a module whose `weight` is 2-D is an `nn.Linear` (the
loader quantizes those in the decoder layers), every tensor a parameter slot that `loading/loader.py` fills.
Beside it are what the families read of a transformers model besides weights: `config`, the
`generation_config` (its EOS ids) and the rotary module (`model.rotary_emb`, `layers.rope.Rotary`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from torch import nn

from runner.engine.layers.rope import rotary_of


class Skeleton(nn.Module):
    """A Llama-family causal LM as its checkpoint lays it out, every parameter slot empty (None)."""

    def __init__(self, config: SimpleNamespace, shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
        """`shapes`: every tensor name in the checkpoint -> its shape; `folder` holds the optional
        generation_config.json."""
        super().__init__()
        self.config = config
        self.generation_config = _generation_config(folder)
        linears = {
            k.rpartition(".")[0] for k, shape in shapes.items() if k.endswith(".weight") and len(shape) == 2
        }
        for key in sorted(shapes, key=_numeric_order):  # layer i's tensors before layer i + 1's
            prefix, _, leaf = key.rpartition(".")
            module = self._node(prefix, linears)
            if leaf != "weight_scale" and leaf not in module._parameters:  # scales: plain attributes
                module.register_parameter(leaf, None)
        self._check(shapes)
        rope = config.rope_parameters
        self.model.rotary_emb = rotary_of(rope, config.head_dim, config.max_position_embeddings)

    def _node(self, name: str, linears: set[str]) -> nn.Module:
        """The module at dotted `name`, created with its parents on first use: numbered parts go in a
        ModuleList, in order; a module in `linears` is an nn.Linear."""
        node: nn.Module = self
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part not in node._modules:
                numbered_next = i + 1 < len(parts) and parts[i + 1].isdigit()
                path = ".".join(parts[: i + 1])
                child = _linear() if path in linears else nn.ModuleList() if numbered_next else nn.Module()
                if part.isdigit() != isinstance(node, nn.ModuleList) or (
                    part.isdigit() and int(part) != len(node)
                ):
                    raise ValueError(
                        f"the checkpoint's tensors under {path!r} do not form a model "
                        "(a gap in the numbered parts, or numbered and named parts mixed)"
                    )
                node.add_module(part, child)
            node = node._modules[part]
        return node

    def _check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """The tensors every Llama-family forward reads are there, one decoder layer per config layer."""
        c = self.config
        needed = ["model.embed_tokens.weight", "model.norm.weight"]
        if not c.tie_word_embeddings:
            needed.append("lm_head.weight")
        for i in range(c.num_hidden_layers):
            needed += [f"model.layers.{i}.{m}.weight" for m in _LAYER_WEIGHTS]
        missing = [k for k in needed if k not in shapes]
        if missing:
            raise ValueError(f"the checkpoint has no tensor for {', '.join(missing[:5])}")


_LAYER_WEIGHTS = (
    "input_layernorm",
    "post_attention_layernorm",
    *(f"self_attn.{p}_proj" for p in "qkvo"),
    *(f"mlp.{p}_proj" for p in ("gate", "up", "down")),
)


def _numeric_order(key: str) -> tuple:
    """Sort key of a tensor name that orders numbered parts as numbers (layers.2 before layers.10)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def _linear() -> nn.Linear:
    """An `nn.Linear` with empty weight and bias slots (the loader fills them; bias stays None if absent)."""
    module = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(module)
    module.register_parameter("weight", None)
    module.register_parameter("bias", None)
    return module


def _generation_config(folder: Path) -> SimpleNamespace | None:
    """generation_config.json's fields (the engine reads its EOS ids), None without the file."""
    file = folder / "generation_config.json"
    return SimpleNamespace(**json.loads(file.read_text())) if file.is_file() else None
