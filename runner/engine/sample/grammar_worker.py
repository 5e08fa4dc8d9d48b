"""The grammar worker: a process of its own that holds every sequence's grammar matcher and fills the
bitmasks, so that xgrammar's host work runs beside the engine's Python loop, not in its thread.
xgrammar's batch calls hold the GIL for part of their run: from a thread of the engine's process, a
fill still stalled the loop 0.4 ms median and 3.5 ms p90 per call on the CI machine, and W1 under a
JSON schema ran at 0.75x of unconstrained on an H200; with this worker, 0.84x.

`Grammars` is the engine's side. A request's grammar is checked (compiled) when the request is
added, and each of its samples gets a matcher in the worker (`Sequence.matcher` holds its key).
`advance` sends a step's sampled tokens to the matchers, `start_fill` asks for the bitmask of the
next step to sample (bit t of row i set = token t allowed) and `wait_fill` returns it, in host memory
both processes share; the device masks the logits with it (`sampling.apply_token_bitmask`) right
before sampling. The grammar's stop tokens are the engine's EOS ids, so EOS is allowed only where
the grammar may end; a sequence whose matcher accepted one drops it (its grammar has ended).

The worker (`serve`) handles the engine's requests in order; only `fill` answers:

- `("new", keys, grammar)`: a fresh matcher under `grammar` (compiled on first use) for each key;
- `("accept", keys, tokens)`: feed each matcher its token; a matcher that accepted a stop token is
  dropped; a token a matcher refuses is reported by the next `fill`;
- `("free", keys)`: drop these matchers (their sequences finished);
- `("buffer", name, rows, words)`: the shared-memory bitmask buffer to fill from now on;
- `("fill", keys, rows)`: write rows [0, rows) of the buffer: row i the tokens matcher `keys[i]`
  allows next, all bits set where `keys[i]` is None and in the padding rows past `len(keys)`;
  answers None, or the text of what went wrong since the last fill (a token a matcher refused);
- None: stop.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import types
import weakref
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING

import numpy as np

from runner.engine.sample.grammar import xgrammar_grammar
from runner.engine.text.tokenizer import Tokenizer
from runner.engine.types import Grammar

if TYPE_CHECKING:
    import torch

    from runner.engine.core.sequence import Sequence

log = logging.getLogger(__name__)


def serve(conn: Connection, tokenizer_info: str, stop_ids: frozenset[int], threads: int) -> None:
    """The worker process's body: `tokenizer_info` is xgrammar's serialized TokenizerInfo, whose stop
    tokens are `stop_ids`."""
    from runner.engine.parallel.group import die_with_parent

    die_with_parent()
    worker = _Worker(tokenizer_info, stop_ids, threads)
    while (message := _next(conn)) is not None:
        kind, *args = message
        answer = getattr(worker, kind)(*args)
        if kind == "fill":
            conn.send(answer)
    worker.close()


class _Worker:
    """The worker's state: compiled grammars, matchers by key, the shared bitmask; a method per request."""

    def __init__(self, tokenizer_info: str, stop_ids: frozenset[int], threads: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.deserialize_json(tokenizer_info)
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads)
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self._stop_ids = stop_ids
        self._compiled: dict = {}  # Grammar -> xgrammar's CompiledGrammar
        self._matchers: dict = {}  # key -> xgrammar's GrammarMatcher
        self._refused: list[str] = []  # tokens a matcher refused since the last fill
        self._shm: SharedMemory | None = None
        self._bitmask = np.empty((0, 0), dtype=np.int32)  # [rows, words] over the shared buffer

    def new(self, keys: list[int], grammar: Grammar) -> None:
        if grammar not in self._compiled:  # the engine compiled it too, so it compiles
            self._compiled[grammar] = self._compiler.compile_grammar(xgrammar_grammar(grammar))
        for key in keys:
            self._matchers[key] = self._xgr.GrammarMatcher(self._compiled[grammar])

    def accept(self, keys: list[int], tokens: list[int]) -> None:
        accepted = _accept([self._matchers[k] for k in keys], tokens)
        if 0 in accepted:
            pairs = zip(keys, tokens, accepted, strict=True)
            self._refused += [f"token {t} (matcher {k})" for k, t, ok in pairs if not ok]
        for key, token in zip(keys, tokens, strict=True):
            if token in self._stop_ids and self._matchers[key].is_terminated():
                del self._matchers[key]  # its grammar ended

    def free(self, keys: list[int]) -> None:
        for key in keys:
            self._matchers.pop(key, None)

    def buffer(self, name: str, rows: int, words: int) -> None:
        self.close()
        self._shm = SharedMemory(name=name)
        self._bitmask = np.ndarray((rows, words), dtype=np.int32, buffer=self._shm.buf)

    def fill(self, keys: list[int | None], rows: int) -> str | None:
        """Rows [0, rows) of the bitmask for `keys` (see the module docstring); the error text, or None."""
        if self._refused:
            error, self._refused = "tokens sampled outside their grammar: " + ", ".join(self._refused), []
            return error
        out = self._bitmask[:rows]
        live = [i for i, key in enumerate(keys) if key is not None]
        out[len(keys) :] = -1  # padding rows
        out[[i for i, key in enumerate(keys) if key is None]] = -1  # rows without a grammar
        if live:
            self._batch.batch_fill_next_token_bitmask([self._matchers[keys[i]] for i in live], out, live)
        return None

    def close(self) -> None:
        """Unmap the shared bitmask (its view goes first: a mapping with a view on it cannot close)."""
        self._bitmask = np.empty((0, 0), dtype=np.int32)
        if self._shm is not None:
            self._shm.close()
            self._shm = None


