"""The KV manager: admission with prefix reuse, growth at page boundaries, freeing pages and slots."""

from __future__ import annotations

from runner.engine.core.kv import KVManager
from runner.engine.core.sequence import Sequence
from runner.engine.types import SamplingParams


def sequence(tokens: list[int], order: int = 0) -> Sequence:
    return Sequence(order, 0, SamplingParams(), len(tokens), list(tokens), seed=0, order=order)


def test_admit_takes_a_slot_and_pages_for_the_whole_prompt():
    kv = KVManager(num_pages=8, page_size=4, max_seqs=2, max_pages=4)
    seq = sequence(list(range(10)))
    assert kv.admit(seq, keep_free=0)
    assert len(seq.pages) == 3 and seq.slot == 0 and seq.num_computed == 0
    assert kv.table.rows[0, :3].tolist() == seq.pages
    assert kv.num_used_pages == 3 and kv.num_free_slots == 1


def test_admit_refuses_without_enough_pages_or_a_slot_and_takes_nothing():
    kv = KVManager(num_pages=4, page_size=4, max_seqs=1, max_pages=4)
    seq = sequence(list(range(10)))  # 3 pages
    assert not kv.admit(seq, keep_free=2)
    assert seq.pages == [] and seq.slot == -1 and kv.num_free_pages == 4 and kv.num_free_slots == 1
    assert kv.admit(seq, keep_free=1)
    other = sequence([1, 2])
    assert not kv.admit(other, keep_free=0)  # the only slot is taken
    assert other.pages == [] and kv.num_free_pages == 1


def test_full_computed_pages_are_reused_by_a_later_prompt():
    kv = KVManager(num_pages=8, page_size=4, max_seqs=4, max_pages=4)
    first = sequence(list(range(10)))
    kv.admit(first, keep_free=0)
    first.num_computed = 10
    kv.cache_full_pages([first])  # pages 0 and 1 are full; page 2 holds 2 tokens
    assert len(first.page_hashes) == 2
    kv.free(first)
    assert kv.num_used_pages == 0 and first.pages == [] and first.slot == -1
    second = sequence(list(range(9)) + [99])
    assert kv.admit(second, keep_free=0)
    assert second.num_computed == 8 and kv.num_used_pages == 3
    # a prompt of exactly two full pages matches only one: its last token must be computed again
    third = sequence(list(range(8)))
    assert kv.admit(third, keep_free=0) and third.num_computed == 4
    assert third.pages[0] == second.pages[0] and third.pages[1] != second.pages[1]


def test_pages_that_are_not_computed_yet_are_not_cached():
    kv = KVManager(num_pages=8, page_size=4, max_seqs=4, max_pages=4)
    seq = sequence(list(range(10)))
    kv.admit(seq, keep_free=0)
    seq.num_computed = 7  # the second page is not complete in the cache
    kv.cache_full_pages([seq])
    assert len(seq.page_hashes) == 1
    kv.free(seq)
    assert kv.admit(sequence(list(range(10))), keep_free=0)
    assert kv.num_used_pages == 3  # one page reused, two new


def test_grow_adds_a_page_at_the_boundary_and_writes_the_table_row():
    kv = KVManager(num_pages=8, page_size=4, max_seqs=2, max_pages=4)
    seq = sequence(list(range(8)))
    kv.admit(seq, keep_free=0)
    seq.num_computed = 7
    assert not kv.needs_page(seq)
    seq.num_computed = 8
    assert kv.needs_page(seq)
    kv.grow(seq)
    assert len(seq.pages) == 3 and kv.table.rows[seq.slot, 2] == seq.pages[2]
    assert not kv.needs_page(seq)


def test_free_gives_back_pages_and_slot_once():
    kv = KVManager(num_pages=4, page_size=4, max_seqs=1, max_pages=4)
    seq = sequence([1, 2, 3])
    kv.admit(seq, keep_free=0)
    kv.free(seq)
    kv.free(seq)  # holds nothing now: a no-op (a sequence preempted while its token was on the way)
    assert kv.num_free_pages == 4 and kv.num_free_slots == 1
