"""The Triton paged attention equals the per-sequence reference on random ragged paged batches.

Without CUDA the kernel runs in Triton's interpreter, in a subprocess (see attention/triton_cases.py); the
test skips when Triton is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runner.engine.layers.attention.cpu import batched_attention
from runner.engine.layers.attention.torch import (
    PREFILL_BLOCK_Q,
    decode_order,
    prefill_blocks,
    reference_attention,
    write_kv,
)
from runner.engine.layers.attention.triton import (
    BLOCK_N,
    WIDE_DECODE_SMEM,
    decode_splits,
    kernel_tile,
    seqs_per_program,
    sm_count,
    smem_per_sm,
)
from runner.engine.layers.fp8.format import FP8
from tests.engine.conftest import run_in_triton_interpreter
from tests.engine.layers.attention.triton_cases import (
    CASES,
    SPLIT_CASES,
    random_batch,
    relative_error,
    split_relative_error,
)


def test_paged_attention_matches_reference_in_the_interpreter():
    out = run_in_triton_interpreter("tests.engine.layers.attention.triton_cases")
    assert out.count("relative error") == len(CASES) + len(SPLIT_CASES)
    assert out.count("split case") == len(SPLIT_CASES)
    assert "out: written in place" in out


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
def test_paged_attention_on_cuda(case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert relative_error(case, "cuda", torch.float32) < 1e-5
    assert relative_error(case, "cuda", torch.bfloat16) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[str(c[0]) for c in SPLIT_CASES])
def test_split_decode_attention_on_cuda(case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert split_relative_error(case, "cuda", torch.float32) < 1e-5
    assert split_relative_error(case, "cuda", torch.bfloat16) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
def test_small_decode_launch_tiles_on_cuda(dim):
    """A decode launch of 10 programs per SM (5 x SMs sequences x 2 KV heads, up to 300 keys each) takes
    `SMALL_DECODE_LAUNCH`'s tile on this GPU: pairs of decodes (an odd count: 5 x 132 on an H200), 2 warps
    and 64 keys at head dim 64; 128 keys at head dim 128 where the SMs' shared memory allows. It matches
    the reference over fp32, bf16 and fp8 caches."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cuda = torch.device("cuda")
    case = (40, 5 * sm_count(cuda), [], 16, 8, 2, dim)
    wide = dim == 128 and smem_per_sm(cuda) >= WIDE_DECODE_SMEM
    assert kernel_tile(True, dim, 10.0, 1, smem_per_sm(cuda))[1] == (
        64 if dim == 64 else 128 if wide else BLOCK_N
    )
    assert seqs_per_program(True, dim, 10.0, 1) == (2 if dim == 64 else 1)
    assert relative_error(case, "cuda", torch.float32, longest_decode=300) < 1e-5
    assert relative_error(case, "cuda", torch.bfloat16, longest_decode=300) < 1e-2
    if torch.cuda.get_device_capability(cuda) >= (8, 9):  # an fp8 cache needs sm89+
        assert relative_error(case, "cuda", torch.bfloat16, FP8, longest_decode=300) < 1e-2


def test_decode_splits_fill_the_sms_only_for_few_rows():
    """A decode launch splits its keys when rows x KV heads give fewer than 4 programs an SM (132 SMs on
    an H200: 528), into as many as fit in 528 programs, at most 32; the interpreter counts as one SM."""
    h200 = 132
    splits = {rows: decode_splits(rows, 8, h200) for rows in (1, 2, 4, 16, 17, 33, 512)}
    assert splits == {1: 32, 2: 32, 4: 16, 16: 4, 17: 3, 33: 2, 512: 1}
    assert sm_count(torch.device("cpu")) == 1


def test_decode_tiles_follow_the_head_dim_and_the_programs_per_sm():
    """Unsplit decodes on an H200's 132 SMs: W0's 512 rows x 3 KV heads of dim 64 run pairs of decodes in
    2-warp programs of 64 keys and W2's 256 x 8 of dim 128 read 128 keys an iteration, one decode a
    program; W1's 512 x 8, 64 long rows x 8, split launches, head dim 256 and an sm89 GPU's 100 KiB of
    shared memory per SM keep the default tile and one decode a program, as prefill blocks do."""
    per_sm = {programs: programs / 132 for programs in (512 * 3, 256 * 8, 512 * 8, 64 * 8)}
    assert kernel_tile(True, 64, per_sm[512 * 3]) == (1, 64, 2, 2)
    assert seqs_per_program(True, 64, per_sm[512 * 3], 1) == 2
    assert seqs_per_program(True, 128, per_sm[256 * 8], 1) == 1
    assert seqs_per_program(True, 64, per_sm[512 * 8], 1) == 1
    assert seqs_per_program(True, 64, 12.0, 2) == 1
    assert seqs_per_program(False, 64, per_sm[512 * 3], 1) == 1
    assert kernel_tile(True, 128, per_sm[256 * 8]) == (1, 128, 4, 2)
    default = (1, BLOCK_N, 4, 2)
    assert kernel_tile(True, 64, per_sm[512 * 8]) == default
    assert kernel_tile(True, 128, per_sm[64 * 8]) == default
    assert kernel_tile(True, 64, 12.0, splits=2) == default
    assert kernel_tile(True, 256, per_sm[256 * 8]) == default
    assert kernel_tile(True, 128, per_sm[256 * 8], smem=100 * 1024) == default


