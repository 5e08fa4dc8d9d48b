"""Tiny random Llama-family models built in-process, and transformers' greedy generate as the reference."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from runner.engine.worker.inputs import unpack
from runner.engine.worker.piece_graphs import PieceGraphs, token_buckets

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(
        **COMMON,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
}


def run_in_triton_interpreter(module: str) -> str:
    """Run `python -m module` with Triton's CPU interpreter (it must be chosen before Triton is first
    imported, which the suite has done by then, hence the subprocess); returns its stdout, failing
    the test if it fails. Skips when Triton is not installed."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", module], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def tiny_model(kind, seed: int = 0):
    """A 2-layer, 64-wide random model of `kind` (a name in CONFIGS, or a config) in fp32, eval mode."""
    torch.manual_seed(seed)
    config = CONFIGS[kind]() if isinstance(kind, str) else kind
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform logits (sharpen them so greedy ties are out of reach), unit norm
    # weights and zero biases (perturb them so that a norm or bias we forgot shows up).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
            else:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def random_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate for one prompt (no padding involved)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def arch(request) -> str:
    return request.param


class EagerPieces(PieceGraphs):
    """`PieceGraphs` on the CPU (a stand-in, as `EagerGraphs`): a replay runs the forward over the padded
    static inputs eagerly, its attention over the step's batch."""

    def __init__(self, forward, attention, max_tokens: int, padding) -> None:
        self.forward, self.attention, self.padding = forward, attention, padding
        self.buckets, self._pieces, self.capture_seconds, self.widths = token_buckets(max_tokens), {}, 0.0, []

    def replay(self, tokens, inputs, batch):
        self.widths.append(tokens)
        views = unpack(inputs.clone(), self.padding(tokens)[1])
        return self.forward(views, lambda q, k, v, _, *settings: self.attention(q, k, v, batch, *settings))


def with_eager_pieces(engine, max_tokens: int) -> EagerPieces:
    """Give `engine`'s runner the CPU stand-in of piece graphs, buckets up to `max_tokens`; returns it."""
    r = engine.model_runner
    r.pieces = EagerPieces(r._piece_forward, r.attention, max_tokens, r._piece_padding)
    return r.pieces
