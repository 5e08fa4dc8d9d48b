"""OpenAI Batch API request lines: one line's fields, checked, as a prompt and sampling overrides.

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": ..., ...}}

`parse_request` validates a line once, at the edge, into a `BatchRequest`; a request batchrun cannot
honour (tools, image or audio parts, top logprobs, streaming, penalties) raises `RequestError` naming
the field, and becomes that request's error line. Body fields that change nothing batchrun generates
(`user`, `metadata`, ...) or that it does not know are listed in `ignored`, for the job to report.
"""

from __future__ import annotations

import functools
import json
import typing
from dataclasses import dataclass
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt

from runner.engine.types import SamplingParams, field_bounds

Endpoint = Literal["chat", "completion"]
URLS: dict[str, Endpoint] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
# body fields that would change the output in ways batchrun cannot produce
UNSUPPORTED = frozenset(
    {
        "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio", "modalities",
        "prediction", "logit_bias", "best_of", "echo", "suffix", "web_search_options", "stream_options",
    }
)  # fmt: skip
# OpenAI's body fields that set a number of SamplingParams, with OpenAI's own documented range, stated once
# (platform.openai.com/docs/api-reference/chat/create): body field -> (the SamplingParams field it sets,
# OpenAI's lowest value, its highest; None where it documents none). A request's value is accepted in the
# intersection of this range and the field's bounds on SamplingParams (`accepted_range`).
OPENAI_NUMBERS: dict[str, tuple[str, float | None, float | None]] = {
    "max_tokens": ("max_new_tokens", None, None),
    "max_completion_tokens": ("max_new_tokens", None, None),  # chat: the newer name of max_tokens
    "temperature": ("temperature", 0, 2),
    "top_p": ("top_p", 0, 1),
    "n": ("n", None, None),
    "seed": ("seed", None, None),
}
_COMMON = {"model", "stop", "logprobs", "response_format"} | (set(OPENAI_NUMBERS) - {"max_completion_tokens"})
_KNOWN = {
    "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
    "completion": _COMMON | {"prompt"},
}
_ZERO_OK = {"stream": False, "presence_penalty": 0, "frequency_penalty": 0}  # the default value is fine
_ROLES = {"system", "user", "assistant", "developer"}
PERMISSIVE_OBJECT = {"type": "object"}  # response_format json_object: any JSON object


@dataclass(slots=True, frozen=True)
class Range:
    """The values accepted between `low` and `high` (None: unbounded), each end included unless open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __and__(self, other: Range) -> Range:
        """The values both ranges accept."""
        low, low_open = max(
            ((r.low, r.low_open) for r in (self, other) if r.low is not None), default=(None, False)
        )
        high, high_open = min(
            ((r.high, not r.high_open) for r in (self, other) if r.high is not None), default=(None, True)
        )
        return Range(low, high, low_open, not high_open)


@functools.cache
def accepted_range(body_field: str) -> Range:
    """The values a request may give `body_field` (OPENAI_NUMBERS): OpenAI's documented range within
    the bounds of the SamplingParams field it sets."""
    name, low, high = OPENAI_NUMBERS[body_field]
    ours = Range()
    for b in field_bounds(SamplingParams, name):
        if isinstance(b, Gt | Ge):
            ours &= Range(low=b.gt if isinstance(b, Gt) else b.ge, low_open=isinstance(b, Gt))
        elif isinstance(b, Lt | Le):
            ours &= Range(high=b.lt if isinstance(b, Lt) else b.le, high_open=isinstance(b, Lt))
    return ours & Range(low, high)


class RequestError(ValueError):
    """A request line batchrun cannot run; the message names the field (`body.messages[0].content`)."""


@dataclass(slots=True, frozen=True)
class BatchRequest:
    """One request line, checked: what to prompt with and how to sample it."""

    custom_id: str
    endpoint: Endpoint
    model: str | None  # body.model, echoed in the response
    messages: list[dict[str, str]] | None  # chat: the conversation, content as text
    prompt: str | None  # completion: the raw prompt text
    overrides: dict[str, Any]  # SamplingParams fields the request sets (max_new_tokens, json_schema, ...)
    ignored: tuple[str, ...]  # body fields that change nothing here, reported by the job


def custom_id_of(line: dict[str, Any] | None) -> str | None:
    """The line's custom_id when it is a string (also for a line that is otherwise invalid)."""
    value = (line or {}).get("custom_id")
    return value if isinstance(value, str) else None


def parse_request(line: dict[str, Any]) -> BatchRequest:
    """A request line (the JSON object) as a `BatchRequest`; raises RequestError naming the field."""
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise RequestError("custom_id: must be a non-empty string")
    if line.get("method", "POST") != "POST":
        raise RequestError(f"method: must be POST (got {line.get('method')!r})")
    url = line.get("url")
    if url not in URLS:
        raise RequestError(f"url: must be one of {', '.join(URLS)} (got {url!r})")
    endpoint = URLS[url]
    body = line.get("body")
    if not isinstance(body, dict):
        raise RequestError("body: must be a JSON object")
    extra = sorted(set(line) - {"custom_id", "method", "url", "body"})
    ignored = [f"body.{k}" for k in _check_fields(body, endpoint)] + extra
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("body.model: must be a string")
    if endpoint == "chat":
        messages, prompt = _messages(body.get("messages")), None
    else:
        messages, prompt = None, _prompt(body.get("prompt"))
    return BatchRequest(
        custom_id, endpoint, model, messages, prompt, _overrides(body, endpoint), tuple(ignored)
    )


