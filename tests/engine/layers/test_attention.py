"""The Triton paged attention equals the per-sequence reference on random ragged paged batches.

Without CUDA the kernel runs in Triton's interpreter, in a subprocess (see paged_cases.py); the
test skips when Triton is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runner.engine.layers.attention import PREFILL_BLOCK_Q, prefill_blocks, reference_attention, write_kv
from tests.engine.conftest import run_in_triton_interpreter
from tests.engine.layers.paged_cases import CASES, random_batch, relative_error


def test_paged_attention_matches_reference_in_the_interpreter():
    assert run_in_triton_interpreter("tests.engine.layers.paged_cases").count("relative error") == len(CASES)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
def test_paged_attention_on_cuda(case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert relative_error(case, "cuda", torch.float32) < 1e-5
    assert relative_error(case, "cuda", torch.bfloat16) < 1e-2


def test_reference_masks_future_and_other_sequences():
    """A query sees its own sequence's keys up to its position: changing any other key is invisible."""
    q, k_cache, v_cache, batch = random_batch(4, 2, [(6, 10)])
    before = reference_attention(q, k_cache, v_cache, batch, 0.35)
    pages = batch.page_table[2].tolist()
    k_cache[pages[2], 1] += 5.0  # position 9 of the prefill sequence: only its last query sees it
    after = reference_attention(q, k_cache, v_cache, batch, 0.35)
    changed = (after - before).abs().amax(dim=(1, 2)) > 0
    assert changed.tolist() == [False, False, False, False, False, False, False, True]


def test_write_kv_puts_tokens_at_their_slots():
    k_cache, v_cache = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    write_kv(k_cache, v_cache, k, v, torch.tensor([9, 2]))  # page 2 offset 1, page 0 offset 2
    assert torch.equal(k_cache[2, 1], k[0]) and torch.equal(v_cache[0, 2], v[1])
    assert k_cache.count_nonzero() == k.numel()


def test_prefill_blocks_cover_every_query_once():
    assert PREFILL_BLOCK_Q == 16
    block_seq, block_start = prefill_blocks(np.array([1, 16, 17, 40]), first_row=3)
    assert block_seq.tolist() == [3, 4, 5, 5, 6, 6, 6]
    assert block_start.tolist() == [0, 0, 0, 16, 0, 16, 32]
    assert block_seq.dtype == block_start.dtype == np.int64
    empty = prefill_blocks(np.array([], dtype=np.int64), first_row=2)
    assert empty[0].size == empty[1].size == 0
