"""Engine behaviour beyond greedy parity: seeds, n samples, stop strings, logprobs, prefix reuse, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from runner.engine import Engine, EngineConfig, Request, SamplingParams, UnsupportedModel
from tests.engine.conftest import hf_greedy, random_prompts, tiny_model

ROOMY = EngineConfig(device="cpu", kv_cache_tokens=4096, page_size=8)
TINY = EngineConfig(device="cpu", kv_cache_tokens=96, page_size=8, max_batch_tokens=16, max_seqs=4)


class CharTokenizer:
    """Token i decodes to one letter; ids below 3 are special (2 is EOS)."""

    eos_token_id = 2

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i < 3))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3)


def run(model, requests, config=ROOMY, tokenizer=None) -> dict:
    engine = Engine(model, config, tokenizer=tokenizer)
    done = {(c.id, c.sample_index): c for c in engine.generate(requests)}
    assert engine.num_unfinished == 0
    return done


def test_seed_reproduces_whatever_else_is_in_the_batch(model):
    prompt = random_prompts(1, 20, 20, seed=5)[0]
    sp = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = run(model, [Request("x", prompt, sp)])[("x", 0)].token_ids
    others = [Request(i, p, SamplingParams(max_new_tokens=9, temperature=0.7)) for i, p in
              enumerate(random_prompts(12, 5, 40, seed=6))]  # fmt: skip
    crowded = run(model, [*others[:5], Request("x", prompt, sp), *others[5:]], config=TINY)
    assert crowded[("x", 0)].token_ids == alone
    reseeded = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=99, ignore_eos=True)
    assert run(model, [Request("x", prompt, reseeded)])[("x", 0)].token_ids != alone


def test_n_samples_share_the_prompt_pages(model):
    prompt = random_prompts(1, 37, 37, seed=8)[0]
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=5, ignore_eos=True)
    engine = Engine(model, ROOMY)
    done = list(engine.generate([Request("r", prompt, sp)]))
    assert sorted(c.sample_index for c in done) == [0, 1, 2, 3]
    assert all(c.id == "r" and c.prompt_tokens == 37 and len(c.token_ids) == 12 for c in done)
    assert len({tuple(c.token_ids) for c in done}) > 1
    assert engine.stats()["prefix_hit_tokens"] == 3 * 32  # samples 1-3 reuse the 4 full pages of 8


def test_shared_system_prompt_is_reused_and_exact(model):
    system = random_prompts(1, 40, 40, seed=9)[0]
    prompts = [system + tail for tail in random_prompts(10, 1, 20, seed=10)]
    engine = Engine(model, ROOMY)
    list(engine.generate([Request("warm", system + [7], SamplingParams(max_new_tokens=1))]))
    done = {c.id: c for c in engine.generate(Request(i, p, SamplingParams(max_new_tokens=8)) for i, p in
                                             enumerate(prompts))}  # fmt: skip
    assert engine.stats()["prefix_hit_tokens"] >= 10 * 40
    for i, p in enumerate(prompts):
        assert done[i].token_ids == hf_greedy(model, p, 8)


def test_stop_string_cuts_text_and_tokens(model):
    prompt = random_prompts(1, 10, 10, seed=11)[0]
    tok = CharTokenizer()
    free = run(model, [Request(0, prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))], tokenizer=tok)
    full_ids, full_text = free[(0, 0)].token_ids, free[(0, 0)].text
    assert full_text == tok.decode(full_ids) and len(full_text) == 20
    stop = full_text[6:9]
    cut = full_text.find(stop)
    sp = SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(stop, "never-there"))
    c = run(model, [Request(0, prompt, sp)], tokenizer=tok)[(0, 0)]
    assert c.finish_reason == "stop"
    assert c.text == full_text[:cut]
    assert c.token_ids == full_ids[: cut + len(stop)]  # up to the token that completed the stop string


class CountingTokenizer(CharTokenizer):
    """A CharTokenizer that counts the token ids it decodes."""

    decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded += len(ids)
        return super().decode(ids, skip_special_tokens)


def test_a_late_stop_string_is_found_without_decoding_the_whole_text_each_step(model):
    prompt = random_prompts(1, 10, 10, seed=12)[0]
    free = run(
        model,
        [Request(0, prompt, SamplingParams(max_new_tokens=150, ignore_eos=True))],
        tokenizer=CharTokenizer(),
    )
    full_ids, full_text = free[(0, 0)].token_ids, free[(0, 0)].text
    stop = full_text[120:124]
    cut = full_text.find(stop)
    assert cut > 40  # beyond the tail that is decoded each step
    tok = CountingTokenizer()
    sp = SamplingParams(max_new_tokens=150, ignore_eos=True, stop=(stop,))
    c = run(model, [Request(0, prompt, sp)], tokenizer=tok)[(0, 0)]
    assert c.finish_reason == "stop" and c.text == full_text[:cut]
    assert c.token_ids == full_ids[: cut + len(stop)]
    steps = cut + len(stop)
    assert tok.decoded <= steps * (4 * len(stop) + 8) + 3 * steps  # whole-text decodes each step: ~steps²/2


def test_stop_token_ids_and_length(model):
    prompt = random_prompts(1, 10, 10, seed=12)[0]
    ref = hf_greedy(model, prompt, 10)
    sp = SamplingParams(max_new_tokens=10, stop_token_ids=(ref[3],), ignore_eos=True)
    c = run(model, [Request(0, prompt, sp)])[(0, 0)]
    first = ref.index(ref[3])
    assert c.token_ids == ref[: first + 1] and c.finish_reason == "stop"
    c = run(model, [Request(0, prompt, SamplingParams(max_new_tokens=3))])[(0, 0)]
    assert c.token_ids == ref[:3] and c.finish_reason == "length"


def test_logprobs_match_transformers(model):
    prompt = random_prompts(1, 15, 15, seed=13)[0]
    c = run(model, [Request(0, prompt, SamplingParams(max_new_tokens=6, logprobs=True, ignore_eos=True))])[
        (0, 0)
    ]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None)  # fmt: skip
    expected = [torch.log_softmax(lg[0], -1)[t].item() for lg, t in zip(out.logits, c.token_ids, strict=True)]
    assert c.logprobs == pytest.approx(expected, abs=1e-4)


def test_max_model_len_caps_generation(model):
    engine = Engine(model, EngineConfig(device="cpu", kv_cache_tokens=4096, max_model_len=30))
    assert engine.max_model_len == 30
    done = list(
        engine.generate([Request(0, list(range(3, 28)), SamplingParams(max_new_tokens=50, ignore_eos=True))])
    )
    assert len(done[0].token_ids) == 5 and done[0].finish_reason == "length"


def test_user_errors_say_what_to_do(model):
    engine = Engine(model, EngineConfig(device="cpu", kv_cache_tokens=64, page_size=8))
    with pytest.raises(ValueError, match=r"needs 9 KV pages, the pool has 8: raise engine.kv_cache_tokens"):
        engine.add(Request(0, [5] * 60, SamplingParams(max_new_tokens=10)))
    with pytest.raises(ValueError, match="prompt of 512 tokens leaves no room"):
        engine.add(Request(1, [5] * 512))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add(Request(2, [5], SamplingParams(stop=("x",))))
    assert engine.num_unfinished == 0 and not engine.has_unfinished()


def test_unsupported_architecture_raises_with_reason():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModel, match="model_type 'gpt2' is not in the fast path"):
        Engine(gpt2, ROOMY)


def test_step_by_step_interface(model):
    engine = Engine(model, ROOMY)
    for i, p in enumerate(random_prompts(5, 3, 12, seed=14)):
        engine.add(Request(i, p, SamplingParams(max_new_tokens=4, ignore_eos=True)))
    assert engine.num_unfinished == 5 and engine.has_unfinished()
    seen = []
    while engine.has_unfinished():
        seen += engine.step()
    assert sorted(c.id for c in seen) == list(range(5)) and engine.num_unfinished == 0
    stats = engine.stats()
    assert stats["decode_tokens"] == 5 * 3 and stats["steps"] == 4
