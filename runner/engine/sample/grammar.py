"""Structured output: grammars from JSON schemas, regexes and choices, with xgrammar.

What a grammar source is (`types.Grammar`), how it becomes xgrammar's grammar, and the check of it
that needs no tokenizer (the spec runs it, without importing torch). The engine's matchers and
bitmasks are the grammar worker's (`sample/grammar_worker.py`).
"""

from __future__ import annotations

import functools
import json
import re

from runner.engine.types import Grammar

_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[13:53:20] /project/cpp/x.cc:94: " on every message


class GrammarError(ValueError):
    """A JSON schema, regex or choice list that cannot be compiled; the message says why."""


def _xgr():
    import xgrammar

    return xgrammar


def _ebnf_of_choice(choice: tuple[str, ...]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choice)


def xgrammar_grammar(g: Grammar):
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
    xgrammar_grammar(g)
