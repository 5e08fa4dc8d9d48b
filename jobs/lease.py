"""One writer per task: a lease object in the output, held with a heartbeat, refused to a second job.

`<out>/_batchrun/leases/task-<i>-of-<n>.json` is created exclusively (O_EXCL on local disks,
If-None-Match on object stores) and rewritten every `ttl/3` seconds. A second `batchrun submit` of the
same task finds it fresh and stops with a message naming the holder. A lease is stale — and taken
over — when its heartbeat is older than `ttl`, or at once when its holder was a process on this host
that no longer exists (a `kill -9` leaves its lease behind; the rerun must not wait for it).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
from dataclasses import asdict, dataclass

import fsspec

from runner.io.retry import retry
from runner.store.atomic import remove_temps, write_bytes_atomic

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 60.0


class LeaseHeld(Exception):
    """Another live job holds this task's lease."""


@dataclass(slots=True)
class _Holder:
    host: str
    pid: int
    token: str
    heartbeat: float  # wall-clock seconds

    def alive_here(self) -> bool | None:
        return process_alive(self.host, self.pid)


def process_alive(host: str, pid: int) -> bool | None:
    """Whether process `pid` of `host` exists; None when it is on another host (we can't tell)."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_path(root: str, task_index: int, num_tasks: int) -> str:
    """The lease file of one task under the output `root`."""
    return posixpath.join(root, "_batchrun", "leases", f"task-{task_index}-of-{num_tasks}.json")


class TaskLease:
    """Held for the duration of a `with` block; raises LeaseHeld on entry if a live job holds it.

    `wait_for_expiry`: a lease of another host whose heartbeat is fresh is waited on (at most `ttl_s`)
    before it refuses. A scheduler that reruns a task on another node as soon as its node died (Ray)
    finds the dead holder's lease still fresh: the rerun waits for it to expire instead of failing; a
    live holder keeps it fresh, and is refused as always.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        task_index: int,
        num_tasks: int,
        ttl_s: float = DEFAULT_TTL_S,
        wait_for_expiry: bool = False,
    ):
        self.fs = fs
        self.wait_for_expiry = wait_for_expiry
        self.path = lease_path(root, task_index, num_tasks)
        self.ttl_s = ttl_s
        self.me = _Holder(socket.gethostname(), os.getpid(), os.urandom(6).hex(), time.time())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="batchrun-lease", daemon=True)

    def __enter__(self) -> TaskLease:
        self._acquire()
        remove_temps(self.fs, self.path)  # of heartbeats killed mid-write; ours now, no one else writes it
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._read() == self.me.token:
            self.fs.rm(self.path)

    def _acquire(self) -> None:
        if self.wait_for_expiry:
            self._wait_until_takeable()
        for _ in range(3):
            if self._create():
                return
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            age = time.time() - holder.heartbeat
            alive = holder.alive_here()
            if alive is False or age > self.ttl_s:
                why = "its process is gone" if alive is False else f"no heartbeat for {age:.0f} s"
                log.warning(
                    "taking over the lease %s from pid %d on %s (%s)", self.path, holder.pid, holder.host, why
                )
                self.fs.rm(self.path)
                continue
            raise LeaseHeld(
                f"another job is writing this output: pid {holder.pid} on {holder.host} holds "
                f"{self.path} (heartbeat {age:.0f} s ago). Wait for it to finish or stop it; if it is "
                f"gone, its lease expires {max(0.0, self.ttl_s - age):.0f} s after its last heartbeat."
            )
        raise LeaseHeld(f"could not take the lease {self.path}: it keeps changing hands")

    def _wait_until_takeable(self, poll_s: float = 0.5) -> None:
        """Wait, at most `ttl_s`, while the lease's holder is on another host (alive or not: we can't
        tell) and its heartbeat is fresh; a holder on this host is judged at once."""
        deadline = time.monotonic() + self.ttl_s
        logged = False
        while time.monotonic() < deadline:
            holder = self._holder()
            if holder is None or holder.alive_here() is not None:
                return
            age = time.time() - holder.heartbeat
            if age > self.ttl_s:
                return
            if not logged:
                log.info(
                    "the lease %s is held by pid %d on %s (heartbeat %.0f s ago): waiting up to %.0f s for "
                    "it to expire, in case that process is gone",
                    self.path, holder.pid, holder.host, age, self.ttl_s - age,
                )  # fmt: skip
                logged = True
            time.sleep(poll_s)

    def _create(self) -> bool:
        self.me.heartbeat = time.time()
        data = json.dumps(asdict(self.me)).encode()
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        return True

    def _holder(self) -> _Holder | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                return _Holder(**json.loads(f.read()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # torn by a kill mid-write: as good as stale
            return _Holder("?", -1, "", 0.0)

    def _read(self) -> str | None:
        holder = self._holder()
        return holder.token if holder else None

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if self._read() != self.me.token:
                    log.error("lost the lease %s to another job; stopping heartbeats", self.path)
                    return
                self.me.heartbeat = time.time()
                data = json.dumps(asdict(self.me)).encode()
                retry(
                    f"renewing the lease {self.path}",
                    lambda d=data: write_bytes_atomic(self.fs, self.path, d),
                )
            except OSError as e:  # the job goes on; the storage's own failures stop it where they matter
                log.error(
                    "%s; no more heartbeats: another job may take this task over in %.0f s", e, self.ttl_s
                )
                return
