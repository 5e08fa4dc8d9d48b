"""scripts/sweep_config.py as tests: greedy tokens equal transformers' at every engine setting of the grid,
and seeded samples are the same in every setting.

The default suite runs the 6-configuration subset on the CPU (every value of every axis once); the
whole grid on the CPU is `slow`, on CUDA `gpu` (`python scripts/sweep_config.py --device cuda` by hand).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "sweep_config", Path(__file__).resolve().parents[2] / "scripts" / "sweep_config.py"
)
sweep_config = sys.modules["sweep_config"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep_config)


def assert_all_pass(outcomes, configs) -> None:
    failed = [(o.config, o.error, o.greedy_mismatches, o.sampled_mismatches) for o in outcomes if not o.ok]
    assert not failed
    assert len(outcomes) == len(configs)


def test_the_subset_covers_every_value_of_every_axis():
    for axis, values in sweep_config.GRID.items():
        assert {c[axis] for c in sweep_config.SUBSET} == set(values), axis
    assert all(c in sweep_config.grid_configs(sweep_config.GRID) for c in sweep_config.SUBSET)
    assert len(sweep_config.grid_configs(sweep_config.GRID)) == 6 * 4 * 3 * 2 * 2


def test_workload_reaches_max_model_len_and_mixes_greedy_n_and_sampled():
    model = sweep_config.build_model("cpu")
    work = sweep_config.make_workload(model, unique=14, copies=1)
    lengths = [len(p) for p in work.prompts]
    assert min(lengths) == 1 and max(lengths) == model.config.max_position_embeddings - 1
    assert work.reference[lengths.index(max(lengths))] and len(work.reference[0]) == sweep_config.NEW_TOKENS
    kinds = {("n", f["n"]) if "n" in f else ("sampled", f["temperature"]) for _, _, f in work.requests}
    assert {("n", 1), ("n", 2)} < kinds and len(kinds) == 5


def test_subset_on_cpu():
    outcomes = sweep_config.sweep(sweep_config.SUBSET, "cpu", unique=12, copies=1)
    assert_all_pass(outcomes, sweep_config.SUBSET)


@pytest.mark.slow
def test_full_grid_on_cpu():
    configs = [c for c in sweep_config.grid_configs(sweep_config.GRID) if c["cuda_graphs"]]  # no-op on CPU
    assert_all_pass(sweep_config.sweep(configs, "cpu", unique=24, copies=2), configs)


@pytest.mark.gpu
def test_full_grid_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    configs = sweep_config.grid_configs(sweep_config.GRID)
    assert_all_pass(sweep_config.sweep(configs, "cuda", unique=300, copies=10), configs)
