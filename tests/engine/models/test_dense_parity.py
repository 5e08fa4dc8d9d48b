"""Dense families beyond Llama (Gemma 2/3, Phi-3, OLMo 2, Granite): greedy outputs equal transformers'
generate token for token (fp32), with prompts longer than the sliding windows, roomy and tiny
(chunking, preempting) KV pools; on the CPU and, marked gpu, on CUDA (the Triton kernels)."""

from __future__ import annotations

import random

import pytest
from transformers import (
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GraniteConfig,
    Olmo2Config,
    Phi3Config,
    SiglipVisionConfig,
)

from tests.engine.conftest import COMMON, hf_greedy, random_prompts, tiny_model
from tests.engine.models.parity import (  # noqa: F401 (collected here, on this module's `case`)
    test_cuda_fp32_roomy_and_tiny,
    test_roomy_pool,
    test_tiny_pool_chunks_and_preempts,
)

WINDOW = 24  # prompts run to 90 tokens: most of them leave the window
# untied: with tied embeddings (scaled by sqrt(hidden)) a tiny random Gemma repeats its input token
# longrope models run to original_max_position_embeddings (past it transformers recomputes a sequence's
# cache with the long factors): prompts and generations stay within it
LONGROPE_ORIGINAL = 64
DENSE_CONFIGS = {
    # sliding / full alternation, attention and final soft-capping (small caps: tanh far from linear)
    "gemma2": lambda: Gemma2Config(
        **COMMON,
        tie_word_embeddings=False,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),  # fmt: skip
    # per-head q/k norms, local and global ropes (the global one linearly scaled), 2 sliding : 1 full
    "gemma3_text": lambda: Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3},
        tie_word_embeddings=False,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),  # fmt: skip
    # an image-text checkpoint (Gemma3ForConditionalGeneration): its text tower runs, the vision tower is
    # never needed for text prompts; the LM head is tied to the tower's embeddings
    "gemma3-image-text": lambda: Gemma3Config(
        text_config=DENSE_CONFIGS["gemma3_text"]().to_dict(),
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ).to_dict(),
        mm_tokens_per_image=4,
        image_token_index=250,
        boi_token_index=251,
        eoi_token_index=252,
    ),  # fmt: skip
    # Phi-3-mini-4k: a sliding window over every layer, fused qkv and gate_up
    "phi3": lambda: Phi3Config(**COMMON, sliding_window=WINDOW, tie_word_embeddings=False),
    # Phi-4-mini / Phi-3.5: longrope (its short factors and attention scaling), partial rotary
    "phi3-longrope-partial": lambda: Phi3Config(
        **COMMON,
        tie_word_embeddings=False,
        original_max_position_embeddings=LONGROPE_ORIGINAL,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 1e4,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.1, 1.3, 1.6],
            "long_factor": [2.0, 3.0, 5.0, 9.0],
        },
    ),  # fmt: skip
    # norms after attention and MLP only, q/k norms over all heads
    "olmo2": lambda: Olmo2Config(**COMMON, tie_word_embeddings=False),
    # embedding / residual / attention / logit multipliers; dynamic rope (the default one within 512)
    "granite": lambda: GraniteConfig(
        **COMMON,
        embedding_multiplier=6.0,
        residual_multiplier=0.3,
        attention_multiplier=0.2,
        logits_scaling=0.5,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0},
    ),  # fmt: skip
}
LONGEST_PROMPT = {"phi3-longrope-partial": LONGROPE_ORIGINAL - 24}
NUM_PROMPTS = 20


@pytest.fixture(scope="module", params=sorted(DENSE_CONFIGS))
def case(request, one_thread):
    """(model, prompts, max_new per prompt, transformers' tokens) for one dense configuration."""
    model = tiny_model(DENSE_CONFIGS[request.param]())
    prompts = random_prompts(NUM_PROMPTS, 1, LONGEST_PROMPT.get(request.param, 90), seed=4)
    rng = random.Random(5)
    max_new = [rng.randint(1, 24) for _ in prompts]
    reference = [hf_greedy(model, p, n) for p, n in zip(prompts, max_new, strict=True)]
    return model, prompts, max_new, reference


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_the_sliding_window_changes_the_tokens(kind, one_thread):
    """Without its window, the same model generates other tokens: the parity above checks the window."""
    windowed, full = DENSE_CONFIGS[kind](), DENSE_CONFIGS[kind]()
    full.sliding_window = 512
    prompts = [p for p in random_prompts(NUM_PROMPTS, 1, 90, seed=4) if len(p) > 2 * WINDOW][:4]
    tokens = [[hf_greedy(tiny_model(c), p, 8) for p in prompts] for c in (windowed, full)]
    assert tokens[0] != tokens[1]
