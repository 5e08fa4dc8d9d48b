"""The scheduler on its own (no model): step packing, placeholders, finishing and freeing, preemption order,
prefix reuse by the other samples of a request."""

from __future__ import annotations

from runner.engine.core.kv import KVManager
from runner.engine.core.scheduler import Scheduler
from runner.engine.core.sequence import Sequence
from runner.engine.core.stops import StopChecker
from runner.engine.types import SamplingParams

EOS = 2


def scheduler(num_pages: int, page_size: int = 4, max_batch_tokens: int = 64, max_seqs: int = 8) -> Scheduler:
    kv = KVManager(num_pages, page_size, max_seqs, max_pages=16)
    return Scheduler(kv, StopChecker(frozenset({EOS}), None, max_model_len=64), max_batch_tokens)


def sequence(order: int, prompt_len: int, max_new_tokens: int = 8, n: int = 1) -> Sequence:
    sp = SamplingParams(max_new_tokens=max_new_tokens, n=n, ignore_eos=True)
    prompt = [10 + (order * 7 + i) % 200 for i in range(prompt_len)]
    seqs = [Sequence(order, i, sp, prompt_len, list(prompt), seed=0, order=order) for i in range(n)]
    seqs[0].siblings = seqs[1:]
    return seqs[0]


def test_decodes_come_first_then_prefill_chunks_under_max_batch_tokens():
    sched = scheduler(num_pages=32, max_batch_tokens=16)
    a, b = sequence(0, 5), sequence(1, 30)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new == [5, 11] and batch.starts == [0, 0]
    assert batch.num_decodes == 0 and batch.sample_rows == [0]  # b's chunk ends before its last token
    assert a.num_pending == 1 and a.num_computed == 5 and b.num_computed == 11
    assert sched.postprocess(batch, [77], None) == []
    assert a.tokens[-1] == 77 and a.num_pending == 0
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new == [1, 15] and batch.num_decodes == 1
    assert batch.starts == [5, 11] and batch.sample_rows == [0]
    assert sched.stats.partial_prefill_chunks == 2


def test_the_next_step_is_scheduled_before_the_tokens_are_known():
    sched = scheduler(num_pages=8)
    a = sequence(0, 3, max_new_tokens=3)
    sched.add(a)
    first = sched.schedule()
    second = sched.schedule()  # a decodes its placeholder token (the device carries it over)
    assert second.seqs == [a] and second.starts == [3] and a.num_pending == 2
    third = sched.schedule()
    assert third.seqs == [a] and a.num_pending == 3
    assert sched.schedule().seqs == []  # at its length with placeholders: never scheduled again
    sched.postprocess(first, [40], None)
    sched.postprocess(second, [41], None)
    assert sched.postprocess(third, [42], None) == [a]
    assert a.generated == [40, 41, 42] and a.finish_reason == "length"


def test_finished_sequences_keep_their_pages_until_released():
    sched = scheduler(num_pages=8)
    a = sequence(0, 6, max_new_tokens=1)
    sched.add(a)
    batch = sched.schedule()
    assert sched.kv.num_used_pages == 2
    assert sched.postprocess(batch, [50], None) == [a]
    assert a.finish_reason == "length" and not sched.has_work()
    assert sched.kv.num_used_pages == 2 and sched.kv.num_free_slots == 7  # a step in flight may read them
    sched.release(a)
    assert sched.kv.num_used_pages == 0 and sched.kv.num_free_slots == 8
    assert a.pages == [] and a.slot == -1


