"""An error row's reason: its text without the place (file, row or line) and with numbers folded."""

from __future__ import annotations

import re

_WHERE = re.compile(r"^.*? (row|line) \d+: ")


def error_reason(error: str) -> str:
    """An error row's reason without its place, numbers folded: groups alike errors together."""
    return re.sub(r"\d+", "N", _WHERE.sub("", error, count=1))[:120]
