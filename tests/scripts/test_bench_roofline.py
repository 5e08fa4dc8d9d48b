"""scripts/bench.py's two floors: t_min (the roofline the issue targets count against) and t_serial (the same
kernels one after the other, as the engine runs them), from the rates a committed device run measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.bench import WORKLOADS, Rates, make_prompts, t_min, t_serial

RESULTS = Path(__file__).resolve().parents[2] / "scripts" / "results"


def run(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


@pytest.mark.parametrize(
    "result",
    ["w0-decode-pairs-vs-hf.json", "w1-decode-order.json", "w2-decode-order.json", "w2-w3-fp8kv.json",
     "m1.json", "m1-fp8.json"],
)  # fmt: skip
def test_t_min_is_what_the_device_runs_reported(result):
    doc = run(result)
    rates = Rates(**doc["rates"])
    for r in doc["results"]:
        name, parts = r["workload"], r["backend"].split("-")
        prompts, new = make_prompts(name, None), WORKLOADS[name].new
        floor = t_min(name, prompts, new, rates, fp8="fp8" in r["backend"], fp8_kv="fp8kv" in parts)
        assert round(floor, 3) == r["t_min_s"], (result, r["backend"])


def test_t_serial_of_the_workloads_against_t_min():
    """With every kernel at the measured peak and the attention after the matmuls, W0, W1 and W2 reach at
    best 0.93, 0.82 and 0.95 of t_min (PERF_NOTES.md), W3 0.58: its decode matmuls at 4,096 rows are
    compute-bound. The rates are those of W1's run."""
    rates = Rates(**run("w1-decode-order.json")["rates"])
    ratios = {}
    for name in ("W0", "W1", "W2", "W3"):
        prompts, new = make_prompts(name, None), WORKLOADS[name].new
        ratios[name] = round(t_min(name, prompts, new, rates) / t_serial(name, prompts, new, rates), 3)
    assert ratios == {"W0": 0.934, "W1": 0.821, "W2": 0.951, "W3": 0.576}


def test_a_memory_bound_decode_adds_only_the_prefill_attention():
    """One prompt: a decode step takes longer to read its weights than to run its matmuls, so the two floors
    differ by the causal prefill attention alone, 4 x layers x heads x head_dim FLOP a (query, visible key)
    pair."""
    rates = Rates(bf16_flops=800e12, fp8_flops=1.6e15, bytes_per_s=4e12)
    w, prompts = WORKLOADS["W2"], [[1] * 700]
    extra = t_serial("W2", prompts, 16, rates) - t_min("W2", prompts, 16, rates)
    pairs = 700 * 701 // 2
    assert extra == pytest.approx(4 * w.layers * w.heads * w.head_dim * pairs / rates.bf16_flops, rel=1e-9)
