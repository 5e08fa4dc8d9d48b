"""Which tokens end a sequence: one rule for both backends (the engine and the transformers fallback).

A model may name its end-of-sequence token in four places that disagree: `generation_config.json`
(often a list: Llama 3 Instruct ends turns with <|eot_id|> there), `config.json`, the tokenizer, and
the chat template, which closes an assistant turn with its own token. A sample stops on any of them.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Union of the EOS ids of `model.generation_config`, `model.config`, `tokenizer` and the end-of-turn
    token of the tokenizer's chat template (negative ids, a "none" marker some configs use, dropped)."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        ids.update(_as_list(value))
    if tokenizer is not None:
        ids.update(_as_list(tokenizer.eos_token_id))
        if getattr(tokenizer, "chat_template", None):
            end = turn_end_token(tokenizer)
            if end is not None:
                ids.update(_as_list(tokenizer.convert_tokens_to_ids(end)))
    return frozenset(i for i in ids if i >= 0)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def turn_end_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant message, if any."""
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "REPLY"}]
    try:
        rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception as e:  # a template may refuse this conversation (e.g. it insists on a system turn)
        log.warning("chat template cannot render a test conversation (%s); no end-of-turn token", e)
        return None
    after = rendered[rendered.rindex("REPLY") + len("REPLY") :]
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    ends = [t for t in specials if after.startswith(t)]
    return max(ends, key=len) if ends else None