def _next(conn: Connection):
    """The engine's next request; None (stop) when its process is gone without saying so."""
    try:
        return conn.recv()
    except EOFError:
        return None


def _accept(matchers: list, tokens: list[int]):
    """Feed `tokens[i]` to `matchers[i]` in one native call; a sequence of 0/1 (1: accepted). xgrammar's
    public `batch_accept_token` turns that sequence into a list item by item, which costs about as
    much as the batch itself (0.6 ms for 512 rows); `0 in` it is one native call."""
    from xgrammar.base import _core

    return _core.BatchGrammarMatcher.batch_accept_token([m._handle for m in matchers], tokens, False)


class Grammars:
    """The structured output of one engine: grammar checks, and the grammar worker that holds the
    matchers and fills the bitmasks."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int], pin: bool) -> None:
        """`vocab_size`: the model's logits width (may exceed the tokenizer's); `eos_ids` end a grammar;
        `pin`: page-lock the shared bitmask (CUDA), so that its copy to the device is asynchronous."""
        import xgrammar as xgr

        threads = min(8, os.cpu_count() or 1)  # bitmasks of a step's rows are filled in parallel
        if isinstance(tokenizer, Tokenizer):  # xgrammar reads a transformers tokenizer
            tokenizer = tokenizer.to_transformers()
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids)
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads)  # checks a grammar at `matchers`
        self._checked: set[Grammar] = set()
        # a fork of a server process that imported xgrammar (and torch) once: a worker starts in ms
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["runner.engine.sample.grammar_worker", "xgrammar"])
        self._conn, theirs = context.Pipe()
        self._worker = context.Process(
            target=serve,
            args=(theirs, info.serialize_json(), eos_ids, threads),
            name="batchrun-grammar",
            daemon=True,
        )
        with _bare_main_module():
            self._worker.start()
        theirs.close()
        self._stop = weakref.finalize(self, _stop, self._conn, self._worker)  # also if never closed
        self._eos_ids = eos_ids
        self._words = -(-vocab_size // 32)  # int32 words per bitmask row
        self._pin = pin
        self._buffer: _SharedBitmask | None = None
        self._rows = 0  # rows of the fill under way (0: none)
        self._next_key = 0

    def matchers(self, g: Grammar, n: int) -> list[int]:
        """Keys of `n` fresh matchers under `g` in the worker; raises GrammarError if `g` cannot compile."""
        if g not in self._checked:
            self._compiler.compile_grammar(xgrammar_grammar(g))
            self._checked.add(g)
        keys = list(range(self._next_key, self._next_key + n))
        self._next_key += n
        self._send(("new", keys, g))
        return keys

    def advance(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Feed each grammar sequence its sampled token; one that took a stop token drops its matcher.

        Every row of a sequence with a matcher was sampled under its grammar, so every token fed here
        is one its matcher allows; a sequence that finished while a step with its row was in flight has
        no matcher any more (`release`), and its row's token is not fed."""
        live = [(seq, token) for seq, token in zip(seqs, tokens, strict=True) if seq.matcher is not None]
        if not live:
            return
        self._send(("accept", [seq.matcher for seq, _ in live], [token for _, token in live]))
        for seq, token in live:
            if token in self._eos_ids:
                seq.matcher = None  # the worker drops the matcher too

    def start_fill(self, seqs: list[Sequence], rows: int) -> None:
        """Ask for the bitmask [rows >= len(seqs), words] of a step's sample rows `seqs`: row i the
        tokens `seqs[i]` may sample next, all bits set for rows without a grammar and padding rows."""
        assert not self._rows, "a bitmask fill is already under way"
        if self._buffer is None or self._buffer.rows < rows:
            self._grow(rows)
        self._send(("fill", [seq.matcher for seq in seqs], rows))
        self._rows = rows

    def wait_fill(self) -> torch.Tensor:
        """The host bitmask [rows, words] int32 `start_fill` asked for, once the worker has written it.
        It stays valid until the next `start_fill`."""
        rows, self._rows = self._rows, 0
        try:
            error = self._conn.recv()
        except (EOFError, ConnectionError):
            raise self._exited() from None
        if error is not None:
            raise RuntimeError(f"grammar worker: {error}")
        return self._buffer.tensor[:rows]

    def release(self, seq: Sequence) -> None:
        """`seq` finished: its matcher (if its grammar had not ended) is dropped."""
        if seq.matcher is not None:
            self._send(("free", [seq.matcher]))
            seq.matcher = None

    def close(self) -> None:
        """Stop the worker and free the shared bitmask."""
        if self._rows and self._worker.is_alive():
            self.wait_fill()
        self._stop()
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError:  # a broken pipe: the worker is gone
            raise self._exited() from None

    def _exited(self) -> RuntimeError:
        self._worker.join(timeout=10)
        return RuntimeError(f"the grammar worker exited (code {self._worker.exitcode})")

    def _grow(self, rows: int) -> None:
        old = self._buffer
        self._buffer = _SharedBitmask(max(rows, 2 * old.rows if old else 0), self._words, self._pin)
        self._send(("buffer", self._buffer.name, self._buffer.rows, self._words))
        if old is not None:  # every copy from it has completed: its step's tokens were waited for
            old.close()


