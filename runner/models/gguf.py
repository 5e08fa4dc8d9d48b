"""GGUF files to Hugging Face folders, converted once into the batchrun cache.

Converted folders live under `$BATCHRUN_CACHE/models/` (default `~/.cache/batchrun/models/`). A conversion
writes into a temporary folder and renames it into place under a file lock, so a killed conversion never
leaves a folder that looks complete and concurrent converters do the work once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from pathlib import Path
from typing import BinaryIO

from runner.engine.text.eos import turn_end_token
from runner.models.cache import ModelError, cache_dir
from runner.models.fetch import build_folder_once

SOURCE_FILE = "batchrun_source.json"  # written into every converted folder: what it was made from
# GGUF metadata value types with a fixed size (8 is a string, 9 an array)
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}

log = logging.getLogger(__name__)


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
        source = {"gguf": str(gguf_path), "size": gguf_path.stat().st_size, "sha256": sha256_file(gguf_path)}
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


def gguf_context_length(path: Path) -> int | None:
    """`<architecture>.context_length` from a GGUF file's header, read without loading the file (transformers'
    and gguf's readers take seconds); None when the header has none."""
    with open(path, "rb") as f:
        magic, _version, _tensors, count = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF":
            return None
        arch = None
        for _ in range(count):
            key = _gguf_string(f)
            value = _gguf_value(f, struct.unpack("<I", f.read(4))[0])
            if key == "general.architecture":
                arch = value
            elif arch is not None and key == f"{arch}.context_length":
                return int(value)
    return None


def _gguf_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", "replace")


def _gguf_value(f: BinaryIO, kind: int):
    if kind == 8:
        return _gguf_string(f)
    if kind == 9:
        item, n = struct.unpack("<IQ", f.read(12))
        return [_gguf_value(f, item) for _ in range(n)]
    fmt = _SCALARS[kind]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
