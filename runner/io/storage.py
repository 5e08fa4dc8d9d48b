"""Filesystems for job URLs: object stores are opened without listing caches.

A job resumes what another process (an earlier attempt, another task) wrote; fsspec's cached
filesystem instances and directory listings would hide those objects (`ls`, `exists`, `open` fail
on an `S3FileSystem` that listed the prefix before). Local paths are unaffected.
"""

from __future__ import annotations

import fsspec

_NO_CACHES = {"skip_instance_cache": True, "use_listings_cache": False}


def url_to_fs(url: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    """`fsspec.core.url_to_fs`, with listing and instance caches off for remote URLs.

    The user's `storage_options` win where they set either option.
    """
    protocol = fsspec.core.split_protocol(url)[0]
    options = storage_options if protocol in (None, "file") else {**_NO_CACHES, **storage_options}
    return fsspec.core.url_to_fs(url, **options)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is the local disk (where rename is atomic)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols
