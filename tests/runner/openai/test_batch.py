# ruff: noqa: E501  (exact messages read best whole)
"""OpenAI request lines to prompts and sampling, and completions to output lines the `openai` types read."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion as OpenAICompletion
from openai.types.chat import ChatCompletion

from runner.engine.types import Completion, SamplingParams
from runner.openai.batch import Range, RequestError, accepted_range, parse_request
from runner.openai.prompts import BatchRequestBuilder
from runner.openai.response import BatchOutputRows, output_line
from runner.prompts import PreparedRow, PromptConfig
from tests.helpers import tiny_tokenizer


def line(url: str = "/v1/chat/completions", **body) -> dict:
    body.setdefault("messages", [{"role": "user", "content": "red"}]) if "chat" in url else body.setdefault(
        "prompt", "red"
    )
    return {"custom_id": "c1", "method": "POST", "url": url, "body": body}


def test_body_fields_become_sampling_overrides():
    req = parse_request(
        line(
            max_completion_tokens=9,
            max_tokens=4,
            temperature=1,
            top_p=0.5,
            n=2,
            stop="x",
            seed=5,
            logprobs=True,
            response_format={"type": "json_object"},
            user="u",
            store=True,
        )
    )
    assert req.overrides == {
        "max_new_tokens": 9,
        "temperature": 1.0,
        "top_p": 0.5,
        "n": 2,
        "stop": ("x",),
        "seed": 5,
        "logprobs": True,
        "json_schema": '{"type": "object"}',
    }
    assert req.ignored == ("body.user", "body.store")
    assert parse_request(line("/v1/completions", logprobs=0, max_tokens=3)).overrides == {
        "logprobs": True,
        "max_new_tokens": 3,
    }
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    assert json.loads(parse_request(line(response_format=fmt)).overrides["json_schema"]) == schema


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"custom_id": 3}, "custom_id: must be a non-empty string"),
        ({"method": "GET"}, "method: must be POST (got 'GET')"),
        ({"body": None}, "body: must be a JSON object"),
        ({"body": {"messages": []}}, "body.messages: must be a non-empty list of messages"),
        (
            {"body": {"messages": [{"role": "tool", "content": "x"}]}},
            "body.messages[0].role: 'tool' is not supported (use one of assistant, developer, system, user)",
        ),
        (
            {"body": {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}},
            "body.messages[0].content[0]: content part type 'input_audio' is not supported (text only)",
        ),
        (
            {"body": {"messages": [{"role": "user", "content": "x"}], "stream": True}},
            "body.stream: only false is supported (got True)",
        ),
        (
            {"body": {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}},
            "body.presence_penalty: only 0 is supported (got 0.5)",
        ),
        (
            {"body": {"messages": [{"role": "user", "content": "x"}], "n": 0}},
            "body.n: must be an integer >= 1 (got 0)",
        ),
        (
            {"body": {"messages": [{"role": "user", "content": "x"}], "stop": [""]}},
            "body.stop: must be a string or a list of non-empty strings",
        ),
        (
            {"body": {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}},
            "body.response_format.type: must be text, json_object or json_schema (got 'xml')",
        ),
        (
            {"url": "/v1/completions", "body": {"prompt": ["a", "b"]}},
            "body.prompt: must be a non-empty string (one prompt per request)",
        ),
        (
            {"url": "/v1/completions", "body": {"prompt": "a", "logprobs": 2}},
            "body.logprobs: only 0 is supported (the sampled token's logprob)",
        ),
    ],
)
def test_requests_batchrun_cannot_run_name_the_field(bad: dict, message: str):
    with pytest.raises(RequestError) as e:
        parse_request({**line(), **bad})
    assert str(e.value) == message


@pytest.mark.parametrize(
    "body, message",
    [
        ({"max_tokens": 0}, "body.max_tokens: must be an integer >= 1 (got 0)"),
        (
            {"max_completion_tokens": 0, "max_tokens": 0},
            "body.max_completion_tokens: must be an integer >= 1 (got 0)",
        ),
        ({"temperature": -0.5}, "body.temperature: must be a number from 0 to 2 (got -0.5)"),
        ({"temperature": 2.5}, "body.temperature: must be a number from 0 to 2 (got 2.5)"),
        ({"top_p": 1.5}, "body.top_p: must be a number from 0 to 1 (got 1.5)"),
        ({"top_p": 0}, "body.top_p: must be > 0"),
        ({"seed": 1.5}, "body.seed: must be an integer (got 1.5)"),
        ({"n": True}, "body.n: must be an integer >= 1 (got True)"),
    ],
)
def test_numbers_out_of_the_accepted_range_name_it(body: dict, message: str):
    with pytest.raises(RequestError) as e:
        parse_request(line(**body))
    assert str(e.value) == message


def test_the_accepted_ranges_are_openais_within_ours():
    """OpenAI's documented range where it is narrower (temperature <= 2), ours where ours is (top_p > 0,
    max_tokens >= 1); the edges both accept pass."""
    assert accepted_range("temperature") == Range(low=0, high=2)
    assert accepted_range("top_p") == Range(low=0, high=1, low_open=True)
    assert accepted_range("max_tokens") == Range(low=0, low_open=True)
    assert accepted_range("seed") == Range()
    req = parse_request(line(max_tokens=1, temperature=2, top_p=1, n=1, seed=-3))
    assert req.overrides == {"max_new_tokens": 1, "temperature": 2.0, "top_p": 1.0, "n": 1, "seed": -3}
    assert Range(low=0) & Range(low=0, low_open=True, high=1) == Range(low=0, high=1, low_open=True)


def builder(mismatch: str = "ignore", max_new_tokens: int = 8) -> BatchRequestBuilder:
    config = PromptConfig()
    return BatchRequestBuilder(
        config,
        SamplingParams(max_new_tokens=max_new_tokens, seed=0),
        tiny_tokenizer(),
        64,
        "/m/tiny",
        mismatch,
    )


def test_chat_requests_use_the_chat_template_and_completions_the_raw_prompt():
    tok = tiny_tokenizer()
    chat, text = builder().build("s", [(0, line(max_tokens=4), None), (1, line("/v1/completions"), None)])
    template = tok.apply_chat_template(
        [{"role": "user", "content": "red"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.prompt_ids == tok(template, add_special_tokens=False)["input_ids"]
    assert chat.sampling.max_new_tokens == 4 and text.sampling.max_new_tokens == 8
    assert text.prompt_ids == tok("red")["input_ids"]


def test_per_request_limits_and_model_mismatch():
    long = "red " * 40
    rows = builder("error").build(
        "s",
        [
            (0, line(max_tokens=64), None),
            (1, line("/v1/completions", prompt=long, max_tokens=60), None),
            (2, line(model="gpt-4o"), None),
            (3, line(model="tiny"), None),
        ],
    )
    assert [r.error for r in rows] == [
        "s row 0: body.max_tokens 64 leaves no room for a prompt in the model's context of 64 tokens",
        f"s row 1: prompt has {len(tiny_tokenizer()(long)['input_ids'])} tokens, over the limit of 4 (on_too_long: skip)",
        "s row 2: body.model 'gpt-4o' is not this job's model '/m/tiny' (input.model_mismatch: error)",
        None,
    ]
    assert builder(max_new_tokens=64).build("s", [(0, line(), None)])[0].error == (
        "s row 0: sampling.max_new_tokens (the request sets no max_tokens) 64 leaves no room for a prompt in the model's context of 64 tokens"
    )


def test_output_lines_validate_with_the_openai_types():
    rows = BatchOutputRows("/m/tiny", lambda t: f"<{t}>")
    chat = PreparedRow("s", 4, line(model="tiny", n=2), prompt_ids=[1, 2, 3])
    samples = [
        Completion(("s", 4), [5, 6], "length", 3, "ab", 0, [-0.5, -1.0]),
        Completion(("s", 4), [7], "stop", 3, "c", 1),
    ]
    [row] = rows.sample_rows(chat, samples, [None, None])
    out = output_line(row)
    body = ChatCompletion.model_validate(out["response"]["body"])
    assert (
        out["custom_id"],
        out["error"],
        body.model,
        body.usage.completion_tokens,
        body.usage.total_tokens,
    ) == ("c1", None, "tiny", 3, 6)
    assert [t.token for t in body.choices[0].logprobs.content] == ["<5>", "<6>"] and body.choices[
        1
    ].logprobs is None
    assert (row["finish_reason"], row["prompt_tokens"], row["generated_tokens"]) == ("stop", 3, 3)

    text = PreparedRow("s", 5, line("/v1/completions"), prompt_ids=[1])
    out = output_line(
        rows.sample_rows(text, [Completion(("s", 5), [9], "stop", 1, "x", 0, [-0.1])], [None])[0]
    )
    parsed = OpenAICompletion.model_validate(out["response"]["body"])
    assert (
        parsed.model == "/m/tiny"
        and parsed.choices[0].logprobs.tokens == ["<9>"]
        and parsed.choices[0].logprobs.text_offset == [0]
    )

    [failed] = rows.error_rows(PreparedRow("s", 6, None), "s line 7: invalid JSON")
    out = output_line(failed)
    assert out["custom_id"] is None and out["response"]["status_code"] == 400
    assert out["error"] == {"code": "invalid_request_error", "message": "s line 7: invalid JSON"}
    assert (failed["finish_reason"], failed["error"]) == ("error", "s line 7: invalid JSON")