def test_reference_masks_future_and_other_sequences():
    """A query sees its own sequence's keys up to its position: changing any other key is invisible."""
    q, k_cache, v_cache, batch = random_batch(4, 2, [(6, 10)])
    before = reference_attention(q, k_cache, v_cache, batch, 0.35)
    pages = batch.page_table[batch.row_slot[2]].tolist()
    k_cache[pages[2], 1] += 5.0  # position 9 of the prefill sequence: only its last query sees it
    after = reference_attention(q, k_cache, v_cache, batch, 0.35)
    changed = (after - before).abs().amax(dim=(1, 2)) > 0
    assert changed.tolist() == [False, False, False, False, False, False, False, True]


def test_reference_window_hides_keys_that_left_it():
    """With a window of 4, the query at position 9 sees keys 6..9 only; the one at 5 sees 2..5."""
    q, k_cache, v_cache, batch = random_batch(4, 0, [(6, 10)])
    before = reference_attention(q, k_cache, v_cache, batch, 0.35, window=4)
    pages = batch.page_table[batch.row_slot[0]].tolist()
    k_cache[pages[1], 1] += 5.0  # position 5: seen by queries at 5..8 (rows 1..4), not 9 (row 5)
    k_cache[pages[0], 0] += 5.0  # position 0: left every query's window
    after = reference_attention(q, k_cache, v_cache, batch, 0.35, window=4)
    changed = (after - before).abs().amax(dim=(1, 2)) > 0
    assert changed.tolist() == [False, True, True, True, True, False]


def test_soft_cap_bounds_the_logits():
    """One key with a huge logit among zero ones: capped at 2, its weight is e^2 / (e^2 + 2)."""
    q, k_cache, v_cache, batch = random_batch(5, 0, [(1, 3)], dim=4)
    page = batch.page_table[batch.row_slot[0], 0]
    k_cache.zero_(), v_cache.zero_()
    k_cache[page, 0], v_cache[page, 0] = 1e4, 1.0  # position 0
    out = reference_attention(q.abs(), k_cache, v_cache, batch, 1.0, softcap=2.0)
    assert torch.allclose(out, torch.full_like(out, 1 / (1 + 2 * torch.e**-2)))


@pytest.mark.parametrize("case", [c for c in CASES if len(c) > 7], ids=lambda c: str(c[0]))
def test_cpu_batched_attention_windows_and_caps_like_the_reference(case):
    seed, nd, prefills, page, heads, kv_heads, dim, window, softcap = case
    q, k_cache, v_cache, batch = random_batch(seed, nd, prefills, page, heads, kv_heads, dim)
    ref = reference_attention(q, k_cache, v_cache, batch, 0.3, window, softcap)
    assert torch.allclose(batched_attention(q, k_cache, v_cache, batch, 0.3, window, softcap), ref, atol=1e-6)


def test_write_kv_puts_tokens_at_their_slots():
    k_cache, v_cache = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    write_kv(k_cache, v_cache, k, v, torch.tensor([9, 2]))  # page 2 offset 1, page 0 offset 2
    assert torch.equal(k_cache[2, 1], k[0]) and torch.equal(v_cache[0, 2], v[1])
    assert k_cache.count_nonzero() == k.numel()


def test_prefill_blocks_cover_every_query_once_the_most_keys_first():
    assert PREFILL_BLOCK_Q == 16
    # row 4 is a chunk after 100 cached keys; the others are whole prompts
    block_seq, block_start = prefill_blocks(
        np.array([1, 16, 17, 40]), np.array([1, 116, 17, 40]), first_row=3
    )
    assert block_seq.tolist() == [4, 6, 5, 6, 3, 5, 6]
    assert block_start.tolist() == [0, 32, 16, 16, 0, 0, 0]
    assert block_seq.dtype == block_start.dtype == np.int64
    empty = prefill_blocks(np.array([], dtype=np.int64), np.array([], dtype=np.int64), first_row=2)
    assert empty[0].size == empty[1].size == 0


def test_decode_order_is_longest_first_ties_in_batch_order():
    order = decode_order(np.array([5, 9, 1, 9]))
    assert order.tolist() == [1, 3, 0, 2] and order.dtype == np.int64
