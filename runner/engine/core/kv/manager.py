"""The KV manager: which KV pages each running sequence holds, and its row of the page table.

It owns the page pool (refcounts, prefix cache: pages.py) and the page table (page_table.py) and
does all their bookkeeping: `admit` gives a sequence a slot and pages for its whole prompt (cached
prefix pages reused), `grow` one more page for a decode, `free` takes both back (on finish or
preemption), `cache_full_pages` makes computed full pages findable by later prompts. Which sequence
gets pages, and which one is preempted when none are left, is the scheduler's policy.
"""

from __future__ import annotations

from runner.engine.core.kv.page_table import PageTable
from runner.engine.core.kv.pages import PagePool, page_hash
from runner.engine.core.sequence import Sequence


class KVManager:
    """`num_pages` pages of `page_size` tokens for at most `max_seqs` sequences of `max_pages` pages."""

    def __init__(self, num_pages: int, page_size: int, max_seqs: int, max_pages: int) -> None:
        self.pool = PagePool(num_pages, page_size)
        self.table = PageTable(max_seqs, max_pages)
        self.page_size = page_size

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take now (free or evictable cached ones)."""
        return self.pool.num_free

    @property
    def num_used_pages(self) -> int:
        return self.pool.num_used

    @property
    def num_free_slots(self) -> int:
        return self.table.num_free

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    def admit(self, seq: Sequence, keep_free: int) -> bool:
        """Give `seq` a slot and pages for all its tokens, reusing cached pages of its prefix, if a slot
        is free and `keep_free` pages stay free after; sets `num_computed` to the tokens found cached.

        False (and nothing taken) otherwise.
        """
        if not self.table.num_free:
            return False
        ps = self.page_size
        # the last token is always computed (its logits give the next token): never matched
        pages, hashes = self.pool.match_prefix(seq.tokens, (seq.num_tokens - 1) // ps)
        need = self.pages_for(seq.num_tokens) - len(pages)
        if self.pool.num_free - need < keep_free:
            self.pool.release(pages)
            return False
        seq.pages = pages + self.pool.allocate(need)
        seq.page_hashes = hashes
        seq.num_computed = len(pages) * ps
        seq.slot = self.table.take(seq.pages)
        return True

    def needs_page(self, seq: Sequence) -> bool:
        """Whether `seq`'s next token to compute falls past its last page."""
        return seq.num_computed >= len(seq.pages) * self.page_size

    def grow(self, seq: Sequence) -> None:
        """One more page at the end of `seq`'s (a free one must exist: the scheduler makes room first)."""
        seq.pages += self.pool.allocate(1)
        self.table.set_page(seq.slot, len(seq.pages) - 1, seq.pages[-1])

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s pages (cached ones stay findable) and give back its slot; no-op if it holds none."""
        if seq.slot < 0:
            return
        self.pool.release(seq.pages)
        self.table.give_back(seq.slot)
        seq.pages, seq.page_hashes, seq.slot = [], [], -1

    def cache_full_pages(self, seqs: list[Sequence]) -> None:
        """Register the full pages of `seqs` whose tokens are all computed and known, under their chained
        hash (a sequence whose pages went, preempted or freed, has none to register)."""
        ps = self.page_size
        for seq in seqs:  # every sequence of every step: a decode fills a page once in `ps` steps
            full = min(seq.num_computed, len(seq.tokens)) // ps if seq.pages else 0
            while len(seq.page_hashes) < full:
                i = len(seq.page_hashes)
                chunk = tuple(seq.tokens[i * ps : (i + 1) * ps])
                h = page_hash(seq.page_hashes[-1] if seq.page_hashes else -1, chunk)
                self.pool.register(seq.pages[i], h, chunk)
                seq.page_hashes.append(h)
