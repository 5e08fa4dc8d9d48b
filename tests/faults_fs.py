"""A local filesystem that fails chosen calls, for storage-fault tests: `faulty:///abs/path`.

It behaves as an object store would (not "file", so writes go through `autocommit=False` and a
commit), and fails the calls that `FAULTS` names: `open`, `write`, `close`, `ls`, `rm`, on paths
containing a substring, `times` times (transient) or always (`times=None`, permanent).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem


@dataclass(slots=True)
class Fault:
    call: str  # open | write | close | ls | rm
    error: Callable[[], OSError]
    path: str = ""  # fail only calls on paths containing this
    times: int | None = 1  # None: every time
    skip: int = 0  # let this many matching calls through first
    hits: list[str] = field(default_factory=list)  # the paths it failed

    def strike(self, call: str, path: str) -> None:
        if call != self.call or self.path not in path:
            return
        if self.skip:
            self.skip -= 1
            return
        if self.times is not None:
            if self.times == 0:
                return
            self.times -= 1
        self.hits.append(path)
        raise self.error()


FAULTS: list[Fault] = []  # set by a test, cleared by the `faulty_fs` fixture


def _strike(call: str, path: str) -> None:
    for fault in FAULTS:
        fault.strike(call, path)


class _File:
    """A file whose write/close may fail; everything else goes to the real one."""

    def __init__(self, f, path: str):
        self._f = f
        self._path = path

    def write(self, data):
        _strike("write", self._path)
        return self._f.write(data)

    def close(self):
        _strike("close", self._path)
        return self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class FaultyFileSystem(LocalFileSystem):
    protocol = ("faulty",)
    cachable = False

    def __init__(self, **kwargs):
        super().__init__(auto_mkdir=True, **kwargs)  # like an object store: no directories to make

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("faulty://"):
            path = path[len("faulty://") :]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        _strike("open", path)
        return _File(super()._open(path, mode, **kwargs), path)

    def ls(self, path, detail=False, **kwargs):
        _strike("ls", path)
        return super().ls(path, detail=detail, **kwargs)

    def rm(self, path, recursive=False, maxdepth=None):
        _strike("rm", path if isinstance(path, str) else ",".join(path))
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
