"""The batched SDPA attention equals the per-sequence reference on random ragged paged batches."""

from __future__ import annotations

import random

import pytest
import torch

from runner.engine.attention import AttentionBatch, reference_attention, sdpa_attention, write_kv


def random_batch(seed: int, num_decodes: int, prefills: list[tuple[int, int]], page: int = 4):
    """Caches filled with random K/V, pages shuffled; prefills are (q_len, kv_len) pairs."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    heads, kv_heads, dim, num_pages = 6, 2, 8, 64
    k_cache = torch.randn(num_pages, page, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_pages, page, kv_heads, dim, generator=g)
    shapes = [(1, rng.randint(1, 30)) for _ in range(num_decodes)] + prefills
    free = list(range(num_pages))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-kv // page))] for _, kv in shapes]
    width = max(map(len, tables))
    q_lens, kv_lens = [s[0] for s in shapes], [s[1] for s in shapes]
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    batch = AttentionBatch(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32),
        page_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64),
        q_lens_host=q_lens,
        kv_lens_host=kv_lens,
        num_decodes=num_decodes,
    )
    q = torch.randn(cu[-1], heads, dim, generator=g)
    return q, k_cache, v_cache, batch


@pytest.mark.parametrize(
    ("seed", "num_decodes", "prefills"),
    [(0, 5, []), (1, 0, [(7, 7)]), (2, 3, [(5, 13), (9, 9), (1, 6)]), (3, 1, [(12, 30)])],
)
def test_sdpa_matches_reference(seed, num_decodes, prefills):
    q, k_cache, v_cache, batch = random_batch(seed, num_decodes, prefills)
    ref = reference_attention(q, k_cache, v_cache, batch, 0.35)
    out = sdpa_attention(q, k_cache, v_cache, batch, 0.35)
    assert out.shape == ref.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


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
