"""Where each rank of the engine gets its model: a local folder (or hub id), or a factory function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from runner.engine.parallel.layers import TensorParallel


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where each rank gets the model: a local folder (or hub id) at `revision`, or `factory`, a
    module-level function (spawned ranks import it) returning a transformers model on the CPU."""

    path: str | None = None
    revision: str | None = None
    factory: Callable[[], Any] | None = None

    def load(self, dtype: torch.dtype, device: torch.device, fp8: bool, tp: TensorParallel):
        """The transformers model with its decoder layers cut to rank `tp.rank`'s slice."""
        from runner.engine.parallel.weight_split import split_decoder

        if self.factory is not None:
            model = self.factory()
            split_decoder(model, tp)
            return model
        from runner.engine.loading.loader import load_hf_model

        return load_hf_model(self.path, dtype, device, fp8, revision=self.revision, tp=tp)
