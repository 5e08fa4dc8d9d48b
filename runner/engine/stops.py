"""When a sequence is done: EOS, stop token ids, stop strings (on decoded text), length limits."""

from __future__ import annotations

from runner.engine.sequence import Sequence
from runner.engine.types import FinishReason


class StopChecker:
    """Decides after each sampled token whether a sequence finished, and renders its text."""

    def __init__(self, eos_ids: frozenset[int], tokenizer: object | None, max_model_len: int) -> None:
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def check(self, seq: Sequence) -> FinishReason | None:
        """The finish reason if `seq`'s last known token ends it, else None (may set `stop_cut`)."""
        params = seq.params
        last = seq.tokens[-1]
        if last in params.stop_token_ids or (not params.ignore_eos and last in self.eos_ids):
            return "stop"
        if params.stop:
            text = self.text(seq)
            hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
            if hits:
                seq.stop_cut = min(hits)
                return "stop"
        if len(seq.tokens) - seq.prompt_len >= params.max_new_tokens or len(seq.tokens) >= self.max_model_len:
            return "length"
        return None

    def at_length(self, seq: Sequence) -> bool:
        """Whether `seq`, placeholders counted, has all the tokens it may have (no further step needed)."""
        return seq.num_generated >= seq.params.max_new_tokens or seq.num_tokens >= self.max_model_len

    def text(self, seq: Sequence) -> str:
        """The decoded generated text, cut before a matched stop string."""
        assert self.tokenizer is not None
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        return text if seq.stop_cut is None else text[: seq.stop_cut]