def test_a_decode_out_of_pages_preempts_the_newest_unscheduled_sequence():
    sched = scheduler(num_pages=16, page_size=2)
    a, b, c = sequence(0, 2), sequence(1, 3), sequence(2, 3)
    for seq in (a, b, c):
        sched.add(seq)
    batch = sched.schedule()
    sched.postprocess(batch, [60, 61, 62], None)
    held = sched.kv.pool.allocate(sched.kv.num_free_pages)  # the pool runs dry
    batch = sched.schedule()  # a needs a third page, b and c still have room in their second
    assert batch.seqs == [a, b] and sched.stats.preemptions == 1
    assert list(sched.waiting) == [c] and sched.running == [a, b]
    assert c.pages == [] and c.slot == -1 and c.num_computed == 0
    assert len(a.pages) == 2  # the page c gave back
    sched.kv.pool.release(held)
    sched.postprocess(batch, [63, 64], None)
    batch = sched.schedule()  # c comes back: its cached first page reused, the rest recomputed
    assert c in batch.seqs and batch.num_new[batch.seqs.index(c)] == 2
    assert sched.stats.prefix_hit_tokens == 2


def test_a_prefill_listed_before_the_decode_that_preempts_it_is_not_scheduled():
    """Each running sequence is looked at once a step: one still prefilling is set aside for after the
    decodes, and a decode further down that runs out of pages may preempt it meanwhile."""
    sched = scheduler(num_pages=16, page_size=2, max_batch_tokens=4)
    late, early = sequence(5, 10), sequence(0, 2)
    sched.add(late)  # admitted first, so listed first, though the newer request
    sched.add(early)
    assert sched.schedule().seqs == [late]  # 4 of its 10 prompt tokens: max_batch_tokens is spent
    sched.max_batch_tokens = 8
    batch = sched.schedule()
    assert batch.seqs == [late, early] and batch.num_new == [6, 2]
    sched.postprocess(batch, [60, 61], None)
    late.num_computed = 4  # as if late's last chunk were still to come: it is prefilling again
    held = sched.kv.pool.allocate(sched.kv.num_free_pages)  # early's next token needs a page: none left
    batch = sched.schedule()
    assert batch.seqs == [early] and batch.num_decodes == 1
    assert list(sched.waiting) == [late] and late.pages == [] and sched.stats.preemptions == 1
    sched.kv.pool.release(held)


def test_a_sequence_preempts_itself_when_nothing_newer_can_go():
    sched = scheduler(num_pages=16, page_size=2)
    a, b = sequence(0, 3), sequence(1, 2)
    sched.add(a)
    sched.add(b)
    sched.postprocess(sched.schedule(), [60, 61], None)
    held = sched.kv.pool.allocate(sched.kv.num_free_pages)
    batch = sched.schedule()  # a is scheduled first; b, the newest, needs a page: none left, b goes
    assert batch.seqs == [a] and list(sched.waiting) == [b] and sched.stats.preemptions == 1
    sched.kv.pool.release(held)


def test_other_samples_start_once_the_prompt_is_cached_and_reuse_its_pages():
    sched = scheduler(num_pages=32)
    first = sequence(0, 10, n=3)
    sched.add(first)
    batch = sched.schedule()
    assert batch.seqs == [first]  # the siblings wait for the prompt's pages
    sched.postprocess(batch, [70], None)
    assert len(sched.waiting) == 2
    batch = sched.schedule()
    siblings = batch.seqs[1:]
    assert [s.sample_index for s in siblings] == [1, 2]
    assert batch.num_new == [1, 2, 2]  # 8 of the 10 prompt tokens found cached: 2 left each
    assert sched.stats.prefix_hit_tokens == 16
    assert all(s.pages[:2] == first.pages[:2] for s in siblings)


def test_admission_keeps_a_free_page_per_running_sequence():
    sched = scheduler(num_pages=6)
    a, b, c = sequence(0, 8), sequence(1, 8), sequence(2, 4)
    for seq in (a, b, c):
        sched.add(seq)
    batch = sched.schedule()
    # a takes 2 pages (4 left >= 0 running), b 2 more (2 left >= 1), c 1 more would leave 1 < 2
    assert batch.seqs == [a, b] and list(sched.waiting) == [c]
