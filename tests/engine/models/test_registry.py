"""The model registry: each model_type goes to its family's file; anything else says why it cannot run."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, LlamaConfig, MistralConfig

from runner.engine import UnsupportedModel
from runner.engine.models import FAMILIES, family, model_shape
from runner.engine.models.llama import PagedLlama
from tests.engine.conftest import COMMON, CONFIGS


def test_llama_family_types_map_to_the_llama_file():
    for kind in ("llama", "mistral", "qwen2", "qwen3"):
        assert family(CONFIGS[kind]()) is PagedLlama
    assert {k for k, v in FAMILIES.items() if v is PagedLlama} == {"llama", "mistral", "qwen2", "qwen3"}


def test_moe_types_map_to_their_files():
    from runner.engine.models import mixtral, olmoe, qwen2_moe, qwen3_moe

    expected = {"qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "mixtral": mixtral, "olmoe": olmoe}
    for kind, module in expected.items():
        assert FAMILIES[kind].__module__ == module.__name__
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", *expected}


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
            r"model_type 'gpt2' is not in the fast path \(llama, mistral, qwen2, qwen3, qwen2_moe, "
            r"qwen3_moe, mixtral, olmoe\)",
        ),
        (LlamaConfig(**COMMON, hidden_act="gelu"), "hidden_act 'gelu'"),
        (LlamaConfig(**COMMON, mlp_bias=True), "mlp_bias=True"),
    ],
    ids=["gpt2", "gelu", "mlp-bias"],
)
def test_unsupported_configs_say_why(config, reason):
    with pytest.raises(UnsupportedModel, match=reason):
        model_shape(config)
