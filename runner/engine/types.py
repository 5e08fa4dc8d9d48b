"""Plain values that cross the engine boundary: what to generate, how, what came out, and the error
that sends a model to the fallback backend (`UnsupportedModel`)."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Lt

FinishReason = Literal["stop", "length"]
GrammarKind = Literal["json_schema", "regex", "choice"]
GRAMMAR_KEYS: tuple[GrammarKind, ...] = typing.get_args(GrammarKind)  # SamplingParams fields, one at most
Grammar = tuple[GrammarKind, "str | tuple[str, ...]"]  # (kind, source): a request's output grammar
Positive = Annotated[int, Gt(0)]
NonNegative = Annotated[int, Ge(0)]


class UnsupportedModel(Exception):
    """The fast path cannot run this model; the caller falls back to the transformers backend.

    The message says why (architecture, rope type, ...), so the caller can log it.
    """


def _per_row(default: object) -> Any:
    """A SamplingParams field that a row may override (`sampling.overrides_column`, runner/prompts.py)."""
    return field(default=default, metadata={"per_row": True})


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How one request samples. `temperature == 0` means greedy (top-k/top-p/min-p then ignored).

    The bounds in the annotations are the only declaration of the valid values: the job spec's
    `sampling:` section is generated from these fields (jobs/spec/job.py) and per-row overrides are
    validated against them (runner/prompts.py); the engine itself does not check them per request.
    """

    max_new_tokens: Positive = _per_row(256)
    temperature: Annotated[float, Ge(0)] = _per_row(0.0)
    top_k: NonNegative = _per_row(0)  # 0 = off
    top_p: Annotated[float, Gt(0), Le(1)] = _per_row(1.0)  # 1.0 = off
    min_p: Annotated[float, Ge(0), Lt(1)] = _per_row(0.0)  # 0.0 = off
    seed: int | None = _per_row(None)  # same seed + same prompt -> same tokens, whatever else is in the batch
    stop_token_ids: tuple[int, ...] = ()  # finish when one is sampled (it is kept in token_ids)
    stop: tuple[str, ...] = _per_row(())  # finish when the decoded text contains one (text is cut before it)
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    n: Positive = 1  # samples per prompt, sharing the prompt's KV pages
    logprobs: bool = False  # return the log-probability of each sampled token
    # structured output, at most one of the three (runner/engine/sample/grammar.py); EOS only where it may end
    json_schema: str | None = _per_row(None)  # a JSON schema, as JSON text
    regex: str | None = _per_row(None)  # the output matches this regular expression
    choice: tuple[str, ...] = _per_row(())  # the output is exactly one of these strings

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def grammar(self) -> Grammar | None:
        """The output grammar as (kind, source), or None when the output is free."""
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        if self.regex is not None:
            return "regex", self.regex
        return ("choice", self.choice) if self.choice else None


# the fields a row may override (a row's grammar replaces the job's)
PER_ROW: frozenset[str] = frozenset(
    f.name for f in dataclasses.fields(SamplingParams) if f.metadata.get("per_row")
)


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


@dataclass(slots=True, frozen=True)
class InFlight:
    """How far the requests in flight are, for a progress display before they finish."""

    requests: float  # the work done, in requests: each sample's computed tokens over prompt + max_new_tokens
    generated_tokens: int  # tokens their samples generated so far


_OPS = {Gt: ("gt", ">"), Ge: ("ge", ">="), Lt: ("lt", "<"), Le: ("le", "<=")}


@functools.cache
def _bounds(cls: type) -> dict[str, list]:
    """Each field's annotated_types bounds (Gt, Ge, Lt, Le), also inside `X | None`."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [hint] + [a for a in typing.get_args(hint) if typing.get_origin(hint) is not Annotated]
        out[f.name] = [
            m for a in args if hasattr(a, "__metadata__") for m in a.__metadata__ if type(m) in _OPS
        ]
    return out


def field_bounds(cls: type, name: str) -> list:
    """The annotated_types bounds (Gt, Ge, Lt, Le) of the field `name` of the dataclass `cls`."""
    return _bounds(cls)[name]


def check_bounds(value: object, prefix: str) -> None:
    """Raise ValueError naming `<prefix>.<field>` if a field of the dataclass `value` is out of its bounds."""
    for name, bounds in _bounds(type(value)).items():
        v = getattr(value, name)
        for b in bounds:
            attr, op = _OPS[type(b)]
            limit = getattr(b, attr)
            if (
                v is not None
                and not {"gt": v > limit, "ge": v >= limit, "lt": v < limit, "le": v <= limit}[attr]
            ):
                raise ValueError(f"{prefix}.{name}={v!r}: must be {op} {limit}")
