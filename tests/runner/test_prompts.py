"""Rows to prompts: chat messages, overrides, per-row seeds, and the messages users see for bad rows."""

from __future__ import annotations

import pytest

from jobs.spec.job import PromptSpec, SamplingSpec
from jobs.worker import prompt_config
from runner.prompts import PromptBuilder, PromptSetupError, row_seed
from tests.helpers import tiny_tokenizer


def prompt_builder(
    prompt: PromptSpec, sampling: SamplingSpec, tokenizer, max_model_len: int
) -> PromptBuilder:
    """The prompt builder of these spec sections, as the job's pipeline makes it (runner/pipeline.py)."""
    return PromptBuilder(
        prompt_config(prompt, sampling, tokenizer), sampling.params(), tokenizer, max_model_len
    )


def builder(prompt: dict, sampling: dict | None = None, max_model_len: int = 256) -> PromptBuilder:
    spec = PromptSpec.model_validate(prompt)
    return prompt_builder(
        spec, SamplingSpec.model_validate(sampling or {"max_new_tokens": 8}), tiny_tokenizer(), max_model_len
    )


def test_messages_go_through_the_chat_template_with_the_system_prompt():
    b = builder({"messages_column": "m", "system": "Be brief."})
    [row] = b.build("s.jsonl", [(0, {"m": [{"role": "user", "content": "red"}]}, None)])
    expected = tiny_tokenizer().apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "red"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert row.error is None
    assert row.prompt_ids == tiny_tokenizer()(expected, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "value, message",
    [
        ("just text", "field 'm' must be a non-empty list of {role, content} messages"),
        ([], "field 'm' must be a non-empty list of {role, content} messages"),
        ([{"role": "wizard", "content": "x"}], "field 'm' message 0: role 'wizard' is not one of"),
        ([{"role": "user"}], "field 'm' message 0: needs a text 'content'"),
        (None, "field 'm' is null"),
    ],
)
def test_bad_messages_are_row_errors(value, message):
    [row] = builder({"messages_column": "m"}).build(
        "s.jsonl", [(3, {"m": value}, None)], source="/data/s.jsonl"
    )
    assert row.prompt_ids is None and row.error.startswith(f"/data/s.jsonl row 3: {message}")


def test_a_chat_template_that_raises_is_a_row_error():
    tok = tiny_tokenizer()
    b = builder({"messages_column": "m"})
    b.tokenizer = tok.__class__(
        tokenizer_object=tok.backend_tokenizer,
        chat_template="{{ raise_exception('no assistant turns here') }}",
    )
    [row] = b.build("s.jsonl", [(0, {"m": [{"role": "user", "content": "x"}]}, None)])
    assert row.error == "s.jsonl row 0: chat template failed: TemplateError: no assistant turns here"


def test_tokenizer_without_a_chat_template_is_refused_up_front():
    tok = tiny_tokenizer()
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer)
    with pytest.raises(
        PromptSetupError, match="the model's tokenizer has none; set prompt.chat_template: false"
    ):
        prompt_builder(PromptSpec(messages_column="m"), SamplingSpec(max_new_tokens=8), plain, 256)


def test_per_row_overrides_and_seeds():
    b = builder(
        {"column": "t"}, {"max_new_tokens": 16, "temperature": 0.5, "overrides_column": "o", "seed": 7}
    )
    rows = b.build(
        "s.jsonl",
        [
            (0, {"t": "red", "o": {"max_new_tokens": 4, "temperature": 0.0}}, None),
            (1, {"t": "red"}, None),
            (2, {"t": "red", "o": {"max_new_tokens": 99}}, None),
            (3, {"t": "red", "o": {"colour": 1}}, None),
            (4, {"t": "red", "o": {"top_p": 5}}, None),
        ],
    )
    assert (rows[0].sampling.max_new_tokens, rows[0].sampling.temperature) == (4, 0.0)
    assert (rows[1].sampling.max_new_tokens, rows[1].sampling.temperature) == (16, 0.5)
    assert rows[0].sampling.seed == row_seed(7, "s.jsonl", 0) != rows[1].sampling.seed
    assert (
        rows[2].error
        == "s.jsonl row 2: field 'o': max_new_tokens 99 is over the job's sampling.max_new_tokens 16"
    )
    assert rows[3].error.startswith("s.jsonl row 3: field 'o': unknown sampling keys ['colour']")
    assert rows[4].error == "s.jsonl row 4: field 'o': top_p: Input should be less than or equal to 1"


def test_no_room_for_a_prompt_is_a_clear_error():
    with pytest.raises(
        PromptSetupError,
        match="sampling.max_new_tokens 300 leaves no room for a prompt in the model's context of 256 tokens",
    ):
        builder({"column": "t"}, {"max_new_tokens": 300})
