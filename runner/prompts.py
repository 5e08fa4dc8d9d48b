"""Rows to token ids: the prompt column, a template over row fields, or chat messages.

A row that can't become a prompt (missing field, bad messages, template error, too long under
`on_too_long: skip`) becomes a `PreparedRow` with an `error`, never an exception: one bad row must
not stop a job of a million good ones. `on_too_long: error` is the exception: the user asked the job
to stop, and `PromptTooLong` says which row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from runner.engine.sample.grammar import GrammarError, check_grammar
from runner.engine.types import GRAMMAR_KEYS, PER_ROW, SamplingParams

CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}
OVERRIDABLE = PER_ROW  # the sampling fields a row may set (SamplingParams says which)


class PromptTooLong(Exception):
    """A prompt over the limit under `on_too_long: error`."""


class PromptSetupError(ValueError):
    """The prompt settings cannot work with this model (the job reports it as a spec error)."""


@dataclass(slots=True, frozen=True)
class PromptConfig:
    """How rows become prompts (the job spec's `prompt:` section, resolved)."""

    column: str | None = None  # a column holding the prompt text
    template: str | None = None  # a Python format string over row fields
    messages_column: str | None = None  # a column of chat messages
    uses_chat_template: bool = False
    system: str | None = None  # system prompt (chat template only)
    max_tokens: int | None = None  # longest prompt in tokens (default: the model's context)
    on_too_long: Literal["error", "skip", "truncate"] = "skip"
    overrides_column: str | None = None  # a column of per-row sampling overrides


_PARAMS = TypeAdapter(SamplingParams)  # validates overrides against the engine's own bounds


@dataclass(slots=True)
class PreparedRow:
    """One input row, ready for the engine (`prompt_ids`) or already failed (`error`)."""

    shard: str
    row: int
    values: dict[str, Any] | None
    prompt_ids: list[int] | None = None
    sampling: SamplingParams | None = None
    error: str | None = None
    nbytes: int = 0  # size of `values`, held against the job's HeldBytes bound (runner/held_bytes.py)


class PromptBuilder:
    """Turns batches of rows into token ids with one batched call of the fast tokenizer."""

    limits_per_row = False  # True: each row's max_new_tokens decides its prompt limit (`_limit`)

    def __init__(self, spec: PromptConfig, sampling: SamplingParams, tokenizer, max_model_len: int):
        """`sampling`: the job's; its `seed` is the job seed that each row's seed is derived from."""
        self.spec = spec
        self.tokenizer = tokenizer
        self.base_sampling = sampling
        self.overrides_column = spec.overrides_column
        self.seed = sampling.seed
        limit = max_model_len - sampling.max_new_tokens
        if spec.max_tokens is not None:
            limit = min(limit, spec.max_tokens)
        if limit <= 0 and not self.limits_per_row:
            raise PromptSetupError(
                f"sampling.max_new_tokens {sampling.max_new_tokens} leaves no room for a prompt in the "
                f"model's context of {max_model_len} tokens; lower it"
            )
        self.max_prompt_tokens = limit
        self.max_model_len = max_model_len
        if spec.uses_chat_template and not getattr(tokenizer, "chat_template", None):
            raise PromptSetupError(
                "prompt asks for the chat template but the model's tokenizer has none; set "
                "prompt.chat_template: false (and use prompt.column or prompt.template)"
            )

    def build(
        self,
        shard: str,
        rows: list[tuple[int, dict[str, Any] | None, str | None]],
        source: str | None = None,
        places: list[str] | None = None,
    ) -> list[PreparedRow]:
        """rows: (row number, values or None, read error or None) → one PreparedRow each, in order.

        Error messages say `<source> <place>`: `source` defaults to the shard id, each row's place
        to "row <n>" (`places` gives them, e.g. "line 5" for JSONL).
        """
        where = source or shard
        out: list[PreparedRow] = []
        pending: list[tuple[PreparedRow, str, str, bool]] = []  # (row, place, text, add special tokens)
        for i, (row, values, read_error) in enumerate(rows):
            prep = PreparedRow(shard, row, values)
            out.append(prep)
            if read_error is not None:
                prep.error = read_error
                continue
            place = f"{where} {places[i] if places else f'row {row}'}"
            try:
                text, prep.sampling, add_special = self._prepare(shard, row, values)
            except RowError as e:
                prep.error = f"{place}: {e}"
                continue
            pending.append((prep, place, text, add_special))
        for add_special in (True, False):
            group = [p for p in pending if p[3] == add_special]
            if group:
                encoded = self.tokenizer([p[2] for p in group], add_special_tokens=add_special)["input_ids"]
                for (prep, place, _, _), ids in zip(group, encoded, strict=True):
                    self._fit(prep, list(ids), place)
        return out

    def _prepare(self, shard: str, row: int, values: dict[str, Any]) -> tuple[str, SamplingParams, bool]:
        """(prompt text, sampling, whether the tokenizer adds its special tokens) of one row; raises
        RowError. Chat-templated text already carries its special tokens."""
        text = self._text(values)
        return text, self._sampling(shard, row, values), not self.spec.uses_chat_template

    def _limit(self, sampling: SamplingParams) -> int:
        """The longest prompt a row sampled with `sampling` may have."""
        return self.max_prompt_tokens

    def _text(self, values: dict[str, Any]) -> str:
        spec = self.spec
        if spec.column:
            text = _field(values, spec.column)
            if not isinstance(text, str):
                raise RowError(f"field '{spec.column}' must be text (got {type(text).__name__})")
        elif spec.template:
            try:
                text = spec.template.format_map(values)
            except KeyError as e:
                raise RowError(f"prompt.template needs field {e} which the row lacks") from None
            except (ValueError, IndexError, AttributeError) as e:
                raise RowError(f"prompt.template failed on this row: {e}") from None
        else:
            return self._chat(_messages(_field(values, spec.messages_column), spec.messages_column))
        if not text.strip():
            raise RowError("empty prompt")
        return self._chat([{"role": "user", "content": text}]) if spec.uses_chat_template else text

    def _chat(self, messages: list[dict[str, str]]) -> str:
        if self.spec.system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.spec.system}, *messages]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template is user code: any failure is this row's error
            raise RowError(f"chat template failed: {type(e).__name__}: {e}") from None

    def _sampling(self, shard: str, row: int, values: dict[str, Any]) -> SamplingParams:
        # a per-row seed derived from (job seed, shard, row): same tokens on every resume, any batch mix
        seed = row_seed(self.seed, shard, row)
        params = replace(self.base_sampling, seed=seed)
        if not self.overrides_column or values.get(self.overrides_column) is None:
            return params
        over = values[self.overrides_column]
        if not isinstance(over, dict):
            raise RowError(f"field '{self.overrides_column}' must be a mapping of sampling overrides")
        unknown = set(over) - OVERRIDABLE
        if unknown:
            raise RowError(
                f"field '{self.overrides_column}': unknown sampling keys {sorted(unknown)} "
                f"(allowed: {sorted(OVERRIDABLE)})"
            )
        if isinstance(over.get("stop"), str):
            over = {**over, "stop": [over["stop"]]}
        over = self._row_grammar(over)
        try:
            checked = _PARAMS.validate_python({**asdict(params), **over})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise RowError(f"field '{self.overrides_column}': {where}: {first['msg']}") from None
        if checked.seed is None:  # the job's seed is an integer; a row's too
            raise RowError(f"field '{self.overrides_column}': seed: Input should be a valid integer")
        if checked.max_new_tokens > self.base_sampling.max_new_tokens:
            raise RowError(
                f"field '{self.overrides_column}': max_new_tokens {checked.max_new_tokens} is over the "
                f"job's sampling.max_new_tokens {self.base_sampling.max_new_tokens}"
            )
        row = {name: getattr(checked, name) for name in OVERRIDABLE}  # validated: tuples are tuples
        row["seed"] = seed if "seed" not in over else checked.seed
        return replace(params, **row)

    def _row_grammar(self, over: dict[str, Any]) -> dict[str, Any]:
        """Overrides with a row's grammar checked and in the engine's form (the schema as JSON text),
        replacing the job's; unchanged when the row sets none."""
        col = self.overrides_column
        given = [k for k in GRAMMAR_KEYS if over.get(k) is not None]
        if not given:
            return {k: v for k, v in over.items() if k not in GRAMMAR_KEYS}
        if len(given) > 1:
            raise RowError(
                f"field '{col}': set at most one of {', '.join(GRAMMAR_KEYS)} (got {', '.join(given)})"
            )
        kind = given[0]
        value = over[kind]
        if kind == "json_schema":
            if isinstance(value, str):  # JSON text, as a string column holds it
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise RowError(f"field '{col}': json_schema: not valid JSON: {e}") from None
            if not isinstance(value, dict):
                raise RowError(f"field '{col}': json_schema: must be a JSON object (a mapping)")
            value = json.dumps(value, sort_keys=True)
        elif kind == "choice":
            if not isinstance(value, list | tuple) or not all(isinstance(c, str) for c in value):
                raise RowError(f"field '{col}': choice: must be a list of strings")
            value = tuple(value)
        elif not isinstance(value, str):
            raise RowError(f"field '{col}': regex: must be a string")
        try:
            check_grammar((kind, value))
        except GrammarError as e:
            raise RowError(f"field '{col}': {kind}: {e}") from None
        return {**over, "json_schema": None, "regex": None, "choice": (), kind: value}

    def _fit(self, prep: PreparedRow, ids: list[int], place: str) -> None:
        limit = self._limit(prep.sampling)
        if len(ids) <= limit:
            prep.prompt_ids = ids
            return
        what = f"{place}: prompt has {len(ids)} tokens, over the limit of {limit}"
        policy = self.spec.on_too_long
        if policy == "truncate":
            prep.prompt_ids = ids[-limit:]  # keep the end, where the question usually is
        elif policy == "skip":
            prep.error = f"{what} (on_too_long: skip)"
        else:
            raise PromptTooLong(
                f"{what}. The job stops because prompt.on_too_long is 'error'; set it to 'skip' "
                "or 'truncate', or raise prompt.max_tokens"
            )


class RowError(Exception):
    """This row cannot become a prompt; the message says why (the builder adds where)."""


def _field(values: dict[str, Any], name: str) -> Any:
    if name not in values:
        raise RowError(f"row has no field '{name}' (fields: {', '.join(sorted(values)) or 'none'})")
    if values[name] is None:
        raise RowError(f"field '{name}' is null")
    return values[name]


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{column}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise RowError(f"field '{column}' message {i}: needs a text 'content'")
        if m.get("role") not in CHAT_ROLES:
            raise RowError(
                f"field '{column}' message {i}: role {m.get('role')!r} is not one of {sorted(CHAT_ROLES)}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def row_seed(seed: int, shard: str, row: int) -> int:
    """A row's own seed, derived from the job's: the same on every resume, whatever the batch mix."""
    digest = hashlib.blake2b(f"{seed}\0{shard}\0{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
