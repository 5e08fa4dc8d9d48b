"""A tensor-parallel group of processes on one node: rank 0 runs the engine, the other ranks follow.

`start_group` spawns ranks 1..N-1 (each loads its own slice of the model from a `ModelSource`,
runner/engine/loading/source.py, and
builds the same model runner on GPU `cuda:rank`, or on the CPU), then joins them in a
torch.distributed group: NCCL on CUDA, gloo on the CPU, so CI runs the same code. Each step, rank 0
broadcasts the step's packed host inputs (and, for a grammar step, its bitmask) over a gloo group
(`StepChannel`); every rank then runs the same forward, whose all-reduces meet on the device.

A rank that dies ends the group: the followers die with rank 0 (PR_SET_PDEATHSIG), and rank 0's
`Group.check` raises `RankLost` as soon as a follower has exited (a collective that fails on the
dead peer first is turned into the same `RankLost`: `Group.collective`), so the engine's caller stops,
commits what finished, and a later run resumes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from runner.engine.parallel.layers import SINGLE, TensorParallel

log = logging.getLogger(__name__)

# NVLink multicast (NVLS) stays off in every rank: the machines this runs on do not support it
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


# a collective failed: how long rank 0 waits to see the rank that broke it gone (`Group.collective`)
LOST_RANK_WAIT_S = 5.0


class RankLost(RuntimeError):
    """A rank of the tensor-parallel group exited: the group cannot go on."""


class StepChannel:
    """Rank 0 to the other ranks: one picklable message at a time, broadcast over a gloo group."""

    def __init__(self, group) -> None:
        self.group = group

    def send(self, message: object) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def recv(self) -> object:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


@dataclass
class Group:
    """Rank 0's view of its group: the followers' processes, the step channel and the device group."""

    tp: TensorParallel
    channel: StepChannel | None  # None until rank 0 has joined
    followers: list[mp.process.BaseProcess]

    @property
    def lost(self) -> bool:
        """Whether a follower has exited (the group can run nothing more)."""
        return any(proc.exitcode is not None for proc in self.followers)

    def check(self) -> None:
        """Raise RankLost if a follower has exited."""
        for rank, proc in enumerate(self.followers, start=1):
            if proc.exitcode is not None:
                raise RankLost(
                    f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}; "
                    "the group stops (rows finished so far are kept, a new run resumes the rest)"
                )

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        """Around rank 0's collectives (step channel, gloo all-reduces): one that fails because a rank
        died (gloo: "Connection closed by peer", naming no rank) raises RankLost for that rank instead,
        once its exit is seen (within LOST_RANK_WAIT_S); any other failure is raised as it is."""
        try:
            yield
        except RankLost:
            raise
        except RuntimeError as e:
            deadline = time.monotonic() + LOST_RANK_WAIT_S
            while not self.lost and time.monotonic() < deadline:
                time.sleep(0.01)
            try:
                self.check()
            except RankLost as lost:
                raise lost from e
            raise

    def close(self) -> None:
        """Tell the followers to exit, wait for them, and leave the process group. After a lost rank, the
        device group is aborted instead: its collectives in flight would wait for that rank forever."""
        with contextlib.suppress(Exception):
            if self.lost:
                dist.distributed_c10d._abort_process_group()
            else:
                self.channel.send(None)
        for proc in self.followers:
            proc.join(timeout=30)
            if proc.exitcode is None:
                proc.kill()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank `rank`'s device: GPU `cuda:rank` of the visible ones, or the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


# follow(config, tp, channel, source, device); `source` (a loading.source.ModelSource) is passed through
Follow = Callable[[Any, TensorParallel, StepChannel, Any, torch.device], None]


def start_group(source: Any, config, device: torch.device, follow: Follow) -> Group:
    """Spawn ranks 1..N-1 of `config.tensor_parallel` (each runs `follow(config, tp, channel, source,
    its device)`, which builds its model runner and follows rank 0's steps) and join them as rank 0."""
    size = config.tensor_parallel
    os.environ.update(MULTICAST_OFF)
    port = _free_port()
    ctx = mp.get_context("spawn")
    followers = [
        ctx.Process(
            target=_follower_main,
            args=(source, config, follow, rank, size, port, device.type),
            name=f"batchrun-tp-rank{rank}",
            daemon=True,
        )
        for rank in range(1, size)
    ]
    for proc in followers:
        proc.start()
    group = Group(SINGLE, None, followers)
    joined: dict[str, Any] = {}

    def join_as_rank_0() -> None:
        try:
            joined["group"] = join(0, size, port, rank_device(device, 0))
        except BaseException as e:  # noqa: BLE001 (handed to the caller's thread)
            joined["error"] = e

    # the rendezvous waits for every rank: a rank that dies while it starts must not leave rank 0 waiting
    thread = threading.Thread(target=join_as_rank_0, name="batchrun-tp-join", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        group.check()
    if "error" in joined:
        raise joined["error"]
    group.tp, group.channel = joined["group"]
    return group


def join(rank: int, size: int, port: int, device: torch.device) -> tuple[TensorParallel, StepChannel]:
    """Join the group as `rank`: the device group (NCCL or gloo) and the host channel (gloo)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        device_id=device if cuda else None,
    )
    host = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return TensorParallel(rank, size, dist.group.WORLD), StepChannel(host)


def _follower_main(source: Any, config, follow: Follow, rank: int, size: int, port: int, kind: str) -> None:
    """A spawned rank: die with rank 0, join the group, follow rank 0's steps until it says stop."""
    die_with_parent()
    os.environ.update(MULTICAST_OFF)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    device = rank_device(torch.device(kind), rank)
    tp, channel = join(rank, size, port, device)
    follow(config, tp, channel, source, device)
    dist.destroy_process_group()


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that spawned it (rank 0, or the engine) dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # rank 0 died before the prctl: nothing to follow
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
