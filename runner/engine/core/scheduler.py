"""Continuous-batching scheduler: which sequences compute how many tokens in the next forward.

Each step packs, under `max_batch_tokens` and `max_seqs`: first one token for every decoding
sequence, then the next prompt chunk of sequences still prefilling, then newly admitted ones.
When a decode needs a page and none is free, the newest running sequence is preempted (its pages
dropped, recomputed later). A waiting sequence is admitted only when its whole prompt fits and one
page per running sequence stays free for decode growth, so admissions do not thrash the pool.

Scheduling commits the step at once (`num_computed` advances, a sampled token becomes a
placeholder), so the next step can be scheduled before this one's tokens reach the host
(`postprocess`). A sequence that already has all the tokens it may have is not scheduled again; one
that finishes on a sampled token (EOS, stop) may have one wasted row in the step after.

This is policy only: the KV manager (kv/) does the page and page-table bookkeeping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runner.engine.core.kv import KVManager
from runner.engine.core.sequence import Sequence
from runner.engine.core.stops import StopChecker


@dataclass(slots=True)
class ScheduledBatch:
    """One forward: `seqs[i]` computes `num_new[i]` tokens from position `starts[i]`; decodes come first."""

    seqs: list[Sequence]
    num_new: list[int]
    starts: list[int]
    num_decodes: int
    sample_rows: list[int]  # indices into seqs of those whose step ends at their last token


@dataclass(slots=True)
class SchedulerStats:
    """Plain counters, exposed through `Engine.stats()`."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_chunks: int = 0
    partial_prefill_chunks: int = 0  # chunks that stopped before the end of the prompt
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    max_running: int = 0
    kv_pages_used_peak: int = 0


@dataclass(slots=True)
class Scheduler:
    """Waiting and running queues; pages and slots through the `KVManager`."""

    kv: KVManager
    stops: StopChecker
    max_batch_tokens: int
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    stats: SchedulerStats = field(default_factory=SchedulerStats)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Pick the next forward's sequences and token counts, allocating their pages; commits them."""
        batch = ScheduledBatch([], [], [], 0, [])
        prefilling = self._put_decodes(batch)
        tokens_left = self.max_batch_tokens - batch.num_decodes
        for seq in prefilling:
            if tokens_left == 0:
                break
            if seq.pages:  # not preempted by a decode after it
                tokens_left -= self._put(batch, seq, min(seq.num_tokens - seq.num_computed, tokens_left))
        while self.waiting and tokens_left > 0 and self._admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self.running.append(seq)
            tokens_left -= self._put(batch, seq, min(seq.num_tokens - seq.num_computed, tokens_left))
        if batch.seqs:
            st = self.stats
            st.steps += 1
            st.max_running = max(st.max_running, len(self.running))
            st.kv_pages_used_peak = max(st.kv_pages_used_peak, self.kv.num_used_pages)
        return batch

    def postprocess(
        self, batch: ScheduledBatch, tokens: list[int], logprobs: list[float] | None
    ) -> list[Sequence]:
        """Take a finished forward's sampled tokens; returns the sequences that finished.

        Finished sequences leave the queues but keep their pages and slot until `release`
        (a step already in flight may still use them).
        """
        finished = []
        for j, row in enumerate(batch.sample_rows):
            seq = batch.seqs[row]
            if seq.finish_reason is not None:
                continue  # finished on an earlier step: this row was wasted
            seq.num_pending -= 1
            seq.tokens.append(tokens[j])
            if logprobs is not None and seq.logprobs is not None:
                seq.logprobs.append(logprobs[j])
            seq.finish_reason = self.stops.check(seq)
            if seq.finish_reason is not None:
                seq.num_pending = 0
                if seq.slot >= 0:
                    self.running.remove(seq)
                else:  # preempted while its token was on the way
                    self.waiting.remove(seq)
                finished.append(seq)
        self.kv.cache_full_pages(batch.seqs)
        for seq in batch.seqs[batch.num_decodes :]:  # a decode's prompt is computed: its siblings went
            if seq.siblings and seq.num_computed >= seq.prompt_len:
                self.waiting.extendleft(reversed(seq.siblings))  # they find the prompt's pages cached
                seq.siblings = []
        return finished

    def release(self, seq: Sequence) -> None:
        """Free a finished sequence's pages and slot (once no step in flight uses them)."""
        self.kv.free(seq)

    def _put_decodes(self, batch: ScheduledBatch) -> list[Sequence]:
        """Put the next token of every decoding sequence in `batch` (up to `max_batch_tokens`), giving it a
        page where it needs one; returns the running sequences still prefilling, in order.

        This runs for every running sequence at every step: each is looked at once, and a decode is
        put without `_put`'s general accounting (its one token is always a sample row).
        """
        at_length = self.stops.at_length
        seqs, num_new, starts, sample_rows = batch.seqs, batch.num_new, batch.starts, batch.sample_rows
        prefilling = []
        for seq in list(self.running):
            if len(seqs) == self.max_batch_tokens:
                break
            if not seq.pages:
                continue  # preempted by an earlier decode of this step
            if not seq.is_decoding:
                prefilling.append(seq)
            elif not at_length(seq) and self._grow(seq, batch):
                sample_rows.append(len(seqs))
                seqs.append(seq)
                num_new.append(1)
                starts.append(seq.num_computed)
                seq.num_computed += 1
                seq.num_pending += 1
        batch.num_decodes = len(seqs)
        self.stats.decode_tokens += len(seqs)
        return prefilling

    def _put(self, batch: ScheduledBatch, seq: Sequence, n: int) -> int:
        assert n > 0
        st = self.stats
        if seq.is_decoding:
            st.decode_tokens += n
        else:
            st.prefill_tokens += n
            st.prefill_chunks += 1
            st.partial_prefill_chunks += seq.num_computed + n < seq.num_tokens
        if seq.num_computed + n == seq.num_tokens:
            batch.sample_rows.append(len(batch.seqs))
            seq.num_pending += 1
        batch.seqs.append(seq)
        batch.num_new.append(n)
        batch.starts.append(seq.num_computed)
        seq.num_computed += n
        return n

    def _grow(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        """Give `seq` a page for one more token, preempting newer sequences; False if `seq` itself went."""
        if not self.kv.needs_page(seq):
            return True
        while self.kv.num_free_pages == 0:
            scheduled = {id(s) for s in batch.seqs}
            victims = [s for s in self.running if s is not seq and id(s) not in scheduled]
            victim = max(victims, key=lambda s: (s.order, s.sample_index)) if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        self.kv.grow(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _admit(self, seq: Sequence) -> bool:
        """Give `seq` pages for its whole prompt if one free page per running sequence stays."""
        if seq.num_pending:
            return False  # preempted while a token was on the way: recompute once it is known
        if not self.kv.admit(seq, keep_free=len(self.running)):
            return False
        self.stats.prefix_hit_tokens += seq.num_computed
        return True
