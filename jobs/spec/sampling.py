"""The spec's `sampling` section: the engine's SamplingParams fields, and structured output (a JSON
schema inline or in a file, a regex, a choice list), each grammar checked when the spec is read."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, create_model, field_validator, model_validator

from jobs.spec.base import Section, SpecError, fields_of
from runner.engine.sample.grammar import GrammarError, check_grammar
from runner.engine.types import GRAMMAR_KEYS, SamplingParams
from runner.io.storage import url_to_fs


class _SamplingSection(Section):
    @field_validator("stop", mode="before", check_fields=False)
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("json_schema", check_fields=False)
    @classmethod
    def _schema_compiles(cls, v: Any) -> Any:
        if isinstance(v, dict):  # a path or URL is read and checked once anchored (`_load_schema`)
            _check(("json_schema", json.dumps(v, sort_keys=True)))
        return v

    @field_validator("regex", check_fields=False)
    @classmethod
    def _regex_compiles(cls, v: Any) -> Any:
        if v is not None:
            _check(("regex", v))
        return v

    @field_validator("choice", check_fields=False)
    @classmethod
    def _choice_compiles(cls, v: Any) -> Any:
        if v is not None:
            _check(("choice", tuple(v)))
        return v

    @model_validator(mode="after")
    def _one_grammar(self) -> _SamplingSection:
        given = [k for k in GRAMMAR_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"set at most one of sampling.{', sampling.'.join(GRAMMAR_KEYS)} (got {', '.join(given)})"
            )
        return self

    def params(self) -> SamplingParams:
        """The job's sampling as the engine takes it (each row's seed is derived from `seed`)."""
        values = self.model_dump(exclude={"overrides_column"})
        schema = values["json_schema"]
        assert not isinstance(schema, str), "a schema path is read by parse_spec"
        values["json_schema"] = None if schema is None else json.dumps(schema, sort_keys=True)
        values["choice"] = tuple(values["choice"] or ())
        return SamplingParams(**values)


def _check(grammar) -> None:
    try:
        check_grammar(grammar)
    except GrammarError as e:
        raise ValueError(str(e)) from None


# The engine's SamplingParams fields, with their types, defaults and bounds (runner/engine/types.py)
SamplingSpec = create_model(
    "SamplingSpec",
    __base__=_SamplingSection,
    **fields_of(
        SamplingParams,
        exclude={"logprobs"},  # not offered by the job yet
        seed=(int, Field(0, description="the job's seed; each row samples with one derived from it")),
        json_schema=(
            dict[str, Any] | str | None,
            Field(
                None,
                description="the output is JSON under this schema: an inline mapping, or a path/URL "
                "of a .json file",
            ),
        ),  # fmt: skip
        choice=(list[str] | None, Field(None, description="the output is exactly one of these strings")),
        overrides_column=(
            str | None,
            Field(
                None, description="a column of per-row overrides, e.g. {max_new_tokens: 64, temperature: 0.5}"
            ),
        ),
    ),
)


def with_schema_file_read(sampling: SamplingSpec, source: str) -> SamplingSpec:
    """`sampling` with a `json_schema` given as a path or URL read and checked (it becomes the mapping)."""
    path = sampling.json_schema
    if not isinstance(path, str):
        return sampling
    try:
        fs, fs_path = url_to_fs(path, {})
        with fs.open(fs_path, "r") as f:
            schema = json.load(f)
    except (OSError, ValueError) as e:
        raise SpecError(
            f"{source}: sampling.json_schema: cannot read a JSON schema from {path!r} ({e})"
        ) from None
    if not isinstance(schema, dict):
        raise SpecError(f"{source}: sampling.json_schema: {path!r} must hold a JSON object")
    try:
        check_grammar(("json_schema", json.dumps(schema, sort_keys=True)))
    except GrammarError as e:
        raise SpecError(f"{source}: sampling.json_schema ({path}): {e}") from None
    return sampling.model_copy(update={"json_schema": schema})
