"""A scheduled batch as flat arrays: padded decode steps keep one layout per graph bucket."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runner.engine.core.kv import PageTable
from runner.engine.core.scheduler import ScheduledBatch
from runner.engine.core.sequence import Sequence
from runner.engine.types import SamplingParams
from runner.engine.worker.inputs import (
    PIECE_INPUTS,
    TABLE_UPDATES,
    SlotSampling,
    Staging,
    build_inputs,
    layout_of,
)


def _decode_batch(table: PageTable, lengths: list[int], page: int) -> ScheduledBatch:
    seqs = []
    for i, n in enumerate(lengths):
        seq = Sequence(i, 0, SamplingParams(), n - 1, list(range(3, 3 + n)), seed=i, order=i)
        seq.pages = list(range(10 * i, 10 * i + -(-n // page)))
        seq.slot = table.take(seq.pages)
        seqs.append(seq)
    return ScheduledBatch(seqs, [1] * len(seqs), [n - 1 for n in lengths], len(seqs), list(range(len(seqs))))


def _own_layout(inp):
    """The layout of a step's own arrays (a graph's static inputs), without the page-table entries."""
    return layout_of({name: a for name, a in inp.arrays.items() if name not in TABLE_UPDATES})


def test_padded_decode_inputs_have_one_layout_per_bucket():
    table = PageTable(8, 16)
    a = build_inputs(
        _decode_batch(table, [5, 17], 4),
        table,
        SlotSampling(8),
        4,
        400,
        pad_to=4,
        table_updates=table.drain(),
    )
    table = PageTable(8, 16)
    b = build_inputs(
        _decode_batch(table, [9, 2, 30], 4),
        table,
        SlotSampling(8),
        4,
        400,
        pad_to=4,
        table_updates=table.drain(),
    )
    assert _own_layout(a) == _own_layout(b)
    assert list(a.arrays)[-2:] == list(TABLE_UPDATES)
    assert a.num_samples == 2 and b.num_samples == 3 and a.num_decodes == 4
    x = a.arrays
    assert x["row_slot"].tolist() == [0, 1, 8, 8]  # padding rows use the spare slot
    assert x["kv_lens"].tolist() == [5, 17, 0, 0]  # ... attend to nothing
    assert x["slot_mapping"].tolist() == [1 * 4 + 0, 14 * 4 + 0, 400, 400]  # ... and write to the spare page
    assert x["ids"].tolist() == [7, 19, 0, 0]  # known last tokens; the device carries over the others
    # the pages the table got since the last step: a's two rows (slot 0: 2 pages, slot 1: 5), as flat
    # indices into the [9, 16] table
    assert x["table_index"].tolist() == [0, 1, 16, 17, 18, 19, 20]
    assert x["table_page"].tolist() == [0, 1, 10, 11, 12, 13, 14]
    assert x["position"].tolist() == [1, 1, 0, 0]


def test_a_step_carries_the_page_table_entries_written_since_the_step_before():
    table, sampling = PageTable(8, 16), SlotSampling(8)
    batch = _decode_batch(table, [5, 17], 4)
    first = build_inputs(batch, table, sampling, 4, 400, table_updates=table.drain())
    assert first.num_table_updates == 7  # the two rows taken: 2 + 5 pages
    assert build_inputs(batch, table, sampling, 4, 400, table_updates=table.drain()).num_table_updates == 0
    table.set_page(1, 5, 15)  # slot 1 grows a page
    third = build_inputs(batch, table, sampling, 4, 400, table_updates=table.drain())
    assert third.arrays["table_index"].tolist() == [1 * 16 + 5]
    assert third.arrays["table_page"].tolist() == [15]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grown_staging_buffer_is_not_overwritten_by_the_step_in_flight():
    """A grown device buffer may reuse memory that a queued kernel still writes (the async engine's
    step in flight): the copy of the next step's inputs must land after that kernel, not before."""
    staging = Staging(torch.device("cuda"))
    arrays = {"ids": np.arange(4096, dtype=np.int64)}
    busy = torch.empty(4096, dtype=torch.int64, device="cuda")  # the size the staging buffer will take
    torch.cuda._sleep(200_000_000)  # the step in flight: ~0.1 s of queued work ...
    busy.fill_(-7)  # ... that ends writing its activations
    del busy  # freed on the compute stream while the kernels above are still queued
    dev, _ = staging.pack(arrays)
    torch.cuda.synchronize()
    assert dev.cpu().tolist() == list(range(4096))


