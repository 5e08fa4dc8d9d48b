"""CUDA graphs of eager steps (prefill and mixed), in pieces cut at the attention calls.

An eager step of a small model is bound by its launches: W0's 16,384-token step launches ~300 kernels
at 22-49 µs of host each for ~12 ms of kernels (PERF_NOTES.md, "Where W0's second goes"). Its
attention cannot sit in a graph as it is (the prefill launch's grid follows the step's sequences), but
everything between two attention calls can: a step padded to a token bucket replays layers + 1 graphs
and runs each layer's attention eagerly between them, ~30-60 launches instead of ~300.

A padded step computes its padding too, which a compute-bound step (an 8B model's prefill: ~20 ms of
kernels per 1,000 tokens, for ~15 ms of launches a step) pays for in GPU time that nothing gains back.
So a step takes its bucket's pieces only when it fills at least `MIN_FILL` of it, and runs eagerly
otherwise: a job's full steps (`max_batch_tokens`) always, the partial ones at its tail when they
happen to fill their bucket. The padding costs a compute-bound step at most 1/7 more GPU time.

A bucket's pieces are captured by running the forward once with `_Cut` as its attention function:
each call copies q into a static buffer, ends the graph being captured, records the call's K/V cache
and settings, and begins the next graph in the same pool; it returns a second static buffer, which the
next piece reads as the attention output. The forward's own frame keeps every tensor a later piece
reads alive while it is captured (the residual stream), so the pool never hands their memory out
twice. At replay the eager attention of the step's own `AttentionBatch` reads the one buffer and
writes the other. The graphs read the step's token-level arrays (`inputs.PIECE_INPUTS`, padded to the
bucket) from one static buffer, as decode graphs do.

Every bucket's pieces share one pool, so a bucket captured later may reuse memory that an earlier
bucket's pieces use within a step. Buckets still replay in any order: the q buffers stay referenced,
the logits go to one buffer outside the pool (the last piece copies them there), and nothing else
crosses from one step to the next.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runner.engine.layers.attention.torch import AttentionBatch, AttentionFn
from runner.engine.worker.decode_graphs import no_gc
from runner.engine.worker.inputs import Layout, unpack

# (static views of PIECE_INPUTS, attention function) -> logits [rows, V]: the forward that is captured
PieceForward = Callable[[dict[str, torch.Tensor], AttentionFn], torch.Tensor]
PaddingFn = Callable[[int], tuple[torch.Tensor, Layout, AttentionBatch]]  # tokens -> padding inputs
# an AttentionFn that also takes the output buffer to write (`paged_attention`'s `out`)
PieceAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionBatch, float, int, float, torch.Tensor], torch.Tensor
]
SMALLEST_BUCKET = 512
MIN_FILL = 7 / 8  # of its bucket, that a step fills to replay the bucket's pieces (the smallest: any)


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts that get pieces: powers of two from SMALLEST_BUCKET up to the first >= max_tokens."""
    buckets = [SMALLEST_BUCKET]
    while buckets[-1] < max_tokens:
        buckets.append(buckets[-1] * 2)
    return buckets


@dataclass(slots=True)
class _Pieces:
    graphs: list[torch.cuda.CUDAGraph]  # layers + 1
    calls: list[tuple]  # (k_cache, v_cache, scale, window, softcap) of each attention between them
    inputs: torch.Tensor  # static PIECE_INPUTS [words]
    q: torch.Tensor  # every attention's q, written by the piece before it [tokens, H, D]
    out: torch.Tensor  # the attention output the piece after it reads [tokens, H, D]


