"""A model folder's tokenizer without transformers: `tokenizer.json` run by the `tokenizers` library.

`import transformers` costs ~1.5 s and its AutoTokenizer drags in the modeling code (6-10 s on the GPU
host); `tokenizers` imports in ~10 ms. `load_tokenizer` takes this path for the folders that transformers 5
loads with its generic class (`TokenizersBackend`, alias `PreTrainedTokenizerFast`), which runs
`tokenizer.json` as it is: `Tokenizer` reads `tokenizer_config.json` the way that class does and gives the
same ids, text, template and special tokens. The model-specific classes (LlamaTokenizer, Qwen2Tokenizer,
GPT2Tokenizer...) rebuild the pipeline in code from the vocabulary and merges, with their own normalizer,
pre-tokenizer and default special tokens, so what they produce is not `tokenizer.json`'s: those folders
(and any other that transformers would treat specially) load with AutoTokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from runner.engine.text.chat_template import render_chat

log = logging.getLogger(__name__)

_GENERIC_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS of transformers 5.17 and 5.24 together (models/auto/
# tokenization_auto.py): for these model types AutoTokenizer ignores a generic tokenizer_class and builds
# the model's own class (5.24 dropped the DeepSeek and Janus types that 5.17 lists; batchrun runs on both)
_CLASS_OVERRIDDEN = frozenset(
    {
        "arctic", "camembertv2-base", "chameleon", "chatlm", "cohere_asr", "deepseek_ocr", "deepseek_ocr2",
        "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "deepseek_vl", "deepseek_vl_hybrid",
        "deepseek_vl_v2", "ernie4_5", "ernie4_5_moe", "fuyu", "h2ovl_chat", "hyperclovax",
        "hyperclovax_vision_v2", "hyperclovax_vlm", "internlm2", "internlm3", "iquestcoder", "jamba",
        "janus", "llava", "llava_next", "minicpm3", "minicpmv", "minimax_m2", "modernbert",
        "modernbert-decoder", "molmo", "molmo2", "nemotron", "nvfp4", "opencua", "openvla", "paddleocr_vl",
        "phi3", "phi3_v", "phimoe", "qwen2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen4_exp",
        "siglip2", "smolvlm", "step3_vl", "step3p5", "vipllava", "vision-encoder-decoder",
    }
)  # fmt: skip


def load_tokenizer(path: str | Path, revision: str | None = None):
    """The tokenizer of a model folder or hub id: our `Tokenizer` for a local folder whose tokenizer it
    reproduces exactly, else transformers' AutoTokenizer (at `revision`, which a local folder ignores)."""
    folder = Path(path)
    reason = _why_not_ours(folder) if folder.is_dir() else "not a local folder"
    if reason is None:
        log.debug("tokenizer of %s: loaded from tokenizer.json with the tokenizers library", path)
        return Tokenizer.from_folder(folder)
    log.debug("tokenizer of %s: loaded with transformers' AutoTokenizer (%s)", path, reason)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), revision=revision)


def _why_not_ours(folder: Path) -> str | None:
    """Why transformers would load this folder's tokenizer otherwise than `Tokenizer` does (None: same)."""
    if not (folder / "tokenizer.json").is_file():
        return "no tokenizer.json"
    config = _read_json(folder / "tokenizer_config.json")
    cls = config.get("tokenizer_class")
    if cls not in _GENERIC_CLASSES:
        return f"tokenizer_class {cls!r} is not one of {sorted(_GENERIC_CLASSES)}"
    for key in ("auto_map", "fast_tokenizer_files", "fix_mistral_regex"):
        if key in config:
            return f"tokenizer_config.json sets {key}"
    for name in ("added_tokens.json", "additional_chat_templates", "tekken.json"):
        if (folder / name).exists():
            return f"the folder has {name}"
    model_type = _read_json(folder / "config.json").get("model_type")
    if model_type in _CLASS_OVERRIDDEN:
        return f"transformers overrides tokenizer_class for model_type {model_type!r}"
    template = config.get("chat_template")
    if isinstance(template, list) and "default" not in {t.get("name") for t in template}:
        return "several chat templates, none named 'default'"
    return None


