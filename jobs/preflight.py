"""Preflight: the mistakes a spec's schema can't see, found before any model is loaded.

`batchrun validate` and `batchrun submit` run it: it lists the input shards, reads the first rows of
one shard of each kind (format and compression) and checks that the prompt's fields are there (and,
in Parquet, the columns the output keeps); checks that `output.path` is a directory (or prefix) it
can write, with a probe it creates and removes; and that a local-looking `model.path` exists,
without the network. Every problem is reported at once.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import posixpath
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jobs.spec.job import JobSpec
from runner.io.retry import StorageError, missing_credentials
from runner.io.sources import InputError, Shard, list_shards, read_shard
from runner.io.storage import is_local, url_to_fs
from runner.models.fetch import is_url
from runner.models.gguf import gguf_cache_folder, gguf_context_length
from runner.models.resolve import BUILTIN_PREFIX, ModelError, builtin_gguf, looks_local, missing_model_message
from runner.openai.batch import RequestError, parse_request

SAMPLE_ROWS = 20  # rows read from the first shard of each kind


@dataclass(slots=True, frozen=True)
class Problem:
    """One thing that would make the job fail or produce only error rows."""

    field: str  # the spec field to fix, e.g. "prompt.column"
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def preflight(spec: JobSpec) -> list[Problem]:
    """Every problem found with the inputs, the output location and the model (empty: all good)."""
    return [*check_inputs(spec), *check_output(spec), *check_model(spec)]


def format_problems(problems: list[Problem], source: str) -> str:
    lines = [f"{source}: {len(problems)} problem(s) found before starting:"]
    return "\n".join(lines + [f"  {p}" for p in problems])


# ---- inputs


def check_inputs(spec: JobSpec) -> list[Problem]:
    """The shards exist, and the first rows of each kind of shard carry the fields the prompt uses."""
    try:
        shards = list_shards(spec.input.path, spec.input.storage_options, spec.input.shard_format)
    except (InputError, StorageError) as e:
        return [Problem("input.path", str(e))]
    kinds: dict[tuple[str, str | None], Shard] = {}
    for shard in shards:
        kinds.setdefault((shard.format, shard.compression), shard)
    problems: list[Problem] = []
    for shard in kinds.values():
        try:
            rows = _first_rows(shard, spec.input.storage_options)
        except (InputError, StorageError) as e:
            problems.append(Problem("input.path", str(e)))
            continue
        problems += _check_rows(spec, shard, rows)
    return problems


def _first_rows(shard: Shard, storage_options: dict) -> list[dict]:
    batches: Iterator = read_shard(shard, storage_options, batch_rows=SAMPLE_ROWS)
    first = next(batches, [])
    batches.close()
    readable = [r.values for r in first if r.values is not None]
    if first and not readable:
        raise InputError(f"none of the first {len(first)} rows of {shard.url} can be read: {first[0].error}")
    return readable


def _check_rows(spec: JobSpec, shard: Shard, rows: list[dict]) -> list[Problem]:
    if not rows:
        return []
    seen = sorted({k for r in rows for k in r})
    where = f"the first {len(rows)} rows of {shard.url}" if len(rows) > 1 else f"the first row of {shard.url}"

    def missing(field: str, name: str, what: str = "field") -> Problem | None:
        if any(name in r for r in rows):
            return None
        close = difflib.get_close_matches(name, seen, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return Problem(field, f"no {what} {name!r} in {where} (they have: {', '.join(seen)}){hint}")

    if spec.openai_batch:
        return _check_requests(rows, where)
    p = spec.prompt
    found: list[Problem | None] = []
    if p.column:
        found.append(missing("prompt.column", p.column))
        if not found[-1] and not any(isinstance(r.get(p.column), str) for r in rows):
            found.append(Problem("prompt.column", f"field {p.column!r} is not text in {where}"))
    if p.template:
        fields = [f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(p.template) if f]
        found += [missing("prompt.template", f, "field") for f in dict.fromkeys(fields)]
    if p.messages_column:
        found.append(missing("prompt.messages_column", p.messages_column))
        if not found[-1] and not any(_is_messages(r.get(p.messages_column)) for r in rows):
            found.append(
                Problem(
                    "prompt.messages_column",
                    f"field {p.messages_column!r} is not a list of {{role, content}} messages in {where}",
                )
            )
    if shard.format == "parquet":  # a Parquet shard without a column fails; a JSONL row without it keeps null
        if spec.input.id_column:
            found.append(missing("input.id_column", spec.input.id_column))
        if isinstance(spec.output.keep_columns, list):
            found += [missing("output.keep_columns", c) for c in spec.output.keep_columns]
    return [x for x in found if x is not None]


def _check_requests(rows: list[dict], where: str) -> list[Problem]:
    """OpenAI request lines: a problem when none of the first ones can run."""
    errors = []
    for r in rows:
        try:
            parse_request(r)
            return []
        except RequestError as e:
            errors.append(str(e))
    return [Problem("input.format", f"no request in {where} can run; the first: {errors[0]}")]


def _is_messages(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in value)
    )


# ---- output


def check_output(spec: JobSpec) -> list[Problem]:
    """`output.path` is a directory (or an object-store prefix) this job can write."""
    problem = output_path_problem(spec)
    if problem:
        return [problem]
    fs, root = url_to_fs(spec.output.path, spec.output.storage_options)
    root = root.rstrip("/")
    probe = posixpath.join(root, "_batchrun", f".tmp-preflight-{os.getpid()}-{os.urandom(3).hex()}")
    created = _missing_dirs(posixpath.dirname(probe)) if is_local(fs) else []
    try:
        fs.makedirs(posixpath.dirname(probe), exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except Exception as e:
        if not isinstance(e, OSError) and not missing_credentials(e):
            raise
        return [Problem("output.path", f"{spec.output.path!r} is not writable ({type(e).__name__}: {e})")]
    finally:
        for d in created:
            with contextlib.suppress(OSError):  # only what the probe created, and only if still empty
                os.rmdir(d)
    return []


def output_path_problem(spec: JobSpec) -> Problem | None:
    """The output path is (or is under) an existing file: every command on it would fail."""
    fs, root = url_to_fs(spec.output.path, spec.output.storage_options)
    if not is_local(fs):
        return None
    path = Path(root)
    for p in [path, *path.parents]:
        if p.is_file():
            what = "is an existing file" if p == path else f"is under {str(p)!r}, an existing file"
            return Problem(
                "output.path",
                f"{spec.output.path!r} {what}, not a directory: point it at a directory (new or existing)",
            )
        if p.exists():
            return None
    return None


def _missing_dirs(root: str) -> list[str]:
    """The folders from `root` up that don't exist yet, deepest first."""
    out = []
    for p in [Path(root), *Path(root).parents]:
        if p.exists():
            break
        out.append(str(p))
    return out


