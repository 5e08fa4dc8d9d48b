"""Device sampling: filters never let an excluded token through, frequencies match, seeds reproduce."""

from __future__ import annotations

import math

import pytest
import torch

from runner.engine.sample.sampler import SamplingTensors, filtered_probs, sample, uniform

PROBS = [0.30, 0.25, 0.20, 0.10, 0.08, 0.04, 0.02, 0.01]
ORDER = [5, 2, 7, 0, 3, 6, 1, 4]  # token id of PROBS[i]: the best token is not token 0
CHI2_999 = {3: 16.27, 7: 24.32}  # chi-square critical values at p = 0.001, by degrees of freedom


def logits_rows(rows: int) -> torch.Tensor:
    logits = torch.empty(len(PROBS))
    logits[ORDER] = torch.tensor(PROBS).log()
    return logits.expand(rows, -1).clone()


def tensors(
    rows: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, logprobs=False
) -> SamplingTensors:
    return SamplingTensors(
        temperature=torch.full((rows,), temperature),
        top_k=torch.full((rows,), top_k, dtype=torch.int64),
        top_p=torch.full((rows,), top_p),
        min_p=torch.full((rows,), min_p),
        seed=torch.full((rows,), seed, dtype=torch.int64),
        sample_index=torch.zeros(rows, dtype=torch.int64),
        position=torch.arange(rows, dtype=torch.int64),  # each row is another draw of the same request
        all_greedy=temperature == 0.0,
        want_logprobs=logprobs,
    )


@pytest.mark.parametrize(
    ("kwargs", "allowed"),
    [
        (dict(top_k=3), {5, 2, 7}),
        (dict(top_p=0.6), {5, 2, 7}),  # 0.30 + 0.25 < 0.6: the third token is needed to reach it
        (dict(top_p=0.5), {5, 2}),
        (dict(min_p=0.3), {5, 2, 7, 0}),  # p >= 0.3 * 0.30 = 0.09
        (dict(top_k=5, top_p=0.9, min_p=0.1), {5, 2, 7, 0}),
        (dict(top_k=1), {5}),
    ],
)
def test_filters_emit_exactly_the_allowed_tokens(kwargs, allowed):
    tokens, _ = sample(logits_rows(4000), tensors(4000, **kwargs))
    assert set(tokens.tolist()) == allowed


def chi_square(tokens: torch.Tensor, target: list[float]) -> float:
    counts = torch.bincount(tokens, minlength=len(target)).double()
    expected = torch.tensor(target, dtype=torch.float64) * len(tokens)
    keep = expected > 0
    assert counts[~keep].sum() == 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_frequencies_match_the_distribution():
    rows = 40000
    tokens, _ = sample(logits_rows(rows), tensors(rows))
    target = [0.0] * 8
    for p, tok in zip(PROBS, ORDER, strict=True):
        target[tok] = p
    assert chi_square(tokens, target) < CHI2_999[7]


def test_frequencies_with_temperature_and_top_k():
    rows, temperature = 40000, 0.5
    tokens, _ = sample(logits_rows(rows), tensors(rows, temperature=temperature, top_k=4))
    weights = [p ** (1 / temperature) for p in PROBS[:4]]
    target = [0.0] * 8
    for w, tok in zip(weights, ORDER, strict=False):
        target[tok] = w / sum(weights)
    assert chi_square(tokens, target) < CHI2_999[3]


def test_uniforms_are_uniform_and_keyed():
    ids = torch.arange(1000).expand(50, -1)
    u = uniform(torch.full((50,), 3), torch.zeros(50, dtype=torch.int64), torch.arange(50), ids)
    assert u.min() > 0.0 and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01
    deciles = torch.bincount((u * 10).long().flatten(), minlength=10).double()
    assert float(((deciles - 5000) ** 2 / 5000).sum()) < 27.88  # chi-square, 9 dof, p = 0.001
    again = uniform(torch.full((50,), 3), torch.zeros(50, dtype=torch.int64), torch.arange(50), ids)
    other = uniform(torch.full((50,), 4), torch.zeros(50, dtype=torch.int64), torch.arange(50), ids)
    assert torch.equal(u, again) and not torch.equal(u, other)


def test_greedy_rows_take_the_argmax_and_logprobs_are_raw():
    logits = logits_rows(3)
    st = tensors(3, temperature=0.0, logprobs=True)
    tokens, logprobs = sample(logits, st)
    assert tokens.tolist() == [5, 5, 5]
    torch.testing.assert_close(logprobs, torch.full((3,), math.log(0.30)))


def test_mixed_greedy_and_sampled_rows():
    st = tensors(2000, temperature=1.0)
    st.temperature[::2] = 0.0
    tokens, _ = sample(logits_rows(2000), st)
    assert set(tokens[::2].tolist()) == {5}
    assert len(set(tokens[1::2].tolist())) == 8


def test_filtered_probs_are_sorted_and_zeroed():
    probs, ids = filtered_probs(logits_rows(1), tensors(1, top_k=3))
    assert ids[0, :3].tolist() == [5, 2, 7]
    torch.testing.assert_close(probs[0, :3], torch.tensor([0.30, 0.25, 0.20]) / 0.75)
    assert probs[0, 3:].count_nonzero() == 0
