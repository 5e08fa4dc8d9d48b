"""Structured output in the engine: grammar checks, the bitmask, and constrained generation end to end."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from runner.engine import Engine, EngineConfig, Request, SamplingParams
from runner.engine.core.sequence import Sequence
from runner.engine.sample.grammar import GrammarError, check_grammar
from runner.engine.sample.sampler import apply_token_bitmask
from runner.engine.text.tokenizer import Tokenizer, load_tokenizer
from tests.engine.conftest import with_eager_pieces
from tests.helpers import tiny_llama, tiny_tokenizer

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "size": {
            "type": "object",
            "properties": {
                "w": {"type": "integer", "minimum": 0, "maximum": 99},
                "unit": {"enum": ["cm", "in"]},
            },
            "required": ["w", "unit"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["color", "count", "size", "tags", "name"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


def _engine(model, tok, async_mode=True) -> Engine:
    return Engine(
        model, EngineConfig(device="cpu", kv_cache_tokens=4096, async_mode=async_mode), tokenizer=tok
    )


def _run(engine, prompts, params):
    out = list(engine.generate(Request(i, p, params) for i, p in enumerate(prompts)))
    return sorted(out, key=lambda c: c.id)


def _sequence(order: int, matcher: int | None = None) -> Sequence:
    """A one-token sequence as the grammar worker sees it (the grammar tests drive `Grammars` directly)."""
    return Sequence(order, 0, SamplingParams(), 1, [5], seed=0, order=order, matcher=matcher)


def _prompts(tok, n):
    return [tok(f"Row {i}: describe a box.")["input_ids"] for i in range(n)]


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        (("json_schema", '{"type": "nope"}'), 'Unsupported type "nope"'),
        (
            ("json_schema", "{"),
            "not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (("regex", "(ab"), "Regex parsing error at position 4: The parenthesis is not closed."),
        (("choice", ("a", "")), "give at least one non-empty choice"),
    ],
)
def test_check_grammar_says_what_is_wrong(grammar, message):
    with pytest.raises(GrammarError) as e:
        check_grammar(grammar)
    assert str(e.value) == message


def test_apply_token_bitmask_keeps_exactly_the_allowed_tokens():
    logits = torch.zeros(2, 40)
    bitmask = torch.tensor([[0b101, 0], [-1, 0b1]], dtype=torch.int32)  # [2, 2 words]: 64 >= 40 tokens
    out = apply_token_bitmask(logits, bitmask)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == list(range(33))


def test_every_json_row_validates_and_ends_with_eos(model, tok):
    engine = _engine(model, tok)
    params = SamplingParams(max_new_tokens=120, temperature=1.0, seed=3, json_schema=json.dumps(SCHEMA))
    out = _run(engine, _prompts(tok, 6), params)
    assert [c.finish_reason for c in out] == ["stop"] * 6
    for c in out:
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert c.token_ids[-1] == tok.eos_token_id  # EOS came only once the grammar could end
    assert engine.stats()["grammar_s"] > 0


@pytest.mark.gpu
def test_json_rows_validate_on_cuda(model, tok):
    """The bitmask travels from shared, page-locked host memory to the GPU asynchronously."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    engine = Engine(model, EngineConfig(device="cuda", dtype="float32", kv_cache_tokens=4096), tokenizer=tok)
    params = SamplingParams(max_new_tokens=120, temperature=1.0, seed=3, json_schema=json.dumps(SCHEMA), n=2)
    out = _run(engine, _prompts(tok, 6), params)
    assert [c.finish_reason for c in out] == ["stop"] * 12
    for c in out:
        jsonschema.validate(json.loads(c.text), SCHEMA)
    engine.close()


def test_regex_and_choice_rows_match_beside_free_rows(model, tok):
    engine = _engine(model, tok)
    prompts = _prompts(tok, 6)
    kinds = [
        SamplingParams(max_new_tokens=30, temperature=1.0, seed=1, regex=r"[0-9]{3}-[a-c]+"),
        SamplingParams(max_new_tokens=30, temperature=1.0, seed=2, choice=("red", "green", 'say "hi"')),
        SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, ignore_eos=True),  # no grammar
    ]
    out = list(engine.generate(Request(i, p, kinds[i % 3]) for i, p in enumerate(prompts)))
    out.sort(key=lambda c: c.id)
    for c in out[0::3]:
        assert c.finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-c]+", c.text), c.text
    for c in out[1::3]:
        assert c.finish_reason == "stop" and c.text in ("red", "green", 'say "hi"'), c.text
    assert [c.generated_tokens for c in out[2::3]] == [8, 8]


def test_async_and_sync_give_the_same_constrained_tokens(model, tok):
    params = SamplingParams(max_new_tokens=60, temperature=0.8, seed=5, json_schema=json.dumps(SCHEMA), n=2)
    prompts = _prompts(tok, 3)
    a = _run(_engine(model, tok, async_mode=True), prompts, params)
    s = _run(_engine(model, tok, async_mode=False), prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in s]