def _check_fields(body: dict[str, Any], endpoint: Endpoint) -> list[str]:
    """The body's ignored fields; raises on an unsupported one."""
    ignored = []
    for key, value in body.items():
        if key in UNSUPPORTED and value is not None:
            raise RequestError(f"body.{key}: not supported by batchrun")
        if key in _ZERO_OK:
            if value not in (None, _ZERO_OK[key]):
                raise RequestError(
                    f"body.{key}: only {json.dumps(_ZERO_OK[key])} is supported (got {value!r})"
                )
        elif key not in _KNOWN[endpoint] and key not in UNSUPPORTED:
            ignored.append(key)
    return ignored


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RequestError("body.messages: must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"body.messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where}: must be an object with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise RequestError(
                f"{where}.role: {role!r} is not supported (use one of {', '.join(sorted(_ROLES))})"
            )
        for key in ("tool_calls", "function_call", "audio"):
            if m.get(key) is not None:
                raise RequestError(f"{where}.{key}: not supported by batchrun")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(value: Any, where: str) -> str:
    """Message content as text: a string, or a list of text parts (joined); other parts are refused."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise RequestError(f"{where}: must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}[{j}]: content part type {kind!r} is not supported (text only)")
        texts.append(part["text"])
    return "".join(texts)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str) or not value:
        raise RequestError("body.prompt: must be a non-empty string (one prompt per request)")
    return value


def _overrides(body: dict[str, Any], endpoint: Endpoint) -> dict[str, Any]:
    """The SamplingParams fields the request sets."""
    out: dict[str, Any] = {}
    newer = endpoint == "chat" and body.get("max_completion_tokens") is not None
    key = "max_completion_tokens" if newer else "max_tokens"
    skipped = {"max_tokens", "max_completion_tokens"} - {key}
    for name, (field, _, _) in OPENAI_NUMBERS.items():
        if name not in skipped and body.get(name) is not None:
            out[field] = _checked_number(body[name], name)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("body.stop: must be a string or a list of non-empty strings")
        out["stop"] = tuple(stop)
    if _wants_logprobs(body, endpoint):
        out["logprobs"] = True
    schema = _response_format(body.get("response_format"))
    if schema is not None:
        out["json_schema"] = json.dumps(schema, sort_keys=True)
    return out


def _wants_logprobs(body: dict[str, Any], endpoint: Endpoint) -> bool:
    """Chat: `logprobs: true` (top_logprobs 0); completions: `logprobs: 0`. Top alternatives are refused:
    the engine returns the sampled token's log-probability only."""
    value = body.get("logprobs")
    if endpoint == "chat":
        if value is not None and not isinstance(value, bool):
            raise RequestError("body.logprobs: must be true or false")
        if body.get("top_logprobs") not in (None, 0):
            raise RequestError("body.top_logprobs: only 0 is supported (the sampled token's logprob)")
        return bool(value)
    if value is None:
        return False
    if _int(value, "body.logprobs", Range(low=0)) != 0:
        raise RequestError("body.logprobs: only 0 is supported (the sampled token's logprob)")
    return True


def _response_format(value: Any) -> dict[str, Any] | None:
    """The JSON schema a response_format asks for (None: free text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return PERMISSIVE_OBJECT
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError("body.response_format.json_schema.schema: must be a JSON schema object")
        return schema
    raise RequestError(f"body.response_format.type: must be text, json_object or json_schema (got {kind!r})")


def _checked_number(value: Any, body_field: str) -> int | float:
    """The value of a body field of OPENAI_NUMBERS, checked against its accepted range."""
    hint = _HINTS[OPENAI_NUMBERS[body_field][0]]
    check = _int if int in (hint, *typing.get_args(hint)) else _number
    return check(value, f"body.{body_field}", accepted_range(body_field))


_HINTS = typing.get_type_hints(SamplingParams)  # without the bounds: int, float, int | None


def _int(value: Any, where: str, accepted: Range) -> int:
    assert accepted.high is None, "an integer field with a highest value: say so in the message"
    low = None if accepted.low is None else int(accepted.low) + accepted.low_open  # lowest integer
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise RequestError(
            f"{where}: must be an integer" + (f" >= {low}" if low is not None else "") + f" (got {value!r})"
        )
    return value


def _number(value: Any, where: str, accepted: Range) -> float:
    low, high = accepted.low, accepted.high
    assert low is not None and high is not None, "a number field without both ends: say so in the message"
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"{where}: must be a number from {low:g} to {high:g} (got {value!r})")
    if accepted.low_open and value == low:
        raise RequestError(f"{where}: must be > {low:g}")
    if accepted.high_open and value == high:
        raise RequestError(f"{where}: must be < {high:g}")
    return float(value)
