"""A Llama-family `config.json` read without transformers, for a start-up that never imports it.

Importing any transformers config or model class costs 4-7 s of a job's start-up (its modules pull
in sympy, torch._dynamo and scikit-learn), more than loading the tokenizer, the weights and building
the engine together. For the model types below, the engine needs only a few config fields, so it
reads them from the file: `read_light_config` returns them as an attribute namespace shaped like a
transformers config (rope settings merged into `rope_parameters`, as transformers 5 does), or None
when the folder needs transformers after all: another model type, a field the file leaves to a
transformers default, or a rope type that `layers.rope.rotary_of` does not compute. Those models
load through transformers as before; the result is the same model either way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from runner.engine.layers.rope import ROPE_TYPES

log = logging.getLogger(__name__)

LIGHT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# read by the Llama family with no default that holds for every one of these types: a file without
# them takes transformers' per-type defaults, so it loads through transformers
REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
)
# model types whose default for a field differs from the Llama family's (hidden // heads; no window)
REQUIRED_BY_TYPE = {"qwen3": ("head_dim",), "mistral": ("sliding_window",)}


def read_light_config(path: str | Path) -> SimpleNamespace | None:
    """The model folder's config as transformers would build it, or None when it needs transformers."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    raw = json.loads(file.read_text())
    reason = _not_light(raw)
    if reason is not None:
        log.debug("%s loads through transformers: %s", path, reason)
        return None
    config = dict(raw)
    config["head_dim"] = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    config["rope_parameters"] = rope_parameters(raw)
    if raw["model_type"] in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        config["sliding_window"] = None  # Qwen's window applies only with use_sliding_window
    return SimpleNamespace(**config)


def rope_parameters(raw: dict) -> dict:
    """Rope settings in transformers 5's form: `rope_parameters` (or the older `rope_scaling`) with
    `rope_type` and `rope_theta` in it, and the pretraining length for the scaled types."""
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", raw.get("rope_theta"))
    if rope["rope_type"] in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", raw["max_position_embeddings"])
    return rope


def _not_light(raw: dict) -> str | None:
    kind = raw.get("model_type")
    if kind not in LIGHT_MODEL_TYPES:
        return f"model_type {kind!r} is read by transformers"
    missing = [k for k in (*REQUIRED, *REQUIRED_BY_TYPE.get(kind, ())) if k not in raw]
    if missing:
        return f"config.json leaves {', '.join(missing)} to transformers' defaults"
    if raw.get("layer_types") and any(t != "full_attention" for t in raw["layer_types"]):
        return "per-layer attention types"
    rope = rope_parameters(raw)
    if rope["rope_theta"] is None:
        return "config.json leaves rope_theta to transformers' default"
    if rope["rope_type"] not in ROPE_TYPES:
        return f"rope_type {rope['rope_type']!r}"
    return None
