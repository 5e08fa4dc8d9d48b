"""CUDA graphs of decode-only steps: captured at engine build, replayed with one input copy.

A decode step is padded to a row bucket (powers of two, then multiples of 128); its packed inputs then
have one fixed layout, which the graph reads from a static buffer. The attention kernels read the pages
from the runner's device page table by slot, so no table width enters the layout. The graph holds the
whole step: carry-over gather of the input tokens, forward, sampling (greedy or not, logprobs or not:
part of the key, decided on the host) and the scatter of the sampled tokens into the device token
buffer; for a step with grammar rows ("masked") only the forward, whose logits are then masked and
sampled outside the graph once the host has the masks. The greedy and the sampled graph of every row
bucket are captured when the engine is built (`capture_buckets`); the rarer keys (logprobs, grammar
rows) on their first use. Capture warms up on padding rows only, which touch nothing but the spare slot
and the spare KV page.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from runner.engine.worker.inputs import Layout, unpack

StepFn = Callable[[dict[str, torch.Tensor], int, bool, bool, bool], tuple[torch.Tensor, torch.Tensor | None]]
PaddingFn = Callable[[int], tuple[torch.Tensor, Layout]]  # rows -> packed all-padding inputs, their layout
GraphKey = tuple[int, bool, bool, bool]  # rows, all greedy, logprobs, masked


def row_buckets(max_rows: int) -> list[int]:
    """Batch sizes that get a graph: powers of two up to 128, then multiples of 128, up to the first
    >= max_rows. Few buckets, since each costs a capture (a warm-up step and the capture) and graph
    memory; padding rows cost little (they attend to nothing)."""
    buckets = [1]
    while buckets[-1] < max_rows:
        buckets.append(buckets[-1] * 2 if buckets[-1] < 128 else buckets[-1] + 128)
    return buckets


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # static packed inputs [words]
    views: dict[str, torch.Tensor]  # named views of `inputs`
    tokens: torch.Tensor  # static outputs [rows] (masked: the logits [rows, V])
    logprobs: torch.Tensor | None


class DecodeGraphs:
    """One graph per `GraphKey`, all in one memory pool."""

    def __init__(self, step: StepFn, max_rows: int, padding: PaddingFn) -> None:
        self.step = step
        self.padding = padding
        self.buckets = row_buckets(max_rows)
        self._graphs: dict[GraphKey, _Graph] = {}
        self.capture_seconds = 0.0  # host time spent capturing
        self._pool = torch.cuda.graph_pool_handle()
        self._side = torch.cuda.Stream()  # warm-ups and captures: each new stream gets a cuBLAS workspace

    def bucket(self, num_rows: int) -> int:
        """The rows a decode step of `num_rows` rows is padded to for its graph; 0 if too many for one."""
        return next((b for b in self.buckets if b >= num_rows), 0)

    def capture_buckets(self) -> None:
        """Capture the greedy and the sampled graph of every row bucket, largest first (the shared pool
        then grows once, to the largest step's workspace, which the smaller ones reuse)."""
        for rows in reversed(self.buckets):
            for greedy in (True, False):
                self._graph((rows, greedy, False, False))

    def __len__(self) -> int:
        return len(self._graphs)

    def close(self) -> None:
        """Free every graph and, with them, their memory pool."""
        for g in self._graphs.values():
            g.graph.reset()
        self._graphs.clear()

    def replay(
        self, key: GraphKey, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Run the step packed in `inputs` (laid out as `padding(rows)`'s). Returns the step's outputs and
        the views of the graph's static inputs."""
        graph = self._graph(key)
        graph.inputs.copy_(inputs)
        graph.graph.replay()
        return graph.tokens, graph.logprobs, graph.views

    def _graph(self, key: GraphKey) -> _Graph:
        """The graph of `key`, captured now if it is not yet."""
        graph = self._graphs.get(key)
        if graph is None:
            t0 = time.perf_counter()
            graph = self._graphs[key] = self._capture(key)
            self.capture_seconds += time.perf_counter() - t0
        return graph

    def _capture(self, key: GraphKey) -> _Graph:
        """Warm up on padding rows, then capture, both on the side stream and ordered after the work
        already queued, without stopping it: `torch.cuda.graph` would synchronize the device and empty
        the allocator's caches (device and pinned host) first, which stalls the async pipeline and makes
        the next eager steps allocate again (W3: 8 captures in the run, ~75 ms each)."""
        rows, all_greedy, want_logprobs, masked = key
        static, layout = self.padding(rows)
        views = unpack(static, layout)
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            self.step(views, rows, all_greedy, want_logprobs, masked)  # compiles kernels, sets up handles
            with no_gc():
                graph.capture_begin(self._pool)
                try:
                    tokens, logprobs = self.step(views, rows, all_greedy, want_logprobs, masked)
                finally:
                    graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        return _Graph(graph, static, views, tokens, logprobs)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Python's cycle collector off: run during a capture, it may free another engine's graphs, and
    destroying a graph while a stream captures invalidates the capture."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
