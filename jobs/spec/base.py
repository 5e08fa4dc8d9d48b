"""What every section of the job spec shares: its error, its model base, fields taken from a dataclass."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict


class SpecError(Exception):
    """A spec the job can't run; the message lists every problem with its field path."""


class Section(BaseModel):
    """A spec section: unknown keys are errors, values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def fields_of(cls: type, exclude: set[str] = frozenset(), **overrides: Any) -> dict[str, Any]:
    """pydantic field definitions of a dataclass's fields: the same types, defaults and bounds (the
    annotated_types bounds in its annotations), so that a section and the engine cannot drift;
    `overrides` replace or add fields."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields: dict[str, Any] = {
        f.name: (hints[f.name], f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(cls)
        if f.name not in exclude
    }
    return fields | overrides
