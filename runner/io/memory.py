"""Freed I/O buffers go back to the operating system (glibc), so resident memory tracks what is held.

A job streams big transient buffers: input pages, Arrow tables of parts, upload chunks. glibc
raises its mmap threshold each time such a buffer is freed (up to 32 MiB), after which buffers of
that size come from the heap, whose freed pages it keeps: on a 200 MB shard with a kept payload
column that was ~150-200 MB of resident memory no row needed. A fixed threshold keeps blocks of
64 KiB and more (row values of wide columns among them) in their own mappings, unmapped on free.
The CPU engine's large tensors are then mapped and unmapped too; SmolLM2 on the CPU (16 prompts x
32 tokens) showed no slowdown beyond run-to-run noise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 2**16


def return_freed_buffers_to_os() -> None:
    """Fix glibc's mmap threshold at 64 KiB; a no-op where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        return
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused; freed buffers may stay resident")
