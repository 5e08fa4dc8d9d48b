"""Parquet files read through fsspec's Python file objects, on the calling thread only.

Arrow's buffers over a Python file hold Python bytes. A read that pre-buffers, or that decodes on
Arrow's thread pool, leaves a pool worker releasing such buffers after the read has returned; if the
interpreter is exiting by then (a short command such as `batchrun status`), that worker dies taking
the GIL and the process aborts with "terminate called without an active exception". So files are
opened without pre-buffering, and every read passes `use_threads=READ_THREADS`.
"""

from __future__ import annotations

from typing import IO

import pyarrow.parquet as pq

READ_THREADS = False


def open_parquet(
    f: IO[bytes], metadata: pq.FileMetaData | None = None, buffer_size: int = 0
) -> pq.ParquetFile:
    """`pq.ParquetFile` over the Python file `f`, its column chunks read as they are needed."""
    return pq.ParquetFile(f, metadata=metadata, buffer_size=buffer_size, pre_buffer=False)
