"""Structured output: grammars from JSON schemas, regexes and choices, with xgrammar.

A request's grammar (`SamplingParams.grammar`) is compiled once per distinct source and cached; each
sequence under one gets its own matcher. Before a step samples, `fill_bitmask` writes each grammar
row's allowed tokens as a bitmask (bit t of row i set = token t allowed) on the host; the device
masks the logits with it (`sampling.apply_token_bitmask`) right before sampling. After the step,
`advance` feeds the sampled tokens to the matchers. The grammar's stop tokens are the engine's EOS
ids, so EOS is allowed only where the grammar may end.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import TYPE_CHECKING

from runner.engine.types import Grammar

if TYPE_CHECKING:  # the spec checks grammars with this module: it must not import torch
    import torch

    from runner.engine.sequence import Sequence

_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[13:53:20] /project/cpp/x.cc:94: " on every message


class GrammarError(ValueError):
    """A JSON schema, regex or choice list that cannot be compiled; the message says why."""


def _xgr():
    import xgrammar

    return xgrammar


def _ebnf_of_choice(choice: tuple[str, ...]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choice)


def _grammar(g: Grammar):
    """The tokenizer-independent xgrammar `Grammar` of `g`; raises GrammarError."""
    xgr = _xgr()
    kind, source = g
    try:
        if kind == "json_schema":
            # compact JSON: free whitespace lets a model pad its output with blanks up to the length limit
            return xgr.Grammar.from_json_schema(source, any_whitespace=False, separators=(",", ":"))
        if kind == "regex":
            return xgr.Grammar.from_regex(source)
        return xgr.Grammar.from_ebnf(_ebnf_of_choice(source))
    except RuntimeError as e:
        raise GrammarError(_XGR_PREFIX.sub("", str(e).strip().splitlines()[0])) from None


@functools.lru_cache(maxsize=256)
def check_grammar(g: Grammar) -> None:
    """Raise GrammarError if `g` cannot be compiled (no tokenizer needed; cached per source)."""
    if g[0] == "json_schema":
        try:
            json.loads(g[1])
        except ValueError as e:
            raise GrammarError(f"not valid JSON: {e}") from None
    if g[0] == "choice" and (not g[1] or any(not c for c in g[1])):
        raise GrammarError("give at least one non-empty choice")
    _grammar(g)


class Grammars:
    """The compiled grammars of one tokenizer (cached by source) and the per-step host work on matchers."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]) -> None:
        """`vocab_size`: the model's logits width (may exceed the tokenizer's); `eos_ids` end a grammar."""
        xgr = _xgr()
        threads = min(8, os.cpu_count() or 1)  # bitmasks of a step's rows are filled in parallel
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids)
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads)
        self._compiled: dict[Grammar, object] = {}
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self.words = -(-vocab_size // 32)  # int32 words per bitmask row

    def matcher(self, g: Grammar):
        """A fresh matcher for one sequence under `g` (compiled on first use); raises GrammarError."""
        compiled = self._compiled.get(g)
        if compiled is None:
            compiled = self._compiled[g] = self._compiler.compile_grammar(_grammar(g))
        return _xgr().GrammarMatcher(compiled)

    def fill_bitmask(self, seqs: list[Sequence], out: torch.Tensor) -> None:
        """Row i of `out` [>= len(seqs), words] int32: the tokens `seqs[i]` may sample next (all bits set for
        rows without a live grammar: no grammar, finished, or past the grammar's end)."""
        out.fill_(-1)
        rows = [i for i, s in enumerate(seqs) if _live(s)]
        if rows:
            self._batch.batch_fill_next_token_bitmask([seqs[i].matcher for i in rows], out, rows)

    @staticmethod
    def advance(seqs: list[Sequence], tokens: list[int]) -> None:
        """Feed each live grammar sequence its sampled token (before the stop check sees it)."""
        for seq, token in zip(seqs, tokens, strict=True):
            if _live(seq):
                accepted = seq.matcher.accept_token(token)
                assert accepted, f"token {token} sampled outside the grammar of {seq.request_id!r}"


def _live(seq: Sequence) -> bool:
    return seq.matcher is not None and seq.finish_reason is None and not seq.matcher.is_terminated()
