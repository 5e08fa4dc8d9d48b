"""When a sequence is done: EOS, stop token ids, stop strings (on decoded text), length limits."""

from __future__ import annotations

from runner.engine.core.sequence import Sequence
from runner.engine.types import FinishReason


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index in `text` of the earliest stop string it contains (the text is cut there), or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


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
        if params.stop and self._tail_has_stop(seq):
            cut = find_stop(self.text(seq), params.stop)
            if cut is not None:
                seq.stop_cut = cut
                return "stop"
        if len(seq.tokens) - seq.prompt_len >= params.max_new_tokens or len(seq.tokens) >= self.max_model_len:
            return "length"
        return None

    def _tail_has_stop(self, seq: Sequence) -> bool:
        """Whether a stop string shows in the text of the last few generated tokens.

        A stop string first appears at the end of the text, within its own length in tokens (up to
        four byte-level tokens a character, plus skipped specials), so decoding that tail each step
        is enough to notice it; the whole text is decoded only on a hit, to place the cut. Without
        this a sequence would decode its whole text every step.
        """
        window = 4 * max(map(len, seq.params.stop)) + 8
        tail = self.tokenizer.decode(seq.generated[-window:], skip_special_tokens=True)
        return any(s in tail for s in seq.params.stop)

    def at_length(self, seq: Sequence) -> bool:
        """Whether `seq`, placeholders counted, has all the tokens it may have (no further step needed)."""
        num_tokens = len(seq.tokens) + seq.num_pending  # not the properties: the scheduler's hot loop
        return num_tokens - seq.prompt_len >= seq.params.max_new_tokens or num_tokens >= self.max_model_len

    def text(self, seq: Sequence) -> str:
        """The decoded generated text, cut before a matched stop string; at a length limit, without the
        bytes of a character the limit cut in two (decoded as U+FFFD)."""
        assert self.tokenizer is not None
        if seq.finish_reason == "length":
            return whole_characters(self.tokenizer, seq.generated)
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        return text if seq.stop_cut is None else text[: seq.stop_cut]


def whole_characters(tokenizer, ids: list[int]) -> str:
    """`ids` decoded, holding back the last tokens (up to 3) while the text ends in U+FFFD: a byte-level
    tokenizer spreads a character over up to 4 tokens, and a length limit may fall inside one (as a
    streaming detokenizer does, a U+FFFD the model meant to write at the very end is held back too)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    held = 0
    while text.endswith("\ufffd") and held < min(3, len(ids)):
        held += 1
        text = tokenizer.decode(ids[:-held], skip_special_tokens=True)
    return text if not text.endswith("\ufffd") else tokenizer.decode(ids, skip_special_tokens=True)
