"""The batchrun cache: where compiled kernels are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.models.cache import use_kernel_cache


def test_triton_kernels_go_to_the_batchrun_cache_unless_triton_cache_dir_is_set(tmp_path: Path, monkeypatch):
    knobs = pytest.importorskip("triton").knobs
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("BATCHRUN_CACHE", str(tmp_path / "cache"))
    assert use_kernel_cache() == tmp_path / "cache/triton"
    assert knobs.cache.dir == str(tmp_path / "cache/triton")  # what Triton itself will use

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert use_kernel_cache() == tmp_path / "mine"
    assert knobs.cache.dir == str(tmp_path / "mine")
