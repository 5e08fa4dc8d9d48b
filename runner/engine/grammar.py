"""Structured output: grammars from JSON schemas, regexes and choices, with xgrammar.

A request's grammar (`SamplingParams.grammar`) is compiled once per distinct source and cached; each
sequence under one gets its own matcher. Before a step samples, `start_fill` has each grammar row's
allowed tokens written as a bitmask (bit t of row i set = token t allowed) on the host, in a thread
of its own, and `wait_fill` waits for it; the device masks the logits with it
(`sampling.apply_token_bitmask`) right before sampling. After the step, `advance` feeds the sampled
tokens to the matchers. The grammar's stop tokens are the engine's EOS ids, so EOS is allowed only
where the grammar may end; a sequence whose matcher accepted one drops it (`Sequence.matcher` None):
its grammar has ended.

Why a thread: xgrammar releases the GIL inside a batch fill, so the fill of step N+1 runs while the
engine's thread hands out step N's completions and schedules step N+2 (pure Python). The thread
takes each fill from a queue and runs it as one call; `start_fill` returns once the thread holds the
job, so that the thread is not left waiting up to a GIL switch interval (5 ms) for its turn.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import threading
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
        self._filler = _FillThread(xgr.BatchGrammarMatcher(max_threads=threads))
        self._eos_ids = eos_ids

    def matcher(self, g: Grammar):
        """A fresh matcher for one sequence under `g` (compiled on first use); raises GrammarError."""
        compiled = self._compiled.get(g)
        if compiled is None:
            compiled = self._compiled[g] = self._compiler.compile_grammar(_grammar(g))
        return _xgr().GrammarMatcher(compiled)

    def start_fill(self, seqs: list[Sequence], out: torch.Tensor) -> None:
        """Start writing row i of `out` [>= len(seqs), words] int32: the tokens `seqs[i]` may sample next
        (all bits set for rows without a grammar, and padding rows). The grammar rows are filled in the
        fill thread: leave `out` and the matchers alone until `wait_fill` returns."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if len(rows) < len(seqs):
            out.fill_(-1)
        else:
            out[len(seqs) :].fill_(-1)
        if rows:
            self._filler.start([seqs[i].matcher for i in rows], out, rows)

    def wait_fill(self) -> None:
        """Block until the bitmask `start_fill` started is written (at once if none is under way)."""
        self._filler.wait()

    def advance(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Feed each grammar sequence its sampled token; one that accepted a stop token drops its matcher.

        A row of a sequence that finished one step earlier (async scheduling) was sampled under its
        grammar too, so every token fed here is one its matcher allows."""
        live = [(seq, token) for seq, token in zip(seqs, tokens, strict=True) if seq.matcher is not None]
        if not live:
            return
        accepted = _accept_tokens([seq.matcher for seq, _ in live], [token for _, token in live])
        assert 0 not in accepted, f"a token sampled outside its grammar: {_rejected(live, accepted)}"
        for seq, token in live:
            if token in self._eos_ids:
                seq.matcher = None

    def close(self) -> None:
        """Wait for a fill under way, then end the fill thread."""
        self._filler.close()


def _accept_tokens(matchers: list, tokens: list[int]):
    """Feed `tokens[i]` to `matchers[i]` in one call; a sequence of 0/1, 1 where accepted. The public
    `BatchGrammarMatcher.batch_accept_token` turns its result into a list item by item, which costs
    about as much as the batch itself (0.6 ms for 512 rows); `0 in result` is one native call."""
    from xgrammar.base import _core

    return _core.BatchGrammarMatcher.batch_accept_token([m._handle for m in matchers], tokens, False)


def _rejected(live: list[tuple[Sequence, int]], accepted) -> str:
    rejected = [(seq, t) for (seq, t), ok in zip(live, accepted, strict=True) if not ok]
    return ", ".join(f"token {t} of {seq.request_id!r}" for seq, t in rejected)


class _FillThread:
    """One thread that runs batch bitmask fills, one at a time, while the engine's thread goes on."""

    def __init__(self, batch) -> None:
        self._batch = batch  # xgrammar's BatchGrammarMatcher (its own C++ threads split a fill's rows)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._taken = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="batchrun-grammar-fill", daemon=True)
        self._thread.start()

    def start(self, matchers: list, out: torch.Tensor, rows: list[int]) -> None:
        assert self._done.is_set(), "a bitmask fill is already under way"
        self._done.clear()
        self._taken.clear()
        self._jobs.put((matchers, out, rows))
        self._taken.wait()  # the thread has the GIL now, and gives it up inside the fill

    def wait(self) -> None:
        self._done.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        self.wait()
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._taken.set()
            try:
                self._batch.batch_fill_next_token_bitmask(*job)
            except BaseException as e:  # raised in the engine's thread by `wait`
                self._error = e
            self._done.set()
