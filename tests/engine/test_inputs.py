"""A scheduled batch as flat arrays: padded decode steps keep one layout per graph bucket."""

from __future__ import annotations

from runner.engine.inputs import build_inputs, layout_of
from runner.engine.kv import PageTable
from runner.engine.scheduler import ScheduledBatch
from runner.engine.sequence import Sequence
from runner.engine.types import SamplingParams


def _decode_batch(table: PageTable, lengths: list[int], page: int) -> ScheduledBatch:
    seqs = []
    for i, n in enumerate(lengths):
        seq = Sequence(i, 0, SamplingParams(), n - 1, list(range(3, 3 + n)), seed=i, order=i)
        seq.pages = list(range(10 * i, 10 * i + -(-n // page)))
        seq.slot = table.take(seq.pages)
        seqs.append(seq)
    return ScheduledBatch(seqs, [1] * len(seqs), [n - 1 for n in lengths], len(seqs), list(range(len(seqs))))


def test_padded_decode_inputs_have_one_layout_per_bucket():
    table = PageTable(8, 16)
    a = build_inputs(_decode_batch(table, [5, 17], 4), table, 4, spare_kv=400, pad_to=4, width=8)
    table = PageTable(8, 16)
    b = build_inputs(_decode_batch(table, [9, 2, 30], 4), table, 4, spare_kv=400, pad_to=4, width=8)
    assert layout_of(a.arrays) == layout_of(b.arrays)
    assert a.num_samples == 2 and b.num_samples == 3 and a.num_decodes == 4
    x = a.arrays
    assert x["row_slot"].tolist() == [0, 1, 8, 8]  # padding rows use the spare slot
    assert x["kv_lens"].tolist() == [5, 17, 0, 0]  # ... attend to nothing
    assert x["slot_mapping"].tolist() == [1 * 4 + 0, 14 * 4 + 0, 400, 400]  # ... and write to the spare page
    assert x["ids"].tolist() == [7, 19, 0, 0]  # known last tokens; the device carries over the others
    assert x["table"].shape == (4, 8) and x["table"][1, :5].tolist() == [10, 11, 12, 13, 14]
    assert x["position"].tolist() == [1, 1, 0, 0]