@contextlib.contextmanager
def _bare_main_module():
    """A bare module stands in for `__main__` while the worker starts. multiprocessing runs the main
    script (or module) again in a child it starts from a fork server, so a script without an
    `if __name__ == "__main__":` guard would build another engine there, and code read from standard
    input cannot run again at all; the worker needs nothing of `__main__`."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _stop(conn: Connection, worker: multiprocessing.Process) -> None:
    with contextlib.suppress(OSError):  # the worker may be gone already
        conn.send(None)
    worker.join(timeout=10)
    if worker.is_alive():
        worker.kill()
    conn.close()


class _SharedBitmask:
    """A [rows, words] int32 host buffer in shared memory: the worker fills it, the engine copies it to
    the device (page-locked with `pin`, so that the copy is asynchronous)."""

    def __init__(self, rows: int, words: int, pin: bool) -> None:
        import torch

        self.rows = rows
        self._shm = SharedMemory(create=True, size=rows * words * 4)
        self.name = self._shm.name
        self._unlink = weakref.finalize(self, self._shm.unlink)  # also when the engine is never closed
        self.tensor = torch.frombuffer(self._shm.buf, dtype=torch.int32, count=rows * words).view(rows, words)
        self._pinned = pin and _cuda_call("cudaHostRegister", self.tensor.data_ptr(), rows * words * 4, 0)
        if pin and not self._pinned:
            log.warning("could not page-lock the grammar bitmask: its copies to the GPU will be synchronous")

    def close(self) -> None:
        if self._pinned:
            _cuda_call("cudaHostUnregister", self.tensor.data_ptr())
        self.tensor = None  # the buffer's only export: the memory can be unmapped now
        self._shm.close()
        self._unlink()


def _cuda_call(name: str, *args) -> bool:
    """Call CUDA runtime function `name`; True if it succeeded."""
    import torch

    return int(getattr(torch.cuda.cudart(), name)(*args)) == 0