# ---- model


def check_model(spec: JobSpec) -> list[Problem]:
    """A builtin model's package is installed; a local-looking path exists, and a local folder has weights
    and a tokenizer; `sampling.max_new_tokens` leaves room for a prompt in the model's context. Nothing
    goes to the network."""
    path = spec.model.path
    if is_url(path):
        return []
    if path.startswith(BUILTIN_PREFIX):
        try:
            gguf_path, _, _ = builtin_gguf(path[len(BUILTIN_PREFIX) :])
        except ModelError as e:
            return [Problem("model.path", str(e).removeprefix("model.path: "))]
        return _check_context(spec, gguf_path)
    local = Path(path).expanduser()
    if not local.exists():
        if looks_local(path):
            return [Problem("model.path", missing_model_message(path).removeprefix("model.path: "))]
        return []  # a hub id: checked when the job loads it
    if local.is_dir() and not (local / "config.json").is_file():
        return [Problem("model.path", f"{path!r} has no config.json (expected a Hugging Face model folder)")]
    if local.is_file() and local.suffix != ".gguf":
        return [Problem("model.path", f"{path!r} is a file but not a .gguf file (pass a folder or a .gguf)")]
    if local.is_dir():
        has = {what: any(next(local.glob(n), None) for n in names) for what, names in _FOLDER_PARTS.items()}
        missing = [what for what, found in has.items() if not found]
        if missing:
            return [
                Problem(
                    "model.path",
                    f"{path!r} has config.json but no {' and no '.join(missing)}: point it at a complete "
                    "Hugging Face model folder (as save_pretrained or a hub download writes it)",
                )
            ]
    return _check_context(spec, local)


# what a local model folder needs besides config.json, and the files that provide it
_FOLDER_PARTS = {
    "weights (*.safetensors or *.bin)": ("*.safetensors", "*.bin", "*.pt", "*.pth"),
    "tokenizer (tokenizer.json, tokenizer.model or vocab.json)": (
        "tokenizer.json",
        "tokenizer.model",
        "vocab.json",
    ),
}


def _check_context(spec: JobSpec, model: Path) -> list[Problem]:
    """max_new_tokens below the context (the model's, capped by engine.max_model_len), which is read from a
    folder's config.json or a GGUF file's header; an OpenAI request sets its own max_tokens (checked per
    line)."""
    context = _context_length(model)
    if context is None or spec.openai_batch:
        return []
    context = min(context, spec.engine.max_model_len or context)
    n = spec.sampling.max_new_tokens
    if n < context:
        return []
    return [
        Problem(
            "sampling.max_new_tokens",
            f"{n} leaves no room for a prompt in the model's context of {context} tokens; lower it",
        )
    ]


def _context_length(model: Path) -> int | None:
    if model.is_file():
        cached = gguf_cache_folder(model) / "config.json"
        return _config_context(cached) if cached.is_file() else gguf_context_length(model)
    return _config_context(model / "config.json")


def _config_context(path: Path) -> int | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the job's own loading says what is wrong with it
    text = config.get("text_config") or config
    value = text.get("max_position_embeddings")
    return value if isinstance(value, int) else None
