"""The batchrun cache (converted GGUF files, downloaded folders, compiled kernels) and the error of an
unusable model."""

from __future__ import annotations

import os
from pathlib import Path


class ModelError(ValueError):
    """`model.path` cannot be resolved; the message names the path and the fix."""


def cache_dir() -> Path:
    """The batchrun cache root: `$BATCHRUN_CACHE`, else `~/.cache/batchrun`."""
    return Path(os.environ.get("BATCHRUN_CACHE") or Path.home() / ".cache" / "batchrun").expanduser()


def use_kernel_cache() -> Path:
    """Keep Triton's compiled kernels in `<batchrun cache>/triton` unless `TRITON_CACHE_DIR` says where:
    compiled once per user and machine (where the cache is on local disk), then reused by every later
    job and every worker of a node. Returns the folder in use."""
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir() / "triton"))
    return Path(os.environ["TRITON_CACHE_DIR"])
