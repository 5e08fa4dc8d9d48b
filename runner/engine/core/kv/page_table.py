"""The page table of the running sequences, one row (a slot) each, kept on the host and mirrored on the
device.

A sequence holds a slot from admission until it finishes or is preempted. Its row of `rows` lists its
KV pages. The host uses the rows to place each new token's K/V; the model runner keeps a device copy
of the whole table, which the attention kernels read by slot, and brings it up to date each step with
the entries written since the step before (`drain`): a few per step, instead of the rows of every
sequence of the step. The runner's device token buffer keeps a slot's last sampled token at the same
index, so a decode reads its input there without the host ever seeing the value. Row `num_slots` is a
spare for padding rows.
"""

from __future__ import annotations

import numpy as np


class PageTable:
    """`num_slots` slots, each with a page-table row of `max_pages` entries."""

    def __init__(self, num_slots: int, max_pages: int) -> None:
        self.num_slots = num_slots
        self.rows = np.zeros((num_slots + 1, max_pages), dtype=np.int64)  # [slots + 1, max_pages]
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        self._written: list[int] = []  # flat indices into `rows` written since the last drain

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
        self._written.extend(range(slot * self.max_pages, slot * self.max_pages + len(pages)))
        return slot

    def set_page(self, slot: int, index: int, page: int) -> None:
        self.rows[slot, index] = page
        self._written.append(slot * self.max_pages + index)

    def give_back(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots, slot
        self._free.append(slot)

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """The entries written since the last drain, as (flat index into `rows` [N], page [N]) int64; an
        entry written twice appears twice, both times with its latest page."""
        index = np.array(self._written, dtype=np.int64)
        self._written = []
        return index, self.rows.ravel()[index]
