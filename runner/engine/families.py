"""The fast path's model families by `model_type`: each a file of `models/` and its class.

Plain names, so that `batchrun models` lists them without importing torch; `models.FAMILIES` loads
the classes from here.
"""

from __future__ import annotations

FAMILY_CLASSES: dict[str, tuple[str, str]] = {  # model_type -> (file in models/, class)
    "llama": ("llama", "PagedLlama"),  # also SmolLM
    "mistral": ("llama", "PagedLlama"),
    "qwen2": ("llama", "PagedLlama"),
    "qwen3": ("llama", "PagedLlama"),
    "gemma2": ("gemma2", "PagedGemma2"),
    "gemma3_text": ("gemma3", "PagedGemma3"),
    "gemma3": ("gemma3", "PagedGemma3Tower"),  # the text tower of an image-text checkpoint
    "phi3": ("phi3", "PagedPhi3"),  # Phi-3, Phi-3.5, Phi-4-mini
    "olmo2": ("olmo2", "PagedOlmo2"),
    "granite": ("granite", "PagedGranite"),
    "qwen2_moe": ("moe.qwen2_moe", "PagedQwen2Moe"),  # routed experts + a shared expert
    "qwen3_moe": ("moe.qwen3_moe", "PagedQwen3Moe"),
    "mixtral": ("moe.mixtral", "PagedMixtral"),
    "olmoe": ("moe.olmoe", "PagedOlmoe"),
}
