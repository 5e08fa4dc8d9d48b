"""One sample of one request as the scheduler sees it: its tokens, its pages, how far it is computed."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.engine.types import FinishReason, SamplingParams


@dataclass(slots=True, eq=False)
class Sequence:
    """Prompt + generated tokens of one sample; `num_computed` of them have their K/V in the cache.

    A sequence computes its tokens from `num_computed` on (the prompt in chunks, then one token per
    decode step) and samples its next token when a step brings `num_computed` to `num_tokens`.
    The scheduler advances `num_computed` when it schedules a step, and a sampled token exists
    first as a placeholder (`num_pending`): its value is on the device, where the next step reads
    it, and joins `tokens` when the host has it. Preemption drops the pages and sets
    `num_computed` back to 0: the sequence is recomputed from its tokens later.
    """

    request_id: object
    sample_index: int
    params: SamplingParams
    prompt_len: int
    tokens: list[int]  # known tokens: the prompt, then the generated ones the host has seen
    seed: int
    order: int  # admission order of the request (smaller = older)
    pages: list[int] = field(default_factory=list)
    page_hashes: list[int] = field(default_factory=list)  # chained hashes of the registered full pages
    num_computed: int = 0
    num_pending: int = 0  # sampled tokens still on their way to the host (they follow `tokens`)
    slot: int = -1  # row in the page table and the device token buffer while running
    logprobs: list[float] | None = None
    siblings: list[Sequence] = field(
        default_factory=list
    )  # samples 1..n-1, admitted once the prompt is cached
    finish_reason: FinishReason | None = None
    stop_cut: int | None = None  # text offset of a matched stop string
    matcher: int | None = None  # its grammar matcher (a key in the grammar worker) until the grammar ends

    @property
    def num_tokens(self) -> int:
        return len(self.tokens) + self.num_pending

    @property
    def num_generated(self) -> int:
        return self.num_tokens - self.prompt_len

    @property
    def generated(self) -> list[int]:
        """The generated tokens the host knows."""
        return self.tokens[self.prompt_len :]

    @property
    def is_decoding(self) -> bool:
        """One token left to compute: the last sampled one."""
        num_tokens = len(self.tokens) + self.num_pending  # not the properties: the scheduler's hot loop
        return num_tokens - self.num_computed == 1 and num_tokens > self.prompt_len