class _Cut:
    """The attention function of a capture: ends the piece being captured and begins the next."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.calls: list[tuple] = []
        self.q: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self._begin()

    def _begin(self) -> None:
        self.graphs.append(torch.cuda.CUDAGraph())
        self.graphs[-1].capture_begin(self.pool)

    def __call__(self, q, k_cache, v_cache, batch, scale, window, softcap) -> torch.Tensor:
        # q into one buffer that every layer shares, inside the piece that ends here: holding each layer's q
        # instead would hold its whole qkv projection in the pool (W2 at 16k tokens: 201 MB a layer)
        if self.q is None:  # in the pool, and held: the pool never hands it out again
            self.q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        assert self.q.shape == q.shape, "every layer's q must have one shape"
        self.q.copy_(q)
        self.graphs[-1].capture_end()
        if self.out is None:  # outside any capture: an allocation of its own
            self.out = torch.empty_like(self.q)
        self.calls.append((k_cache, v_cache, scale, window, softcap))
        self._begin()
        return self.out

    def finish(self) -> None:
        self.graphs[-1].capture_end()


class PieceGraphs:
    """The pieces of every token bucket, in one memory pool (the largest step's workspace)."""

    def __init__(self, forward: PieceForward, attention: PieceAttention, max_tokens: int, padding: PaddingFn):
        self.forward = forward
        self.attention = attention
        self.padding = padding
        self.buckets = token_buckets(max_tokens)
        self._pieces: dict[int, _Pieces] = {}
        self._logits: torch.Tensor | None = None  # [rows, V]: the last piece's output, every bucket's
        self.capture_seconds = 0.0
        self._pool = torch.cuda.graph_pool_handle()
        self._side = torch.cuda.Stream()

    def bucket(self, num_tokens: int) -> int:
        """The tokens a step of `num_tokens` is padded to; 0 (run it eagerly) if it fills less than
        `MIN_FILL` of the smallest bucket that holds it, or if no bucket does."""
        b = next((b for b in self.buckets if b >= num_tokens), 0)
        return b if num_tokens >= MIN_FILL * b or b == self.buckets[0] else 0

    def capture_buckets(self) -> None:
        """Capture every bucket's pieces, largest first (the pool grows once)."""
        t0 = time.perf_counter()
        for tokens in reversed(self.buckets):
            self._pieces[tokens] = self._capture(tokens)
        self.capture_seconds = time.perf_counter() - t0

    def __len__(self) -> int:
        return sum(len(p.graphs) for p in self._pieces.values())

    def close(self) -> None:
        for p in self._pieces.values():
            for g in p.graphs:
                g.reset()
        self._pieces.clear()

    def replay(self, tokens: int, inputs: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Run a step of `tokens` (a bucket) whose PIECE_INPUTS are packed in `inputs`, with `batch` for
        its attention; returns the logits [rows, V] (a static buffer, valid until the next replay)."""
        p = self._pieces[tokens]
        p.inputs.copy_(inputs)
        for graph, (k_cache, v_cache, scale, window, softcap) in zip(p.graphs, p.calls, strict=False):
            graph.replay()
            self.attention(p.q, k_cache, v_cache, batch, scale, window, softcap, p.out)
        p.graphs[-1].replay()
        return self._logits

    def _capture(self, tokens: int) -> _Pieces:
        """Warm up on padding tokens (eager, attention included), then capture, on the side stream and
        after the work already queued (as `DecodeGraphs._capture`)."""
        static, layout, batch = self.padding(tokens)
        views = unpack(static, layout)
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # compiles the pieces' kernels; the padding batch has no sequence, so attention launches nothing
            logits = self.forward(views, lambda q, k, v, _, *rest: self.attention(q, k, v, batch, *rest))
            if self._logits is None:  # one logits buffer for every bucket, outside the pool
                self._logits = torch.empty_like(logits)
            del logits
            # the warm-up's activations go back to the device before the pool takes as much again (at
            # engine build, where the sync costs nothing)
            torch.cuda.empty_cache()
            with no_gc():
                cut = _Cut(self._pool)
                try:
                    self._logits.copy_(self.forward(views, cut))
                finally:
                    cut.finish()
        torch.cuda.current_stream().wait_stream(side)
        assert cut.q is not None and cut.out is not None and len(cut.graphs) == len(cut.calls) + 1
        return _Pieces(cut.graphs, cut.calls, static, cut.q, cut.out)
