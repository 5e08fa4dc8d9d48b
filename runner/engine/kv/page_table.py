"""The page table of the running sequences, one row (a slot) each, on the host.

A sequence holds a slot from admission until it finishes or is preempted. Its row of `rows`
lists its KV pages (the model runner copies the rows of a step's sequences to the device), and the
runner's device token buffer keeps its last sampled token at the same index, so a decode reads its
input there without the host ever seeing the value. Row `num_slots` is a spare for padding rows.
"""

from __future__ import annotations

import numpy as np


class PageTable:
    """`num_slots` slots, each with a page-table row of `max_pages` entries."""

    def __init__(self, num_slots: int, max_pages: int) -> None:
        self.num_slots = num_slots
        self.rows = np.zeros((num_slots + 1, max_pages), dtype=np.int64)  # [slots + 1, max_pages]
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def max_pages(self) -> int:
        return self.rows.shape[1]

    @property
    def pad_slot(self) -> int:
        """The spare row: padding rows of a batch read and write here."""
        return self.num_slots

    def take(self, pages: list[int]) -> int:
        """A free slot whose row starts with `pages`."""
        slot = self._free.pop()
        self.rows[slot, : len(pages)] = pages
        return slot

    def set_page(self, slot: int, index: int, page: int) -> None:
        self.rows[slot, index] = page

    def give_back(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots, slot
        self._free.append(slot)
