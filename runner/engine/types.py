"""Plain values that cross the engine boundary: what to generate, how, and what came out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How one request samples. `temperature == 0` means greedy (top-k/top-p/min-p then ignored)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    seed: int | None = None  # same seed + same prompt -> same tokens, whatever else is in the batch
    stop_token_ids: tuple[int, ...] = ()  # finish when one is sampled (it is kept in token_ids)
    stop: tuple[str, ...] = ()  # finish when the decoded text contains one (text is cut before it)
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    n: int = 1  # samples per prompt, sharing the prompt's KV pages
    logprobs: bool = False  # return the log-probability of each sampled token

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class Request:
    """One prompt to complete. `id` is the caller's key, echoed in every Completion."""

    id: object
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(slots=True)
class Completion:
    """One finished sample of a request (a request with `n` samples yields n Completions)."""

    id: object
    token_ids: list[int]  # generated tokens; on a stop string, those up to the stop are kept
    finish_reason: FinishReason
    prompt_tokens: int
    text: str | None = None  # decoded generated text (cut before a stop string) when a tokenizer is known
    sample_index: int = 0
    logprobs: list[float] | None = None

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)