def test_grammar_rows_through_piece_graphs_sample_as_eager_steps(model, tok):
    """Masked steps from piece graphs (a CPU stand-in: the padded forward replayed eagerly): their logits
    wait for the bitmask in the pieces' static buffer and give the eager steps' constrained tokens."""
    params = SamplingParams(max_new_tokens=40, temperature=0.8, seed=5, json_schema=json.dumps(SCHEMA), n=2)
    prompts = _prompts(tok, 3)
    expected = _run(_engine(model, tok), prompts, params)
    engine = _engine(model, tok)
    pieces = with_eager_pieces(engine, 512)
    got = _run(engine, prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert len(pieces.widths) == engine.stats()["steps"]


def test_our_tokenizer_constrains_as_the_transformers_one_does(model, tok, tmp_path):
    """Our Tokenizer (runner/engine/text/tokenizer.py) reaches xgrammar as a transformers one of its
    folder."""
    tok.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, Tokenizer)
    params = SamplingParams(max_new_tokens=60, temperature=0.8, seed=5, json_schema=json.dumps(SCHEMA))
    prompts = _prompts(tok, 3)
    theirs = _run(_engine(model, tok), prompts, params)
    assert [(c.token_ids, c.text) for c in _run(_engine(model, ours), prompts, params)] == [
        (c.token_ids, c.text) for c in theirs
    ]


def test_length_before_the_grammar_ends(model, tok):
    schema = {"type": "object", "properties": {"t": {"type": "string", "minLength": 40}}, "required": ["t"]}
    params = SamplingParams(max_new_tokens=5, json_schema=json.dumps(schema))
    (c,) = _run(_engine(model, tok), _prompts(tok, 1), params)
    assert (c.finish_reason, c.generated_tokens, c.text) == ("length", 5, '{"t":')


def test_a_bad_grammar_is_refused_at_add(model, tok):
    engine = _engine(model, tok)
    with pytest.raises(ValueError, match=r"^request 7: sampling.regex: Regex parsing error at position 4"):
        engine.add(Request(7, [5, 6], SamplingParams(regex="(ab")))


def test_a_row_that_ignores_eos_samples_freely_once_its_grammar_ended(model, tok):
    params = SamplingParams(
        max_new_tokens=12, temperature=1.0, seed=4, choice=("red", "green"), ignore_eos=True
    )
    for c in _run(_engine(model, tok), _prompts(tok, 4), params):
        word = next(w for w in ("red", "green") if c.text.startswith(w))
        end = len(tok(word, add_special_tokens=False)["input_ids"])
        assert c.token_ids[end] == tok.eos_token_id and c.generated_tokens == 12
        assert any(t != tok.eos_token_id for t in c.token_ids[end + 1 :])  # free tokens after the grammar


def test_a_refused_token_is_reported_by_the_next_fill(tok):
    from runner.engine.sample.grammar_worker import Grammars

    grammars = Grammars(tok, len(tok), frozenset({tok.eos_token_id}), pin=False)
    (key,) = grammars.matchers(("choice", ("ab",)), 1)
    seq = _sequence(0, key)
    grammars.advance([seq], [tok.eos_token_id])  # EOS before the grammar can end: refused
    grammars.start_fill([seq], 2)
    with pytest.raises(
        RuntimeError,
        match=rf"^grammar worker: tokens sampled outside their grammar: token {tok.eos_token_id} ",
    ):
        grammars.wait_fill()
    grammars.close()


def test_the_worker_fills_grammar_rows_and_frees_the_others(tok):
    from runner.engine.sample.grammar_worker import Grammars

    grammars = Grammars(tok, len(tok), frozenset({tok.eos_token_id}), pin=False)
    seqs = [_sequence(i) for i in range(3)]
    seqs[0].matcher, seqs[2].matcher = grammars.matchers(("choice", ("ab", "b")), 2)
    grammars.start_fill(seqs, 4)  # 3 sample rows and a padding row
    bitmask = grammars.wait_fill()
    allowed = [[t for t in range(len(tok)) if bitmask[r, t // 32] >> (t % 32) & 1] for r in range(4)]
    first = {t for t in range(len(tok)) if "ab".startswith(tok.decode([t])) or tok.decode([t]) == "b"}
    assert set(allowed[0]) == set(allowed[2]) and set(allowed[0]) <= first and allowed[0]
    assert allowed[1] == allowed[3] == list(range(len(tok)))  # no grammar; padding
    grammars.close()


def test_a_killed_worker_is_an_error_that_names_it(tok):
    import os
    import signal

    from runner.engine.sample.grammar_worker import Grammars

    grammars = Grammars(tok, len(tok), frozenset({tok.eos_token_id}), pin=False)
    (key,) = grammars.matchers(("choice", ("ab",)), 1)
    os.kill(grammars._worker.pid, signal.SIGKILL)  # a real process, killed with a real signal
    grammars._worker.join()
    seq = _sequence(0, key)
    with pytest.raises(RuntimeError, match=r"^the grammar worker exited \(code -9\)$"):
        grammars.start_fill([seq], 1)
        grammars.wait_fill()
    grammars.close()
