"""One sample of one request as the scheduler sees it: its tokens, its pages, how far it is computed."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.engine.types import FinishReason, SamplingParams


@dataclass(slots=True, eq=False)
class Sequence:
    """Prompt + generated tokens of one sample; `num_computed` of them have their K/V in the cache.

    A sequence computes `tokens[num_computed:]` (the prompt in chunks, then one token per decode
    step) and samples its next token when a step brings `num_computed` to `len(tokens)`. Preemption
    drops its pages and sets `num_computed` back to 0: it is recomputed from its tokens later.
    """

    request_id: object
    sample_index: int
    params: SamplingParams
    prompt_len: int
    tokens: list[int]
    seed: int
    order: int  # admission order of the request (smaller = older)
    pages: list[int] = field(default_factory=list)
    page_hashes: list[int] = field(default_factory=list)  # chained hashes of the registered full pages
    num_computed: int = 0
    logprobs: list[float] | None = None
    siblings: list[Sequence] = field(
        default_factory=list
    )  # samples 1..n-1, admitted once the prompt is cached
    finish_reason: FinishReason | None = None
    stop_cut: int | None = None  # text offset of a matched stop string

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def is_decoding(self) -> bool:
        """One token left to compute: the last sampled one."""
        return self.num_tokens - self.num_computed == 1 and self.num_generated > 0
