"""The local model cache (converted GGUF files, downloaded folders) and the error of an unusable model."""

from __future__ import annotations

import os
from pathlib import Path


class ModelError(ValueError):
    """`model.path` cannot be resolved; the message names the path and the fix."""


def cache_dir() -> Path:
    """The batchrun cache root: `$BATCHRUN_CACHE`, else `~/.cache/batchrun`."""
    return Path(os.environ.get("BATCHRUN_CACHE") or Path.home() / ".cache" / "batchrun").expanduser()
