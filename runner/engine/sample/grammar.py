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
# The characters xgrammar 0.2 lets into a JSON string, as EBNF text: one class for strings with minLength or
# maxLength (no escapes there), one for the others. The first takes raw control characters, which JSON
# forbids (RFC 8259, section 7); both take the UTF-8 bytes of a surrogate (U+D800-U+DFFF), which is not
# UTF-8 at all: decoded, each of its three bytes becomes a U+FFFD, past a maxLength the grammar counted.
_STRING_CHARS = (r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")
_STRICT_STRING_CHAR = r"[^\0-\x1f\"\\\uD800-\uDFFF]"


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
            grammar = xgr.Grammar.from_json_schema(source, any_whitespace=False, separators=(",", ":"))
            return _strict_strings(xgr, grammar)
        if kind == "regex":
            return xgr.Grammar.from_regex(source)
        return xgr.Grammar.from_ebnf(_ebnf_of_choice(source))
    except RuntimeError as e:
        raise GrammarError(_XGR_PREFIX.sub("", str(e).strip().splitlines()[0])) from None


def _strict_strings(xgr, grammar):
    """`grammar` (of a JSON schema) with the characters of its strings valid in strict JSON: no raw
    control characters, no surrogates (see _STRING_CHARS)."""
    text = str(grammar)
    for chars in _STRING_CHARS:
        text = text.replace(chars, _STRICT_STRING_CHAR)
    return xgr.Grammar.from_ebnf(text)


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
