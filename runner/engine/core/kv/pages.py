"""Page allocator of the paged KV cache, with refcounts and a prefix cache of full pages.

Pages hold `page_size` tokens of K and V for every layer. A full page whose tokens have all been
computed is registered under a hash of its content and of every token before it (a hash chain), so
that a later sequence with the same prefix (a shared system prompt, the other samples of an `n > 1`
request, a preempted sequence coming back) reuses it instead of recomputing it. A registered page
whose refcount drops to zero stays cached until the allocator needs it (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict, deque


def page_hash(prev: int, tokens: tuple[int, ...]) -> int:
    """Hash of one full page, chained to the hash of the page before it (-1 for the first)."""
    return hash((prev, tokens))


class PagePool:
    """Hands out page ids in [0, num_pages); frees them by refcount."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        assert num_pages > 0 and page_size > 0
        self.num_pages = num_pages
        self.page_size = page_size
        self._refs = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))  # refcount 0, not cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0, cached; oldest first
        self._by_hash: dict[int, int] = {}  # hash -> page
        self._page_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # page -> (hash, tokens)

    @property
    def num_free(self) -> int:
        """Pages that an allocation can take now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take `n` pages (refcount 1 each); evicts cached pages when no plain free page is left."""
        assert n <= self.num_free, f"asked for {n} pages, {self.num_free} free"
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                h, _ = self._page_key.pop(page)
                del self._by_hash[h]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: list[int]) -> None:
        """Drop one reference to each page; unreferenced cached pages stay reusable until evicted."""
        for page in pages:
            assert self._refs[page] > 0, f"page {page} released twice"
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._page_key:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def match_prefix(self, tokens: list[int], max_pages: int) -> tuple[list[int], list[int]]:
        """Take a reference to the cached pages that hold `tokens`' leading full pages (at most `max_pages`).

        Returns (pages, their chained hashes).
        """
        pages: list[int] = []
        hashes: list[int] = []
        ps = self.page_size
        prev = -1
        for i in range(max_pages):
            chunk = tuple(tokens[i * ps : (i + 1) * ps])
            h = page_hash(prev, chunk)
            page = self._by_hash.get(h)
            if page is None or self._page_key[page] != (h, chunk):
                break
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1
            pages.append(page)
            hashes.append(h)
            prev = h
        return pages, hashes

    def register(self, page: int, h: int, tokens: tuple[int, ...]) -> None:
        """Make a full, computed page findable by `match_prefix` (no-op if that content is cached)."""
        assert self._refs[page] > 0 and len(tokens) == self.page_size
        if h in self._by_hash or page in self._page_key:
            return
        self._by_hash[h] = page
        self._page_key[page] = (h, tokens)
