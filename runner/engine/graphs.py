"""CUDA graphs of decode-only steps: captured on first use, replayed with one input copy.

A decode step is padded to a row bucket (powers of two, then multiples of 128) and a page-table width
bucket (powers of two); its packed inputs then have one fixed layout, which the graph reads from a
static buffer. The graph holds the whole step: carry-over gather of the input tokens, forward,
sampling (greedy or not, logprobs or not: part of the key, decided on the host) and the scatter of
the sampled tokens into the device token buffer; for a step with grammar rows ("masked") only the
forward, whose logits are then masked and sampled outside the graph once the host has the masks.
Capture warms up on padding rows only, which touch nothing but the spare slot and the spare KV page.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from runner.engine.inputs import Layout, unpack

StepFn = Callable[[dict[str, torch.Tensor], int, bool, bool, bool], tuple[torch.Tensor, torch.Tensor | None]]
GraphKey = tuple[int, int, bool, bool, bool]  # rows, table width, all greedy, logprobs, masked


def row_buckets(max_rows: int) -> list[int]:
    """Batch sizes that get a graph: powers of two up to 128, then multiples of 128, up to the first
    >= max_rows. Few buckets, since each first use costs a capture (a device sync and a warm-up
    step); padding rows cost little (they attend to nothing)."""
    buckets = [1]
    while buckets[-1] < max_rows:
        buckets.append(buckets[-1] * 2 if buckets[-1] < 128 else buckets[-1] + 128)
    return buckets


def width_bucket(width: int, max_width: int) -> int:
    """The page-table width a graph is captured for: a power of two >= `width` (at least 8)."""
    return min(max(8, 1 << (width - 1).bit_length()), max_width)


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # static packed inputs [words]
    views: dict[str, torch.Tensor]  # named views of `inputs`
    tokens: torch.Tensor  # static outputs [rows] (masked: the logits [rows, V])
    logprobs: torch.Tensor | None


class DecodeGraphs:
    """One graph per `GraphKey`, all in one memory pool."""

    def __init__(self, step: StepFn, max_rows: int, max_width: int) -> None:
        self.step = step
        self.buckets = row_buckets(max_rows)
        self.max_width = max_width
        self._graphs: dict[GraphKey, _Graph] = {}
        self.capture_seconds = 0.0  # host time spent capturing (each capture syncs the device)
        self._pool = torch.cuda.graph_pool_handle()
        self._side = torch.cuda.Stream()  # warm-ups and captures: each new stream gets a cuBLAS workspace

    def bucket(self, num_rows: int, width: int) -> tuple[int, int] | None:
        """The (rows, table width) a decode step of `num_rows` rows and table `width` is padded to for its
        graph; None if too large for one."""
        if num_rows > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= num_rows), width_bucket(width, self.max_width)

    def __len__(self) -> int:
        return len(self._graphs)

    def close(self) -> None:
        """Free every graph and, with them, their memory pool."""
        for g in self._graphs.values():
            g.graph.reset()
        self._graphs.clear()

    def replay(
        self, key: GraphKey, inputs: torch.Tensor, layout: Layout, padding: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Run the step packed in `inputs`; `padding()` gives all-padding inputs for a first capture.
        Returns the step's outputs and the views of the graph's static inputs."""
        graph = self._graphs.get(key)
        if graph is None:
            t0 = time.perf_counter()
            graph = self._graphs[key] = self._capture(key, padding(), layout)
            self.capture_seconds += time.perf_counter() - t0
        graph.inputs.copy_(inputs)
        graph.graph.replay()
        return graph.tokens, graph.logprobs, graph.views

    def _capture(self, key: GraphKey, padding: torch.Tensor, layout: Layout) -> _Graph:
        """Warm up on padding rows, then capture, both on the side stream and ordered after the work
        already queued, without stopping it: `torch.cuda.graph` would synchronize the device and empty
        the allocator's caches (device and pinned host) first, which stalls the async pipeline and makes
        the next eager steps allocate again (W3: 8 captures in the run, ~75 ms each)."""
        rows, _, all_greedy, want_logprobs, masked = key
        static = padding.clone()
        views = unpack(static, layout)
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            self.step(views, rows, all_greedy, want_logprobs, masked)  # compiles kernels, sets up handles
            with _no_gc():
                graph.capture_begin(self._pool)
                try:
                    tokens, logprobs = self.step(views, rows, all_greedy, want_logprobs, masked)
                finally:
                    graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        return _Graph(graph, static, views, tokens, logprobs)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Python's cycle collector off: run during a capture, it may free another engine's graphs, and
    destroying a graph while a stream captures invalidates the capture."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
