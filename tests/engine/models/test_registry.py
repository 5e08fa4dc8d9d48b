"""The model registry: each model_type goes to its family's file; anything else says why it cannot run."""

from __future__ import annotations

import pytest
from transformers import Gemma2Config, GPT2Config, LlamaConfig, MistralConfig, Phi3Config

from runner.engine import UnsupportedModel
from runner.engine.models import FAMILIES, family, fast_path_reason, model_shape
from runner.engine.models.llama import PagedLlama
from tests.engine.conftest import COMMON, CONFIGS


def test_llama_family_types_map_to_the_llama_file():
    for kind in ("llama", "mistral", "qwen2", "qwen3"):
        assert family(CONFIGS[kind]()) is PagedLlama
    assert {k for k, v in FAMILIES.items() if v is PagedLlama} == {"llama", "mistral", "qwen2", "qwen3"}


def test_moe_types_map_to_their_files():
    from runner.engine.models.moe import mixtral, olmoe, qwen2_moe, qwen3_moe

    expected = {"qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "mixtral": mixtral, "olmoe": olmoe}
    for kind, module in expected.items():
        assert FAMILIES[kind].__module__ == module.__name__
    dense = {"gemma2", "gemma3_text", "gemma3", "phi3", "olmo2", "granite"}
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", *dense, *expected}


def test_dense_types_map_to_their_files():
    files = {
        "gemma2": "gemma2",
        "gemma3_text": "gemma3",
        "gemma3": "gemma3",
        "phi3": "phi3",
        "olmo2": "olmo2",
    }
    files["granite"] = "granite"
    for kind, module in files.items():
        assert FAMILIES[kind].__module__ == f"runner.engine.models.{module}"


def test_longrope_sequences_stop_at_the_original_length():
    rope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    config = Phi3Config(**COMMON, original_max_position_embeddings=64, rope_parameters=rope)
    assert model_shape(config).max_model_len == 64
    assert fast_path_reason(config) is None
    assert "is not in the fast path" in fast_path_reason(GPT2Config(n_layer=1))


def test_shape_is_read_from_the_config():
    shape = model_shape(CONFIGS["qwen3"]())
    assert (shape.num_layers, shape.hidden, shape.num_heads, shape.num_kv_heads) == (2, 64, 4, 2)
    assert shape.head_dim == 32 and shape.vocab == 256 and shape.max_model_len == 512
    assert model_shape(CONFIGS["llama"]()).head_dim == 16
    windowed = MistralConfig(**{**COMMON, "max_position_embeddings": 512}, sliding_window=100)
    assert model_shape(windowed).max_model_len == 100  # within the window, sliding == full attention


@pytest.mark.parametrize(
    "config, reason",
    [
        (
            GPT2Config(n_layer=1),
            r"model_type 'gpt2' is not in the fast path \(llama, mistral, qwen2, qwen3, gemma2, gemma3_text, "
            r"gemma3, phi3, olmo2, granite, qwen2_moe, qwen3_moe, mixtral, olmoe\)",
        ),
        (LlamaConfig(**COMMON, hidden_act="gelu"), "hidden_act 'gelu'"),
        (LlamaConfig(**COMMON, mlp_bias=True), "mlp_bias=True"),
        (Gemma2Config(**COMMON, hidden_activation="relu"), "hidden_activation 'relu'"),
        (Gemma2Config(**COMMON, use_bidirectional_attention=True), "use_bidirectional_attention"),
    ],
    ids=["gpt2", "gelu", "mlp-bias", "gemma-relu", "gemma-bidirectional"],
)
def test_unsupported_configs_say_why(config, reason):
    with pytest.raises(UnsupportedModel, match=reason):
        model_shape(config)
