"""Atomic writes on any filesystem: a file is visible only when complete.

On the local disk it is written to a hidden `.tmp-` sibling, fsynced and renamed (fsspec's own local
`autocommit=False` stages in the system temp dir, which may be another device and then is copied,
not renamed). On object stores it is opened with `autocommit=False` and committed (one PUT or a
completed multipart upload), or discarded on error — never published half-written.
"""

from __future__ import annotations

import glob
import os
import posixpath
import secrets
from collections.abc import Callable
from typing import IO

import fsspec
from fsspec.spec import AbstractBufferedFile

from runner.faults import kill_point
from runner.io.storage import is_local

TEMP_PREFIX = ".tmp-"  # local temp siblings; never a committed file


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that the file is visible only once complete."""
    write_atomic(fs, path, lambda f: f.write(data))


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write(f)` on a binary file that becomes visible at `path` only if it returns."""
    if is_local(fs):
        _write_local(fs, path, write)
        return
    f = fs.open(path, "wb", autocommit=False)
    try:
        kill_point("temp_opened")
        write(f)
        if getattr(f, "offset", None):  # a large file: some multipart chunks are up, the rest buffered
            kill_point("upload_unfinished")
        f.close()
        kill_point("before_publish")
        f.commit()
    except BaseException:
        f.discard()
        if isinstance(f, AbstractBufferedFile):
            f.closed = True  # skip the final upload that close() or __del__ would do
        raise


def remove_temps(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Remove the temp siblings of `path` that killed writers left; returns them.

    Only on the local disk: object stores publish a file whole or not at all, and leave none.
    Call it only where no live writer of `path` can exist (under the task's lease, on resume).
    """
    if not is_local(fs):
        return []
    directory, name = posixpath.split(path)
    temps = fs.glob(posixpath.join(directory, f"{TEMP_PREFIX}{glob.escape(name)}-*"))
    for temp in temps:
        fs.rm(temp)
    return temps


def _write_local(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[IO[bytes]], object]) -> None:
    directory, name = posixpath.split(path)
    fs.makedirs(directory, exist_ok=True)
    temp = posixpath.join(directory, f"{TEMP_PREFIX}{name}-{secrets.token_hex(4)}")
    try:
        with open(temp, "wb") as f:
            kill_point("temp_opened")
            write(f)
            f.flush()
            os.fsync(f.fileno())
        kill_point("before_publish")
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
