import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runner.engine.core.stops import whole_characters
from runner.engine.types import Completion, Request, SamplingParams
from runner.hf_backend import TransformersBackend
from tests.helpers import CORPUS, demo_model_path, tiny_llama, tiny_tokenizer

NEW = 24


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture
def backend(model, tokenizer):
    backend = TransformersBackend(model, tokenizer)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """10 prompts of 1 to 60 tokens: real text and random ids."""
    generator = torch.Generator().manual_seed(1)
    texts = [tokenizer(s).input_ids for s in CORPUS]
    randoms = [
        torch.randint(4, len(tokenizer), (n,), generator=generator).tolist() for n in (1, 2, 33, 47, 60)
    ]
    return texts + randoms


def reference(model, prompt: list[int], new: int = NEW) -> list[int]:
    """transformers' greedy `generate`, one prompt at a time, no EOS."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None)
    return out[0, len(prompt) :].tolist()


def run(backend: TransformersBackend, requests: list[Request]) -> list[Completion]:
    for request in requests:
        backend.add(request)
    done: list[Completion] = []
    while backend.has_unfinished():
        done.extend(backend.step())
    return sorted(done, key=lambda c: (str(c.id), c.sample_index))


def test_greedy_equals_generate(backend, model, prompts):
    sampling = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    done = run(backend, [Request(f"r{i:02d}", p, sampling) for i, p in enumerate(prompts)])
    assert [c.id for c in done] == [f"r{i:02d}" for i in range(len(prompts))]
    for completion, prompt in zip(done, prompts, strict=True):
        assert completion.token_ids == reference(model, prompt)
        assert completion.finish_reason == "length"
        assert completion.prompt_tokens == len(prompt)
    assert backend.num_unfinished == 0
    assert backend.stats()["generated_tokens"] == NEW * len(prompts)


def test_fed_incrementally_while_others_run(backend, model, prompts):
    sampling = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    done: list[Completion] = []
    for i, prompt in enumerate(prompts):  # at most 3 in flight: the pipeline's back-pressure
        backend.add(Request(i, prompt, sampling))
        while backend.num_unfinished >= 3:
            done.extend(backend.step())
    while backend.has_unfinished():
        done.extend(backend.step())
    assert {c.id: c.token_ids for c in done} == {i: reference(model, p) for i, p in enumerate(prompts)}


def test_eos_and_stop_token_ids(tokenizer, prompts):
    prompt = prompts[0]
    free = reference(tiny_llama(tokenizer), prompt)
    eos = free[5]
    first = free.index(eos)
    backend = TransformersBackend(tiny_llama(tokenizer, eos_token_id=eos), tokenizer)
    try:
        stopped, ignored, stop_id = run(
            backend,
            [
                Request("a", prompt, SamplingParams(max_new_tokens=NEW)),
                Request("b", prompt, SamplingParams(max_new_tokens=NEW, ignore_eos=True)),
                Request(
                    "c",
                    prompt,
                    SamplingParams(max_new_tokens=NEW, ignore_eos=True, stop_token_ids=(free[2],)),
                ),
            ],
        )
    finally:
        backend.close()
    assert (stopped.token_ids, stopped.finish_reason) == (free[: first + 1], "stop")  # EOS is kept
    assert (ignored.token_ids, ignored.finish_reason) == (free, "length")
    assert (stop_id.token_ids, stop_id.finish_reason) == (free[: free.index(free[2]) + 1], "stop")


def test_stop_string_cuts_the_text(backend, model, tokenizer, prompts):
    free = reference(model, prompts[1])
    text = tokenizer.decode(free, skip_special_tokens=True)
    stop = text[6:9]
    (done,) = run(
        backend, [Request("s", prompts[1], SamplingParams(max_new_tokens=NEW, stop=(stop, "never")))]
    )
    assert done.finish_reason == "stop"
    assert done.text == text[: text.index(stop)]
    n = len(done.token_ids)
    assert done.token_ids == free[:n]
    assert stop in tokenizer.decode(free[:n]) and stop not in tokenizer.decode(free[: n - 1])


def test_text_is_decoded_without_special_tokens(backend, tokenizer):
    prompt = tokenizer("Name three colors:").input_ids
    (done,) = run(backend, [Request("t", prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))])
    # cut at the length limit: a character the limit split is held back, as the engine does
    assert done.finish_reason == "length" and not done.text.endswith("\ufffd")
    assert done.text == whole_characters(tokenizer, done.token_ids)
    assert tokenizer.decode(done.token_ids, skip_special_tokens=True).startswith(done.text)


def test_n_greedy_samples_are_copies(backend, model, prompts):
    done = run(backend, [Request("n", prompts[2], SamplingParams(max_new_tokens=NEW, ignore_eos=True, n=3))])
    assert [c.sample_index for c in done] == [0, 1, 2]
    assert [c.token_ids for c in done] == [reference(model, prompts[2])] * 3


def test_sampling_with_top_k_1_is_greedy(backend, model, prompts):
    sampling = SamplingParams(
        max_new_tokens=NEW, ignore_eos=True, temperature=0.7, top_k=1, n=2, logprobs=True
    )
    done = run(backend, [Request("k", prompts[3], sampling)])
    assert [c.sample_index for c in done] == [0, 1]
    for completion in done:
        assert completion.token_ids == reference(model, prompts[3])
        assert completion.logprobs == [0.0] * NEW  # one token left: probability 1


def test_min_p_1_is_greedy(backend, model, prompts):
    sampling = SamplingParams(max_new_tokens=NEW, ignore_eos=True, temperature=1.0, min_p=1.0, seed=3)
    (done,) = run(backend, [Request("m", prompts[5], sampling)])
    assert done.token_ids == reference(model, prompts[5])


def test_sampling_draws_from_the_model(backend, tokenizer, prompts):
    sampling = SamplingParams(max_new_tokens=NEW, ignore_eos=True, temperature=1.0, top_p=0.9, seed=0, n=4)
    backend.add(Request("p", prompts[4], sampling))
    backend.add(Request("g", prompts[4], SamplingParams(NEW)))
    done: list[Completion] = []
    while backend.has_unfinished():
        done.extend(backend.step())
    # greedy needs another transformers manager: "g" starts once the sampling one has drained
    assert [c.id for c in done] == ["p", "p", "p", "p", "g"]
    assert backend.stats()["managers_started"] == 2
    samples = {tuple(c.token_ids) for c in done if c.id == "p"}
    assert len(samples) > 1  # 4 samples of 24 tokens from a near-uniform random model differ
    assert all(len(s) == NEW and all(0 <= t < len(tokenizer) for t in s) for s in samples)


def test_too_long_prompt_is_refused(backend):
    with pytest.raises(ValueError) as e:
        backend.add(Request("long", list(range(4, 200)), SamplingParams(max_new_tokens=100)))
    assert str(e.value) == (
        "request 'long': prompt (196 tokens) + max_new_tokens (100) exceeds the model's 256 positions "
        "(shorten the prompt or lower max_new_tokens)"
    )
    assert not backend.has_unfinished()


def test_process_exits_without_close(tmp_path):
    script = tmp_path / "no_close.py"
    script.write_text(
        "from runner.engine.types import Request, SamplingParams\n"
        "from runner.hf_backend import TransformersBackend\n"
        "from tests.helpers import tiny_llama, tiny_tokenizer\n"
        "tokenizer = tiny_tokenizer()\n"
        "backend = TransformersBackend(tiny_llama(tokenizer), tokenizer)\n"
        "backend.add(Request(0, [5, 6, 7], SamplingParams(max_new_tokens=4)))\n"
        "while backend.has_unfinished():\n"
        "    backend.step()\n"
        "backend.add(Request(1, [5, 6, 7], SamplingParams(max_new_tokens=200)))\n"
        "print('exiting')\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "exiting\n"), done.stderr


def test_demo_model_names_three_colors():
    backend = TransformersBackend.from_pretrained(demo_model_path())
    try:
        tokenizer = backend.tokenizer
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Name three colors."}], tokenize=False, add_generation_prompt=True
        )
        (prompt,) = tokenizer([text], add_special_tokens=False)["input_ids"]
        (done,) = run(backend, [Request("colors", prompt, SamplingParams(max_new_tokens=32))])
    finally:
        backend.close()
    assert done.text == "1. Red\n2. Blue\n3. Green"
    assert done.finish_reason == "stop"
    assert done.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert backend.max_model_len == 8192


def test_a_grammar_is_refused_with_the_way_out(backend):
    with pytest.raises(ValueError) as e:
        backend.add(Request("r", [5, 6], SamplingParams(regex="[a-z]+")))
    assert str(e.value) == (
        "request 'r': sampling.regex (structured output) needs the batchrun engine; the transformers "
        "backend does not constrain output (set engine.backend: batchrun)"
    )
    assert backend.num_unfinished == 0
