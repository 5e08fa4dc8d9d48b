"""The one EOS rule (runner/engine/text/eos.py): both backends stop on the same tokens."""

from __future__ import annotations

import pytest

from runner.engine import Engine, EngineConfig, Request, SamplingParams
from runner.engine.text.eos import eos_token_ids
from runner.hf_backend import TransformersBackend
from tests.helpers import tiny_llama, tiny_tokenizer

END_OF_TURN = "<|eot|>"


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny tokenizer (eos `</s>` = 2) whose chat template closes a turn with its own token."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [END_OF_TURN]})
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}" + END_OF_TURN + "{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tok


def test_the_rule_takes_generation_config_list_config_tokenizer_and_end_of_turn(tokenizer):
    model = tiny_llama(tokenizer, eos_token_id=7)
    model.generation_config.eos_token_id = [5, 6, -1]
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert eot == 300
    assert eos_token_ids(model, tokenizer) == {5, 6, 7, tokenizer.eos_token_id, eot}
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    tokenizer_without_template = tiny_tokenizer()
    tokenizer_without_template.chat_template = None
    assert eos_token_ids(model, tokenizer_without_template) == {2}
    assert eos_token_ids(model, None) == frozenset()


def test_both_backends_stop_at_the_same_token(tokenizer):
    """generation_config, config and tokenizer name different EOS ids; the config's is the one that the
    model generates. The engine used to read the config only when generation_config had none."""
    prompt = tokenizer("Name three colors: red").input_ids
    free = tiny_llama(tokenizer, seed=4)
    engine = Engine(free, EngineConfig(device="cpu", kv_cache_tokens=512, page_size=8), tokenizer=tokenizer)
    [run] = engine.generate([Request(0, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))])
    tokens = run.token_ids
    stop_at = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i] and tokens[i] >= 4)

    model = tiny_llama(tokenizer, seed=4, eos_token_id=tokens[stop_at])
    model.generation_config.eos_token_id = [3]  # <unk>: never generated here
    assert tokenizer.eos_token_id == 2 and 2 not in tokens[: stop_at + 1]
    want = tokens[: stop_at + 1]
    request = Request(0, prompt, SamplingParams(max_new_tokens=12))

    engine = Engine(model, EngineConfig(device="cpu", kv_cache_tokens=512, page_size=8), tokenizer=tokenizer)
    [ours] = engine.generate([request])
    hf = TransformersBackend(model, tokenizer)
    try:
        hf.add(request)
        theirs = []
        while hf.has_unfinished():
            theirs += hf.step()
    finally:
        hf.close()
    assert (ours.token_ids, ours.finish_reason) == (want, "stop")
    assert (theirs[0].token_ids, theirs[0].finish_reason) == (want, "stop")
