"""Fixtures shared across the suite: a tiny model saved as a local HF folder, and job builders."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import save_tiny_model


@pytest.fixture(autouse=True)
def _root_log_level():
    """The CLI's -v/-q set the root logger's level; a test that runs it in-process must not change what
    later tests' caplog sees."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "batch",
    "rows",
    "shards",
    "output",
    "name",
    "three",
    "colors",
    "red",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama and its tokenizer, saved as a local Hugging Face folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def prompt_text(shard: int, row: int) -> str:
    """A deterministic prompt of varying length for (shard, row)."""
    n = 3 + (shard * 7 + row * 5) % 17
    return " ".join(WORDS[(shard + row * 3 + i) % len(WORDS)] for i in range(n))


def write_inputs(root: Path, parquet: int = 3, jsonl: int = 2, rows: int = 6) -> dict[str, list[str]]:
    """Parquet shards (2 row groups each) and JSONL shards (.jsonl.gz, then .jsonl.zst-free plain);
    returns {shard id: [prompt per row]}."""
    root.mkdir(parents=True, exist_ok=True)
    prompts: dict[str, list[str]] = {}
    for s in range(parquet):
        texts = [prompt_text(s, r) for r in range(rows + s)]
        table = pa.table({"id": [f"p{s}-{r}" for r in range(len(texts))], "text": texts})
        pq.write_table(table, root / f"a{s}.parquet", row_group_size=max(1, len(texts) // 2))
        prompts[f"a{s}.parquet"] = texts
    for s in range(jsonl):
        texts = [prompt_text(10 + s, r) for r in range(rows + s)]
        lines = "".join(json.dumps({"id": f"j{s}-{r}", "text": t}) + "\n" for r, t in enumerate(texts))
        name = f"b{s}.jsonl.gz" if s % 2 == 0 else f"b{s}.jsonl"
        data = gzip.compress(lines.encode()) if name.endswith(".gz") else lines.encode()
        (root / name).write_bytes(data)
        prompts[name] = texts
    return prompts


def write_spec(path: Path, model_dir: Path, **sections) -> Path:
    """A job spec over `<spec dir>/in/*` with the tiny model; keyword sections update the defaults."""
    spec = {
        "input": {"path": "in"},
        "prompt": {"column": "text"},
        "model": {"path": str(model_dir)},
        "sampling": {"max_new_tokens": 8},
        "output": {"path": "out", "flush_rows": 4, "keep_columns": ["id", "text"], "include_token_ids": True},
        "engine": {"backend": "auto"},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    prompt = spec["prompt"]
    if "chat_template" not in prompt and not prompt.get("messages_column"):
        prompt["chat_template"] = False  # on by default for a model with one; the tests' references are raw
    path.write_text(yaml.safe_dump(spec))
    return path


def read_output(out: Path, ext: str = ".parquet") -> dict[str, list[dict]]:
    """{shard stem: rows} of every final output file under `out`."""
    result = {}
    for f in sorted(out.rglob(f"*{ext}")):
        if "_batchrun" in f.parts:
            continue
        result[str(f.relative_to(out))[: -len(ext)]] = pq.read_table(f).to_pylist()
    return result


def committed_rows(out: Path) -> dict[str, list[int]]:
    """{shard stem: sorted _row of every visible part, or of the final file where it exists}, read from
    the files directly, not through batchrun."""
    rows: dict[str, list[int]] = {}
    for f in out.rglob("*.parquet"):
        rel = f.relative_to(out)
        if rel.parts[0] == "_batchrun" or f.name.startswith(".tmp-"):
            continue
        in_parts = f.parent.name.endswith(".parts")
        stem = str(rel.parent)[: -len(".parts")] if in_parts else str(rel)[: -len(".parquet")]
        if in_parts and (out / f"{stem}.parquet").exists():
            continue  # parts left by a kill after the final file was written: the final file rules
        rows.setdefault(stem, []).extend(pq.read_table(f, columns=["_row"]).column("_row").to_pylist())
    return {k: sorted(v) for k, v in rows.items()}


S3_BUCKET = "batchrun-test"


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A real S3 API over HTTP on 127.0.0.1 (moto's server) while the block runs; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server, shared by the session; yields its URL."""
    with moto_server() as url:
        yield url


@pytest.fixture
def s3(s3_server: str, monkeypatch) -> tuple[fsspec.AbstractFileSystem, str, dict]:
    """An empty bucket on a freshly reset moto server: (filesystem, bucket, storage_options).

    Credentials come from the standard AWS environment variables (subprocesses inherit them).
    """
    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")).close()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = {"client_kwargs": {"endpoint_url": s3_server}, "default_block_size": 5 * 2**20}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, **options)
    fs.mkdir(S3_BUCKET)
    return fs, S3_BUCKET, options
