"""A scheduled batch as flat arrays (numpy, no per-token Python), and their one copy to the device.

`build_inputs` lays a step out as named int64 arrays (float arrays ride in int64 words); a decode
step padded to a graph bucket has the same layout whatever its contents, so a CUDA graph can read
its inputs from one static buffer. The page-table entries written since the step before travel with
the step, packed after its own arrays (`TABLE_UPDATES`): the device applies them before the step.
`Staging` packs the arrays into pinned host memory (two buffers, used in turn) and copies them to the
device on a copy stream in one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runner.engine.core.kv import PageTable
from runner.engine.core.scheduler import ScheduledBatch
from runner.engine.core.sequence import Sequence
from runner.engine.layers.attention.torch import decode_order, prefill_blocks
from runner.engine.sample.sampler import PER_SEQUENCE, ROW_PARAMS

TABLE_UPDATES = ("table_index", "table_page")  # PageTable.drain's arrays, packed last
# a piece-graphed step's arrays that its graphs read, packed first (`build_inputs`' pad_tokens)
PIECE_INPUTS = ("ids", "positions", "slot_mapping", "carry_slot", "logits_rows")


@dataclass(slots=True)
class StepInputs:
    """One step on the host: named arrays in packing order, and what the host must know of it."""

    arrays: dict[str, np.ndarray]  # the step's own arrays, then TABLE_UPDATES (a launched step)
    num_decodes: int
    num_samples: int  # real sample rows (the arrays may hold padding rows after them)
    all_greedy: bool
    want_logprobs: bool

    @property
    def num_table_updates(self) -> int:
        """Page-table entries the step carries."""
        return self.arrays[TABLE_UPDATES[0]].size


class SlotSampling:
    """Each slot's sampling parameters as arrays [slots + 1], so that a step gathers its sample rows'
    parameters by slot instead of reading them off every sequence (a W0 decode step samples 512 rows).

    A slot's row is written when a step first has a sequence in it (`update`); row `num_slots`, the
    padding rows' slot, keeps neutral values: greedy, no logprobs, position 0.
    """

    def __init__(self, num_slots: int) -> None:
        n = num_slots + 1
        self._owner: list[Sequence | None] = [None] * n
        self.prompt_len = np.zeros(n, dtype=np.int64)
        self.params = {
            name: np.full(n, neutral, dtype=dtype) for name, (dtype, neutral) in ROW_PARAMS.items()
        }
        self.logprobs = np.zeros(n, dtype=bool)

    def update(self, seqs: list[Sequence]) -> None:
        """Write the rows of the slots whose sequence changed since they were last written."""
        owner = self._owner
        for seq in seqs:
            if owner[seq.slot] is not seq:
                owner[seq.slot] = seq
                self._write(seq)

    def _write(self, seq: Sequence) -> None:
        i, p = seq.slot, seq.params
        self.prompt_len[i] = seq.prompt_len
        for name, column in self.params.items():
            column[i] = getattr(seq if name in PER_SEQUENCE else p, name)
        self.logprobs[i] = p.logprobs


def build_inputs(
    batch: ScheduledBatch,
    table: PageTable,
    sampling: SlotSampling,
    page_size: int,
    spare_kv: int,
    pad_to: int = 0,
    table_updates: tuple[np.ndarray, np.ndarray] | None = None,
    pad_tokens: tuple[int, int] | None = None,
) -> StepInputs:
    """Flat inputs of `batch`. `pad_to` > 0 (decode-only batches) pads the rows to that many with rows
    that attend to nothing, use the spare slot and write their K/V to cache slot `spare_kv`.
    `pad_tokens` = (tokens, sample rows): a step run from piece graphs (`worker/piece_graphs.py`) pads its
    token-level arrays (id 0, position 0, cache slot `spare_kv`) and its logits rows (row 0) to those
    sizes, and adds `carry_slot` [tokens]: the token-buffer slot each decode takes its input from (the
    spare slot for the other tokens). Those arrays come first in the layout (`PIECE_INPUTS`).
    `table_updates`: the page-table entries written since the last step (`PageTable.drain`), packed
    last as `TABLE_UPDATES` (a launched step carries them; a graph's padding inputs do not).
    `sampling` is brought up to date with `batch`'s slots."""
    seqs = batch.seqs
    nd = batch.num_decodes
    q_lens = np.array(batch.num_new, dtype=np.int64)  # [B]
    starts = np.array(batch.starts, dtype=np.int64)
    row_slot = np.array([s.slot for s in seqs], dtype=np.int64)
    kv_lens = starts + q_lens
    num_rows = len(seqs)
    if pad_to:
        assert nd == num_rows <= pad_to
        extra = pad_to - num_rows
        q_lens = np.concatenate((q_lens, np.ones(extra, np.int64)))
        starts = np.concatenate((starts, np.zeros(extra, np.int64)))
        kv_lens = np.concatenate((kv_lens, np.zeros(extra, np.int64)))
        row_slot = np.concatenate((row_slot, np.full(extra, table.pad_slot, np.int64)))
        nd = num_rows = pad_to
    cu = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    num_tokens = int(cu[-1])
    tok_row = np.repeat(np.arange(num_rows), q_lens)  # [T]
    positions = starts[tok_row] + np.arange(num_tokens) - cu[tok_row]
    slot_mapping = table.rows[row_slot[tok_row], positions // page_size] * page_size + positions % page_size
    if pad_to:
        slot_mapping[len(seqs) :] = spare_kv
    # a decode's input is its last sampled token: -1 when the host does not have it yet (the device
    # then takes it from its token buffer), e.g. when the step before sampled it
    ids = [s.tokens[st] if st < len(s.tokens) else -1 for s, st in zip(seqs[:nd], batch.starts, strict=False)]
    ids += [0] * (num_rows - len(seqs))
    for s, st, n in zip(seqs[nd:], batch.starts[nd:], batch.num_new[nd:], strict=True):
        ids += s.tokens[st : st + n]  # a prefill chunk
    assert len(ids) == num_tokens, "a prefill chunk reached a token the host does not know yet"
    block_seq, block_start = prefill_blocks(q_lens[nd:], kv_lens[nd:], nd)

    sampling.update(seqs)
    sample_rows = np.array(batch.sample_rows + list(range(len(seqs), num_rows)), dtype=np.int64)  # + padding
    sample_slot = row_slot[sample_rows]
    row_params = {name: column[sample_slot] for name, column in sampling.params.items()}
    temperature = row_params["temperature"]
    tokens = {
        "ids": np.array(ids, dtype=np.int64),
        "positions": positions,
        "slot_mapping": slot_mapping,
        "logits_rows": cu[sample_rows + 1] - 1,
    }
    if pad_tokens is not None:
        tokens = _pad_tokens(tokens, row_slot[:nd], table.pad_slot, spare_kv, *pad_tokens)
    arrays = {
        **tokens,
        "cu": cu,
        "kv_lens": kv_lens,
        "row_slot": row_slot,
        "decode_seq": decode_order(kv_lens[:nd]),
        "block_seq": block_seq,
        "block_start": block_start,
        "sample_slot": sample_slot,
        **row_params,
        # index of the drawn token among the generated ones
        "position": kv_lens[sample_rows] - sampling.prompt_len[sample_slot],
    }
    if table_updates is not None:
        arrays.update(zip(TABLE_UPDATES, table_updates, strict=True))
    return StepInputs(
        arrays=arrays,
        num_decodes=nd,
        num_samples=len(batch.sample_rows),
        all_greedy=not temperature.any(),
        want_logprobs=bool(sampling.logprobs[sample_slot].any()),
    )


def _pad_tokens(
    tokens: dict[str, np.ndarray],
    decode_slots: np.ndarray,
    pad_slot: int,
    spare_kv: int,
    width: int,
    rows: int,
) -> dict[str, np.ndarray]:
    """`tokens`' arrays padded to `width` tokens and `rows` logits rows, with `carry_slot` (build_inputs)."""
    n, s = tokens["ids"].size, tokens["logits_rows"].size
    assert n <= width and s <= rows, (n, width, s, rows)
    out = {name: np.zeros(width, dtype=np.int64) for name in PIECE_INPUTS[:4]}
    for name in PIECE_INPUTS[:3]:
        out[name][:n] = tokens[name]
    out["slot_mapping"][n:] = spare_kv
    out["carry_slot"][:] = pad_slot
    out["carry_slot"][: decode_slots.size] = decode_slots
    out["logits_rows"] = np.zeros(rows, dtype=np.int64)
    out["logits_rows"][:s] = tokens["logits_rows"]
    return out


def _words(a: np.ndarray) -> int:
    """int64 words that `a` takes in the packed buffer."""
    return a.size if a.dtype == np.int64 else -(-a.size // 2)


Layout = tuple[tuple[str, int, tuple[int, ...], bool], ...]  # (name, offset, shape, is_float)


def layout_of(arrays: dict[str, np.ndarray]) -> Layout:
    """Where each array goes in the packed buffer: every one starts 16-byte aligned, so the kernels
    see the same pointer alignment whatever the step (Triton compiles one variant per alignment)."""
    out, off = [], 0
    for name, a in arrays.items():
        assert a.dtype in (np.int64, np.float32), (name, a.dtype)
        out.append((name, off, a.shape, a.dtype == np.float32))
        off += _words(a) + _words(a) % 2
    return tuple(out)


def layout_words(layout: Layout) -> int:
    name, off, shape, is_float = layout[-1]
    n = int(np.prod(shape))
    return off + (-(-n // 2) if is_float else n)


def fill(host: np.ndarray, layout: Layout, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` into the int64 buffer `host` at their layout offsets."""
    for (_, off, _, is_float), a in zip(layout, arrays.values(), strict=True):
        if is_float:
            host[off : off + _words(a)].view(np.float32)[: a.size] = a.ravel()
        else:
            host[off : off + a.size] = a.ravel()


def unpack(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Views of the packed int64 buffer `flat`, one per array."""
    views = {}
    for name, off, shape, is_float in layout:
        n = int(np.prod(shape))
        if is_float:
            views[name] = flat[off : off + -(-n // 2)].view(torch.float32)[:n].view(shape)
        else:
            views[name] = flat[off : off + n].view(shape)
    return views


class Staging:
    """Two pinned host buffers and their device twins, used in turn; one host-to-device copy a step.

    On CUDA the copy runs on its own stream and the compute stream waits for it with an event. A
    buffer is reused two steps later, when the step that used it has completed (the engine waits
    for each step before launching the one after next).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._host: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)] * 2
        self._dev: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64, device=device)] * 2
        self._turn = 0
        if self.cuda:
            self._stream = torch.cuda.Stream(device)
            self._copied = [torch.cuda.Event(), torch.cuda.Event()]

    def pack(self, arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, Layout]:
        """Copy `arrays` to the device; returns the packed device buffer [words] and its layout."""
        layout = layout_of(arrays)
        words = layout_words(layout)
        turn = self._turn
        self._turn ^= 1
        grown = self._host[turn].numel() < words
        if grown:
            size = max(words, 2 * self._host[turn].numel())
            self._host[turn] = torch.empty(size, dtype=torch.int64, pin_memory=self.cuda)
            if self.cuda:
                self._dev[turn] = torch.empty(size, dtype=torch.int64, device=self.device)
        fill(self._host[turn].numpy(), layout, arrays)
        if not self.cuda:
            return self._host[turn][:words], layout
        dev = self._dev[turn][:words]
        compute = torch.cuda.current_stream(self.device)
        if grown:
            # the allocator may hand the new buffer memory that kernels still queued on the compute
            # stream (the step in flight) use: the copy stream must not write it before they ran
            self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            dev.copy_(self._host[turn][:words], non_blocking=True)
            self._copied[turn].record(self._stream)
        compute.wait_event(self._copied[turn])
        return dev, layout
