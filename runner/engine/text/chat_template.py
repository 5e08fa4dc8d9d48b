"""Chat templates rendered as transformers 5 renders them (its `utils/chat_template_utils.py`), without it.

The same sandboxed Jinja environment (trim_blocks, lstrip_blocks, loop controls, the `{% generation %}` tag),
the same `tojson` filter and globals (`raise_exception`, `strftime_now`, a plain `dict`, a `namespace` that
refuses underscore names), and the same variables: `messages`, `tools`, `documents`, `add_generation_prompt`
and the tokenizer's named special tokens (`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# names a message's reasoning may come under; templates read the first (transformers fills it, and `thinking`)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat(
    template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict[str, str]
) -> str:
    """`messages` rendered by `template`; its `raise_exception(msg)` raises jinja2's TemplateError(msg)."""
    if not messages:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    chat = [_with_reasoning_aliases(m) for m in _plain([_without_none(m) for m in messages])]
    return _compile(template).render(
        messages=chat,
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **_plain(special_tokens),
    )


def _without_none(message: Any) -> dict:
    # APIs send `content=None` or `tool_calls=None`; templates handle a missing key better than a None
    if not isinstance(message, dict):
        raise TypeError(f"Chat messages should be dicts, but got {message!r}.")
    return {key: value for key, value in message.items() if value is not None}


def _with_reasoning_aliases(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """A copy of `value` made of plain JSON types (the sandbox does not know which methods of a richer
    object are dangerous); anything else becomes a placeholder naming its type, as transformers does."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base, plain in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):  # subclasses (enums...) lose their extra methods
            return plain(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_Namespace,
    )
    return env.from_string(template)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which a prompt must keep
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without the attribute access a real type would give them."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore names (a way towards CPython internals)."""

    def __init__(*args, **kwargs):  # jinja's signature trick: `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                "Chat templates cannot store underscore-prefixed attributes on a namespace, but got "
                f"{name!r}. Please rename the attribute."
            )


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text (for training masks); kept as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()
