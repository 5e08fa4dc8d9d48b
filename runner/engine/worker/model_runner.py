"""Launches a scheduled batch on the device and hands back its sampled tokens later.

`launch` packs the batch's inputs (inputs.py), queues the step (a CUDA graph replay for decode
steps, eager otherwise) and the copy of its sampled tokens to pinned host memory, and returns at
once; `wait` blocks until those tokens are on the host. Sampled tokens also land in a device token
buffer indexed by slot, from which the next step's decodes read their input (carry-over), so the
engine can launch step N+1 before it waits for step N. On the CPU the same code runs synchronously.

A step with grammar rows is launched `masked`: only its forward is queued, and its logits wait in
the `LaunchedStep` until the host has the grammar bitmask (`mask_rows` rows), which `sample` copies
to the device and applies right before sampling (eager), while the forward may still be running.

In a tensor-parallel group, rank 0's runner sends each step's host inputs (and bitmasks) to the
other ranks (`parallel/group.py`), whose runners `follow`: every rank runs the same step on its slice of the
model, in the same order, eager or from the same CUDA graph.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from runner.engine.core.kv import PageTable
from runner.engine.core.scheduler import ScheduledBatch
from runner.engine.layers.attention.torch import AttentionBatch, AttentionFn
from runner.engine.models import PagedModel
from runner.engine.parallel.group import Group, StepChannel
from runner.engine.sample.sampler import SamplingTensors, apply_token_bitmask, sample
from runner.engine.worker.decode_graphs import DecodeGraphs, GraphKey
from runner.engine.worker.inputs import (
    PIECE_INPUTS,
    TABLE_UPDATES,
    Layout,
    SlotSampling,
    Staging,
    StepInputs,
    build_inputs,
    fill,
    layout_of,
    layout_words,
    unpack,
)
from runner.engine.worker.piece_graphs import PieceGraphs

GROUP_POLL_S = 50e-6  # rank 0 of a group: how often a wait checks that the other ranks are alive


@dataclass(slots=True)
class PendingSample:
    """A masked step's forward output, waiting for its bitmask before it samples."""

    logits: torch.Tensor  # [R, V] model dtype (R: sample rows, padding rows included)
    views: dict[str, torch.Tensor]  # the step's packed inputs (sampling parameters, slots)
    num_samples: int
    all_greedy: bool
    want_logprobs: bool


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device: its sampled tokens arrive in `tokens` (host) once `done` has fired.
    A masked step has `pending` set (and no tokens) until `ModelRunner.sample` queues its sampling."""

    done: torch.cuda.Event | None  # None on the CPU: the step already ran
    tokens: torch.Tensor | None  # [S] int64
    logprobs: torch.Tensor | None  # [S] float32
    graphed: bool
    pending: PendingSample | None = None


class ModelRunner:
    """Holds the model, the KV cache [layers, 2, pages + 1, page_size, Hkv, D], the device copy of the page
    table and the token buffer."""

    def __init__(
        self,
        model: PagedModel,
        table: PageTable,
        num_pages: int,
        page_size: int,
        kv_dtype: torch.dtype,
        attention: AttentionFn,
        cuda_graphs: bool,
        group: Group | None = None,
        piece_tokens: int = 0,
    ) -> None:
        """`kv_dtype`: the KV cache's (the model's, or fp8); `group`: set on rank 0 of a tensor-parallel
        group, which sends each step to the other ranks; `piece_tokens` > 0 (CUDA graphs on): eager steps of
        up to that many tokens run from piece graphs (`worker/piece_graphs.py`)."""
        s = model.shape
        self.group = group
        dev = model.device
        self.model = model
        self.table = table
        self.sampling = SlotSampling(table.num_slots)
        self.page_size = page_size
        self.attention = attention
        self.spare_kv = num_pages * page_size  # first slot of the spare page (padding rows write there)
        self.kv_cache = torch.zeros(
            (s.num_layers, 2, num_pages + 1, page_size, s.num_kv_heads, s.head_dim),
            device=dev,
            dtype=kv_dtype,
        )
        self.page_table = torch.zeros(table.rows.shape, dtype=torch.int64, device=dev)  # [slots + 1, W]
        self.token_buf = torch.zeros(table.num_slots + 1, dtype=torch.int64, device=dev)  # [slots + 1]
        self.staging = Staging(dev)
        self.cuda = dev.type == "cuda"
        self.graphs = (
            DecodeGraphs(self._step, table.num_slots, self._padding) if self.cuda and cuda_graphs else None
        )
        self.sample_rows = table.num_slots  # a piece-graphed step's logits rows: one per sequence at most
        self.pieces = (
            PieceGraphs(self._piece_forward, attention, piece_tokens, self._piece_padding)
            if self.graphs is not None and piece_tokens
            else None
        )
        rows = self.graphs.buckets[-1] if self.graphs else table.num_slots
        self._out = [torch.empty(rows, dtype=torch.int64, device=dev) for _ in range(2)]
        self._out_lp = [torch.empty(rows, dtype=torch.float32, device=dev) for _ in range(2)]
        self._turn = 0
        if self.cuda:
            self._host = [torch.empty(rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._host_lp = [torch.empty(rows, dtype=torch.float32, pin_memory=True) for _ in range(2)]
            self._d2h = torch.cuda.Stream(dev)
            self._computed = [torch.cuda.Event(), torch.cuda.Event()]
            self._fetched = [torch.cuda.Event(), torch.cuda.Event()]

    def capture_graphs(self) -> bool:
        """Capture the decode graphs of every row bucket now (`DecodeGraphs.capture_buckets`), so that the
        run pays for none; every rank of a group at once (the graphs hold its collectives). False when
        there are none to capture (CPU, or `cuda_graphs` off)."""
        if self.graphs is None:
            return False
        if self.group is None:
            self.graphs.capture_buckets()
        else:
            with self.group.collective():
                self.graphs.capture_buckets()
        if self.pieces is not None:
            self.pieces.capture_buckets()
        return True

    def launch(self, batch: ScheduledBatch, masked: bool = False) -> LaunchedStep:
        """Queue `batch` on the device; never waits for it. `masked`: queue the forward only (see
        `sample`)."""
        pad_to = 0
        if self.graphs is not None and batch.num_decodes == len(batch.seqs):
            pad_to = self.graphs.bucket(len(batch.seqs))
        pad_tokens = None
        if self.pieces is not None and not pad_to and (width := self.pieces.bucket(sum(batch.num_new))):
            pad_tokens = (width, self.sample_rows)
        updates = self.table.drain()
        inp = build_inputs(
            batch, self.table, self.sampling, self.page_size, self.spare_kv, pad_to, updates, pad_tokens
        )
        key = (pad_to, inp.all_greedy, inp.want_logprobs, masked) if pad_to else None
        if self.group is None:
            return self._launch(inp, key, masked)
        with self.group.collective():  # on the CPU the forward's all-reduces run here too
            self.group.channel.send(("step", inp, key, masked))
            return self._launch(inp, key, masked)

    def follow(self, channel: StepChannel) -> None:
        """A tensor-parallel rank other than 0: run every step rank 0 sends (the same inputs, so the
        same forward and the same sampled tokens) until it sends None. Like rank 0, at most two steps
        are in flight (a staging buffer is reused two steps later)."""
        in_flight: deque[LaunchedStep] = deque()
        while (message := channel.recv()) is not None:
            kind, *payload = message
            if kind == "step":
                if len(in_flight) == 2:
                    self.wait(in_flight.popleft())
                in_flight.append(self._launch(*payload))
            else:  # "mask": the bitmask of the masked step just launched
                self.sample(in_flight[-1], torch.from_numpy(payload[0]))
        for step in in_flight:
            self.wait(step)

    def _launch(self, inp: StepInputs, key: GraphKey | None, masked: bool) -> LaunchedStep:
        """Queue the step laid out in `inp`: the page-table entries it carries, then its forward, eager or
        the replay of graph `key`."""
        flat, layout = self.staging.pack(inp.arrays)
        own, updates = layout[: -len(TABLE_UPDATES)], layout[-len(TABLE_UPDATES) :]
        if inp.num_table_updates:
            self.page_table.view(-1).index_copy_(0, *unpack(flat, updates).values())
        if key is None and "carry_slot" in inp.arrays:  # a step of piece graphs
            views, static = unpack(flat, own), flat[: layout_words(own[: len(PIECE_INPUTS)])]
            out, logprobs = self._piece_step(views, static, inp, masked)
        elif key is None:
            views = unpack(flat, own)
            out, logprobs = self._step(views, inp.num_decodes, inp.all_greedy, inp.want_logprobs, masked)
        else:  # a graph reads the step's own arrays from its static copy of them
            out, logprobs, views = self.graphs.replay(key, flat[: layout_words(own)])
        if masked:
            pending = PendingSample(out, views, inp.num_samples, inp.all_greedy, inp.want_logprobs)
            return LaunchedStep(None, None, None, key is not None, pending)
        return self._fetch(out, logprobs, inp.num_samples, key is not None)

    def mask_rows(self, step: LaunchedStep) -> int:
        """Rows of the grammar bitmask a masked step samples under: one per sample row, padding included."""
        assert step.pending is not None
        return step.pending.logits.shape[0]

    def sample(self, step: LaunchedStep, bitmask: torch.Tensor) -> None:
        """Queue a masked step's sampling under `bitmask` (host [mask_rows, words] int32, page-locked on
        CUDA; it must stay as it is until the step's tokens are waited for); completes `step` in place
        (its tokens then arrive as any step's)."""
        p = step.pending
        assert p is not None and bitmask.shape == (p.logits.shape[0], -(-p.logits.shape[1] // 32))
        if self.group is not None:
            with self.group.collective():
                self.group.channel.send(("mask", bitmask.numpy().copy()))
        on_device = bitmask.to(p.logits.device, non_blocking=True)  # [R, words]
        with torch.inference_mode():
            tokens, logprobs = self._sample(
                apply_token_bitmask(p.logits, on_device), p.views, p.all_greedy, p.want_logprobs
            )
        done = self._fetch(tokens, logprobs, p.num_samples, step.graphed)
        step.done, step.tokens, step.logprobs, step.pending = done.done, done.tokens, done.logprobs, None

    def wait(self, step: LaunchedStep) -> tuple[list[int], list[float] | None]:
        """Block until `step`'s sampled tokens are on the host; returns them (and their logprobs)."""
        if step.done is not None and self.group is not None:
            while not step.done.query():  # a lost rank would leave this step waiting for it forever
                self.group.check()
                time.sleep(GROUP_POLL_S)
        elif step.done is not None:
            step.done.synchronize()
        return step.tokens.tolist(), None if step.logprobs is None else step.logprobs.tolist()

    def close(self) -> None:
        """Drop the graphs (and their memory pool), the KV cache, the token, output and staging buffers:
        the device memory goes back to the allocator."""
        if self.graphs is not None:
            self.graphs.close()
        if self.pieces is not None:
            self.pieces.close()
        if self.group is not None:
            self.group.close()
        self.graphs = self.pieces = self.model = self.staging = self.group = None
        self.kv_cache = self.page_table = self.token_buf = torch.empty(0)
        self._out = self._out_lp = self._host = self._host_lp = []

    @torch.inference_mode()
    def _step(
        self,
        v: dict[str, torch.Tensor],
        num_decodes: int,
        all_greedy: bool,
        want_logprobs: bool,
        masked: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The device work of one step, from packed input views to sampled tokens (graph-capturable);
        `masked`: to the logits [R, V] only."""
        ids = v["ids"]  # [T]
        carried = self.token_buf[v["row_slot"][:num_decodes]]  # [Bd] tokens sampled on the device
        ids = torch.cat((torch.where(ids[:num_decodes] < 0, carried, ids[:num_decodes]), ids[num_decodes:]))
        logits = self.model.forward(
            ids, v["positions"], self.kv_cache, self._attention_batch(v, num_decodes), v["logits_rows"],
            self.attention,
        )  # fmt: skip
        if masked:
            return logits, None
        return self._sample(logits, v, all_greedy, want_logprobs)

    @torch.inference_mode()
    def _piece_step(
        self, v: dict[str, torch.Tensor], static: torch.Tensor, inp: StepInputs, masked: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_step` from piece graphs: `static` holds the step's PIECE_INPUTS, `v` views every array."""
        batch = self._attention_batch(v, inp.num_decodes)
        logits = self.pieces.replay(v["ids"].numel(), static, batch)
        logits = logits[: v["sample_slot"].numel()]  # [sample rows, V]
        if masked:
            return logits, None
        return self._sample(logits, v, inp.all_greedy, inp.want_logprobs)

    def _attention_batch(self, v: dict[str, torch.Tensor], num_decodes: int) -> AttentionBatch:
        """The attention metadata of a step's packed inputs `v`."""
        return AttentionBatch(
            cu_seqlens_q=v["cu"],
            kv_lens=v["kv_lens"],
            page_table=self.page_table,
            row_slot=v["row_slot"],
            slot_mapping=v["slot_mapping"],
            num_decodes=num_decodes,
            decode_seq=v["decode_seq"],
            block_seq=v["block_seq"],
            block_start=v["block_start"],
        )

    @torch.inference_mode()
    def _piece_forward(self, v: dict[str, torch.Tensor], attention: AttentionFn) -> torch.Tensor:
        """The forward that piece graphs capture, over the static, padded PIECE_INPUTS `v`: the decodes'
        inputs from the token buffer, then the model to the logits [sample rows, V]. The model reads
        only the slot mapping of its attention batch; `attention` gets the rest at replay."""
        ids = torch.where(v["ids"] < 0, self.token_buf[v["carry_slot"]], v["ids"])  # [tokens]
        none = v["slot_mapping"][:0]
        batch = AttentionBatch(none, none, self.page_table, none, v["slot_mapping"], 0, none, none, none)
        return self.model.forward(ids, v["positions"], self.kv_cache, batch, v["logits_rows"], attention)

    def _piece_padding(self, tokens: int) -> tuple[torch.Tensor, Layout, AttentionBatch]:
        """Packed PIECE_INPUTS of a step of `tokens` padding tokens (for capture), their layout, and the
        attention batch of that step (no sequence: attention launches nothing)."""
        flat, layout = self._packed_padding(pad_tokens=(tokens, self.sample_rows))
        own = layout[: len(PIECE_INPUTS)]
        return flat[: layout_words(own)].clone(), own, self._attention_batch(unpack(flat, layout), 0)

    def _sample(
        self, logits: torch.Tensor, v: dict[str, torch.Tensor], all_greedy: bool, want_logprobs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sample from logits [R, V] with the step's parameters; the tokens also go to the token buffer."""
        tokens, logprobs = sample(logits, SamplingTensors.from_step(v, all_greedy, want_logprobs))  # [S]
        self.token_buf.index_copy_(0, v["sample_slot"], tokens)
        return tokens, logprobs

    def _padding(self, rows: int) -> tuple[torch.Tensor, Layout]:
        """Packed inputs of a decode step of `rows` padding rows (for graph capture), and their layout
        (a decode step's own arrays, without page-table entries)."""
        return self._packed_padding(pad_to=rows)

    def _packed_padding(self, **padding) -> tuple[torch.Tensor, Layout]:
        """Packed inputs of a step of padding only, `padding` being `build_inputs`' `pad_to` or
        `pad_tokens`, on the device, and their layout."""
        empty = ScheduledBatch([], [], [], 0, [])
        arrays = build_inputs(
            empty, self.table, self.sampling, self.page_size, self.spare_kv, **padding
        ).arrays
        layout = layout_of(arrays)
        host = np.zeros(layout_words(layout), dtype=np.int64)
        fill(host, layout, arrays)
        return torch.from_numpy(host).to(self.model.device), layout

    def _fetch(
        self, tokens: torch.Tensor, logprobs: torch.Tensor | None, n: int, graphed: bool
    ) -> LaunchedStep:
        """Start the copy of the first `n` sampled tokens to the host."""
        if not self.cuda:
            return LaunchedStep(None, tokens[:n], None if logprobs is None else logprobs[:n], graphed)
        turn = self._turn
        self._turn ^= 1
        out, out_lp = self._out[turn][:n], self._out_lp[turn][:n]
        out.copy_(tokens[:n])  # graph outputs and freed eager outputs are overwritten by the next step
        if logprobs is not None:
            out_lp.copy_(logprobs[:n])
        self._computed[turn].record()
        host, host_lp = self._host[turn][:n], self._host_lp[turn][:n]
        with torch.cuda.stream(self._d2h):
            self._d2h.wait_event(self._computed[turn])
            host.copy_(out, non_blocking=True)
            if logprobs is not None:
                host_lp.copy_(out_lp, non_blocking=True)
            self._fetched[turn].record(self._d2h)
        return LaunchedStep(self._fetched[turn], host, None if logprobs is None else host_lp, graphed)