def test_a_reused_slot_samples_with_its_new_sequences_parameters():
    table, sampling = PageTable(4, 16), SlotSampling(4)
    hot = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, logprobs=True)
    first = Sequence("a", 1, hot, 3, [3, 4, 5, 6], seed=11, order=0, pages=[0], slot=table.take([0]))
    x = build_inputs(ScheduledBatch([first], [1], [3], 1, [0]), table, sampling, 4, 400)
    assert not x.all_greedy and x.want_logprobs
    arrays = {k: x.arrays[k].tolist() for k in ("top_k", "seed", "sample_index", "position")}
    assert arrays == {"top_k": [5], "seed": [11], "sample_index": [1], "position": [1]}
    assert x.arrays["temperature"].tolist() == pytest.approx([0.7]) and x.arrays[
        "min_p"
    ].tolist() == pytest.approx([0.1])
    table.give_back(first.slot)
    second = Sequence("b", 0, SamplingParams(), 2, [7, 8], seed=22, order=1, pages=[1], slot=table.take([1]))
    assert second.slot == first.slot
    x = build_inputs(ScheduledBatch([second], [2], [0], 0, [0]), table, sampling, 4, 400)
    assert x.all_greedy and not x.want_logprobs
    assert x.arrays["seed"].tolist() == [22] and x.arrays["top_p"].tolist() == [1.0]
    assert x.arrays["position"].tolist() == [0]  # its first generated token


def test_the_device_page_table_mirrors_the_host_one_through_preemptions_and_prefix_hits():
    """Every page-table write reaches the runner's device copy (here a CPU tensor), in the step that
    needs it: after each step the two tables are equal, with slots reused, pages grown, sequences
    preempted and readmitted, and cached prefix pages taken by new sequences."""
    from runner.engine import Engine, EngineConfig, Request
    from tests.engine.conftest import random_prompts, tiny_model

    config = EngineConfig(device="cpu", kv_cache_tokens=160, page_size=8, max_batch_tokens=24, max_seqs=8)
    engine = Engine(tiny_model("llama"), config)
    prompts = random_prompts(8, 9, 30)
    prompts += [p[:24] + [5, 6] for p in prompts[:4] if len(p) >= 24]  # their first 3 pages are cached
    for i, p in enumerate(prompts):
        engine.add(Request(i, p, SamplingParams(max_new_tokens=12, ignore_eos=True)))
    host, device = engine.kv.table.rows, engine.model_runner.page_table
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert torch.equal(device, torch.from_numpy(host)), f"step {steps}"
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_hit_tokens"] > 0, stats


def test_a_piece_graphed_step_pads_its_token_arrays_and_lays_them_out_first():
    """A mixed step for piece graphs: two decodes (one whose last token only the device has) and a
    prefill chunk of 3 tokens, padded to 8 tokens and 4 logits rows."""
    table = PageTable(8, 16)
    batch = _decode_batch(table, [5, 9], 4)
    batch.seqs[1].tokens.pop()  # sampled by the step in flight: the device carries it over
    chunk = Sequence(2, 0, SamplingParams(), 3, [20, 21, 22], seed=2, order=2)
    chunk.pages = [30]
    chunk.slot = table.take(chunk.pages)
    batch = ScheduledBatch([*batch.seqs, chunk], [1, 1, 3], [4, 8, 0], 2, [0, 1, 2])
    x = build_inputs(batch, table, SlotSampling(8), 4, 400, pad_tokens=(8, 4)).arrays
    assert list(x)[: len(PIECE_INPUTS)] == list(PIECE_INPUTS)
    assert x["ids"].tolist() == [7, -1, 20, 21, 22, 0, 0, 0]
    assert x["positions"].tolist() == [4, 8, 0, 1, 2, 0, 0, 0]
    assert x["slot_mapping"].tolist() == [1 * 4 + 0, 12 * 4 + 0, 120, 121, 122, 400, 400, 400]
    assert x["carry_slot"].tolist() == [0, 1] + [8] * 6  # the decodes' slots; the spare slot elsewhere
    assert x["logits_rows"].tolist() == [0, 1, 4, 0]  # each sequence's last token, then row 0
    assert x["sample_slot"].tolist() == [0, 1, 2]  # sampling takes the real rows only
    with pytest.raises(AssertionError):
        build_inputs(batch, table, SlotSampling(8), 4, 400, pad_tokens=(4, 4))
