"""Page allocator: refcounts, prefix matching on full pages, eviction of cached pages oldest first."""

from __future__ import annotations

import pytest

from runner.engine.core.kv.pages import PagePool, page_hash


def register_chain(pool: PagePool, pages: list[int], tokens: list[int]) -> None:
    prev = -1
    for i, page in enumerate(pages):
        chunk = tuple(tokens[i * pool.page_size : (i + 1) * pool.page_size])
        prev = page_hash(prev, chunk)
        pool.register(page, prev, chunk)


def test_prefix_match_takes_references_and_stops_at_first_difference():
    pool = PagePool(8, 2)
    a = pool.allocate(3)
    register_chain(pool, a, [1, 2, 3, 4, 5, 6])
    pages, hashes = pool.match_prefix([1, 2, 3, 4, 9, 9, 7], max_pages=3)
    assert pages == a[:2] and len(hashes) == 2
    pool.release(a)
    assert pool.num_free == 8 - 2  # the two matched pages are still referenced
    pool.release(pages)
    assert pool.num_free == 8


def test_same_tokens_after_a_different_prefix_do_not_match():
    pool = PagePool(4, 2)
    a = pool.allocate(2)
    register_chain(pool, a, [1, 2, 3, 4])
    assert pool.match_prefix([9, 9, 3, 4], max_pages=2) == ([], [])


def test_cached_pages_are_evicted_oldest_first_only_when_needed():
    pool = PagePool(3, 1)
    pages = pool.allocate(3)
    register_chain(pool, pages[:1], [10])
    register_chain(pool, pages[1:2], [20])
    pool.release([pages[1]])
    pool.release([pages[0]])
    pool.release([pages[2]])  # never registered: plainly free
    assert pool.allocate(1) == [pages[2]]
    assert pool.match_prefix([10], 1)[0] == [pages[0]]  # still cached
    assert pool.allocate(1) == [pages[1]]  # the only evictable one
    assert pool.match_prefix([20], 1) == ([], [])


def test_double_release_is_caught():
    pool = PagePool(2, 4)
    page = pool.allocate(1)
    pool.release(page)
    with pytest.raises(AssertionError, match="released twice"):
        pool.release(page)