class Tokenizer:
    """The part of a transformers fast tokenizer that batchrun uses, over a `tokenizers.Tokenizer`."""

    def __init__(
        self,
        backend: _Backend,
        special: dict[str, str],
        extra_special: list[str],
        chat_template: str | None,
        config: dict[str, Any],
        folder: Path,
    ) -> None:
        """Use `from_folder`; `special`: the named special tokens (bos_token, eos_token, ... then the model's
        own names); `config`: tokenizer_config.json's settings."""
        self._backend = backend
        self._special = special
        self._extra_special = extra_special
        self.chat_template = chat_template
        self._folder = folder
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"  # transformers skips it for BPE: it eats real spaces
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )
        # transformers switches these off for each call without padding or truncation: ours are all such
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` and (when the config has
        no `added_tokens_decoder`) `special_tokens_map.json` of `folder`, as transformers' TokenizersBackend
        does."""
        folder = Path(folder)
        backend = _Backend.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        added = _added_tokens(config, backend)
        special, extra = _special_tokens(config, folder)
        if special.get("pad_token") is None and backend.padding is not None:
            special["pad_token"] = backend.padding["pad_token"]
        special = {k: v for k, v in special.items() if v is not None}
        _add_missing_tokens(backend, added, special, extra)
        names = {k: str(v) for k, v in special.items()}
        extra_names = list(dict.fromkeys(str(t) for t in extra))
        return cls(backend, names, extra_names, _chat_template(config, folder), config, folder)

    # --- encoding and decoding -------------------------------------------------------------------------

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        """{"input_ids": one id list per text}, one batched call of the Rust tokenizer."""
        encodings = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}

    def decode(self, ids: int | list[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (special tokens left out when `skip_special_tokens`)."""
        text = self._backend.decode([ids] if isinstance(ids, int) else list(ids), skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def apply_chat_template(
        self, messages: list[dict], *, tokenize: bool, add_generation_prompt: bool = False
    ) -> str:
        """The prompt text of a conversation, rendered as transformers renders it. Only `tokenize=False`,
        which callers must pass: transformers' default (True) returns ids, so an omitted flag would give
        text where code written for transformers expects ids."""
        if tokenize:
            raise NotImplementedError("Tokenizer.apply_chat_template renders text only: pass tokenize=False")
        if self.chat_template is None:
            raise ValueError(
                "Cannot use chat template functions because tokenizer.chat_template is not set and no "
                "template argument was passed!"
            )
        return render_chat(self.chat_template, messages, add_generation_prompt, self._special)

    # --- vocabulary and special tokens ----------------------------------------------------------------

    def __len__(self) -> int:
        """The vocabulary size with the added tokens (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        """Id -> AddedToken (`.content`, `.special`) of the added tokens."""
        return self._backend.get_added_tokens_decoder()

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens, then the extra ones, each once."""
        return list(dict.fromkeys([*self._special.values(), *self._extra_special]))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Name -> token of the named special tokens (what a chat template sees)."""
        return dict(self._special)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int] | None:
        """The id of a token (the unknown token's id when it has none), or of each token of a list."""
        if isinstance(tokens, str):
            found = self._backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    @property
    def bos_token(self) -> str | None:
        return self._special.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        unk = self._special.get("unk_token")
        return None if unk is None else self._backend.token_to_id(unk)

    def _id_of(self, name: str) -> int | None:
        token = self._special.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    def to_transformers(self):
        """The same tokenizer as a transformers `PreTrainedTokenizerFast`, for libraries that need one
        (xgrammar); imports transformers."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(self._folder))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _chat_template(config: dict, folder: Path) -> str | None:
    # a chat_template.jinja beside the config wins over the config's entry, as in transformers
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name", "template"}, ...]: the default one (checked by load_tokenizer)
        return {t["name"]: t["template"] for t in template}.get("default")
    return template


def _added_tokens(config: dict, backend: _Backend) -> dict[int, AddedToken]:
    """The config's `added_tokens_decoder`, or (a config without one) tokenizer.json's added tokens
    (transformers parses the file again for them; the backend has them already)."""
    if "added_tokens_decoder" not in config:
        return backend.get_added_tokens_decoder()
    return {int(i): _added_token(t) for i, t in config["added_tokens_decoder"].items()}


def _added_token(value: dict, **override) -> AddedToken:
    fields = {k: v for k, v in value.items() if k not in ("__type", "id", *override)}
    return AddedToken(**fields, **override)


def _special_tokens(config: dict, folder: Path):
    """(name -> token of the named special tokens: the standard ones, then the model's own `*_token`
    names; the extra special tokens), from the config and, lacking `added_tokens_decoder`, the legacy
    special_tokens_map.json."""
    settings = dict(config)
    if "additional_special_tokens" in settings and not settings.get("extra_special_tokens"):
        settings["extra_special_tokens"] = settings.pop("additional_special_tokens")
    if "added_tokens_decoder" not in config:
        for key, value in _read_json(folder / "special_tokens_map.json").items():
            if isinstance(value, dict) and key != "extra_special_tokens":
                value = _added_token(value, special=True)
            elif key == "extra_special_tokens" and isinstance(value, list):
                merged = list(settings.get("extra_special_tokens") or [])
                merged += [t for t in value if t not in merged]
                value = merged
            settings[key] = value
        if "additional_special_tokens" in settings and "extra_special_tokens" not in settings:
            settings["extra_special_tokens"] = settings.pop("additional_special_tokens")
    special: dict[str, Any] = {name: _as_token(settings.get(name), untyped_dicts=True) for name in _NAMED}
    extra = settings.get("extra_special_tokens") or []
    own = {}
    if isinstance(extra, dict):  # {name: token}: the model's own named tokens
        own, extra = extra, []
    for key, value in settings.items():
        if key.endswith("_token") and key not in _NAMED and _as_token(value) is not None:
            special.setdefault(key, _as_token(value))
    special.update({k: _as_token(v, untyped_dicts=True) for k, v in own.items()})
    return special, [t for t in (_as_token(v, untyped_dicts=True) for v in extra) if t is not None]


def _as_token(value: Any, untyped_dicts: bool = False) -> str | AddedToken | None:
    # transformers serializes an AddedToken as a dict with "__type": "AddedToken"; a named token may also
    # be a bare {"content": ...}
    if isinstance(value, str | AddedToken):
        return value
    if (
        isinstance(value, dict)
        and "content" in value
        and (untyped_dicts or value.get("__type") == "AddedToken")
    ):
        return _added_token(value)
    return None


def _add_missing_tokens(backend: _Backend, added: dict[int, AddedToken], special: dict, extra: list) -> None:
    """Re-add the added tokens, then the special tokens the vocabulary lacks (they get new ids), as
    transformers' TokenizersBackend does when it is built."""
    tokens = [added[i] for i in sorted(added)]
    known = {t.content for t in backend.get_added_tokens_decoder().values()} | {t.content for t in tokens}
    for token in [*special.values(), *extra]:
        if str(token) not in known:
            tokens.append(token)
            known.add(str(token))
    named = {str(t) for t in special.values()}
    for i, token in enumerate(tokens):
        if isinstance(token, str):
            tokens[i] = AddedToken(token, special=True)
        elif not token.special and token.content in named:
            token.special = True
    if tokens:
        backend.add_tokens(tokens)


def _clean_up_tokenization(text: str) -> str:
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text
