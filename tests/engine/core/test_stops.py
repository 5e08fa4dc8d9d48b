"""Stop checks on their own: EOS, stop ids, stop strings (text cut, tokens kept), length limits."""

from __future__ import annotations

from runner.engine.core.sequence import Sequence
from runner.engine.core.stops import StopChecker, find_stop
from runner.engine.types import SamplingParams

EOS = 2


class LetterTokenizer:
    """Token 26 + i decodes to the i-th letter; ids below 3 are special."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + (i - 26)) if i >= 26 else f"<{i}>" for i in ids
                       if not (skip_special_tokens and i < 3))  # fmt: skip


def ids(text: str) -> list[int]:
    return [26 + ord(c) - ord("a") for c in text]


def sequence(params: SamplingParams, prompt: list[int] | None = None) -> Sequence:
    prompt = prompt if prompt is not None else [5, 6, 7]
    return Sequence("r", 0, params, len(prompt), list(prompt), seed=0, order=0)


def feed(checker: StopChecker, seq: Sequence, tokens: list[int]) -> str | None:
    """Append `tokens` one at a time, as sampling does, checking after each; stops at the first finish."""
    for t in tokens:
        seq.tokens.append(t)
        reason = checker.check(seq)
        if reason is not None:
            return reason
    return None


def test_find_stop_takes_the_earliest_match():
    assert find_stop("hello world", ("world", "lo w", "xyz")) == 3
    assert find_stop("hello", ("xyz",)) is None
    assert find_stop("hello", ()) is None


def test_stop_string_ends_at_the_token_that_completes_it_and_cuts_the_text():
    checker = StopChecker(frozenset({EOS}), LetterTokenizer(), max_model_len=1000)
    seq = sequence(SamplingParams(max_new_tokens=50, stop=("fgh", "never")))
    assert feed(checker, seq, ids("abcdefghijkl")) == "stop"
    assert seq.generated == ids("abcdefgh")  # nothing after the token that completed "fgh"
    assert seq.stop_cut == 5 and checker.text(seq) == "abcde"


def test_the_earliest_stop_string_wins_even_when_another_completes_at_the_same_token():
    checker = StopChecker(frozenset(), LetterTokenizer(), max_model_len=1000)
    seq = sequence(SamplingParams(max_new_tokens=50, stop=("d", "bcd")))
    assert feed(checker, seq, ids("abcdef")) == "stop"
    assert seq.generated == ids("abcd") and checker.text(seq) == "a"


def test_eos_and_stop_ids_finish_with_the_token_kept():
    checker = StopChecker(frozenset({EOS}), None, max_model_len=1000)
    seq = sequence(SamplingParams(max_new_tokens=10))
    assert feed(checker, seq, [30, 31, EOS, 32]) == "stop" and seq.generated == [30, 31, EOS]
    seq = sequence(SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert feed(checker, seq, [30, EOS, 31]) is None  # ignore_eos: EOS is a token like any other
    seq = sequence(SamplingParams(max_new_tokens=10, ignore_eos=True, stop_token_ids=(31,)))
    assert feed(checker, seq, [30, EOS, 31, 32]) == "stop" and seq.generated == [30, EOS, 31]


def test_length_limits():
    checker = StopChecker(frozenset({EOS}), None, max_model_len=6)
    seq = sequence(SamplingParams(max_new_tokens=2))
    assert feed(checker, seq, [30, 31, 32]) == "length" and seq.generated == [30, 31]
    seq = sequence(SamplingParams(max_new_tokens=10))  # 3 prompt tokens: 3 more reach max_model_len
    assert feed(checker, seq, [30, 31, 32, 33]) == "length" and seq.generated == [30, 31, 32]


def test_at_length_counts_placeholders():
    checker = StopChecker(frozenset(), None, max_model_len=100)
    seq = sequence(SamplingParams(max_new_tokens=2))
    seq.tokens.append(30)
    assert not checker.at_length(seq)
    seq.num_pending = 1  # a second token sampled, not yet on the host
    assert checker.at_length(seq)
