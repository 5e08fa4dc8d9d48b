"""The model families of the fast path, one file each on the shared layers, picked by `model_type`.

A new family is a new file here (a class following `base.PagedModel`) and a line in `FAMILY_CLASSES`
(runner/engine/families.py). A model whose `model_type` is not listed, or whose config asks for
something its family does not implement, raises `UnsupportedModel` with the reason; the caller falls
back to transformers.
"""

from __future__ import annotations

import importlib

import torch

from runner.engine.families import FAMILY_CLASSES
from runner.engine.models.base import ModelShape, PagedModel
from runner.engine.parallel.layers import SINGLE, TensorParallel
from runner.engine.types import UnsupportedModel

FAMILIES: dict[str, type[PagedModel]] = {
    kind: getattr(importlib.import_module(f"{__name__}.{module}"), name)
    for kind, (module, name) in FAMILY_CLASSES.items()
}


def family(config) -> type[PagedModel]:
    """The family class that runs a transformers `config`."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise UnsupportedModel(f"model_type {kind!r} is not in the fast path ({', '.join(FAMILIES)})")
    return FAMILIES[kind]


def model_shape(config) -> ModelShape:
    """Check that a family implements `config`'s architecture and read its shape (no weights needed)."""
    return family(config).shape_of(config)


def fast_path_reason(config) -> str | None:
    """None when the fast path runs `config`, else why the model falls back to transformers."""
    try:
        model_shape(config)
    except UnsupportedModel as e:
        return str(e)
    return None


def build_model(
    hf_model, device: torch.device, dtype: torch.dtype, fp8: bool = False, tp: TensorParallel = SINGLE
) -> PagedModel:
    """Our forward for a loaded transformers model, its weights copied to `device` / `dtype` (`fp8`: the
    decoder's linear weights quantized to fp8; weights stored in fp8 stay fp8 either way). `tp`: the
    rank's group; `hf_model`'s decoder layers are then its slice (`parallel/weight_split.py`)."""
    return family(hf_model.config)(hf_model, device, dtype, fp8, tp)


__all__ = ["FAMILIES", "ModelShape", "PagedModel", "build_model", "family", "fast_path_reason", "model_shape"]
