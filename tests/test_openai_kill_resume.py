"""`batchrun batch` as a real subprocess, SIGKILLed at several moments and resumed: the OpenAI output
lines equal an uninterrupted run's (all but `created`, the time each body was made)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import zstandard

from tests.test_kill_resume import batchrun

KILLS = [
    "fingerprint_written",  # the spec and run.json written, nothing generated
    "row_finished:2",  # rows generated, none committed
    "before_publish:1",  # inside the first part's write
    "part_committed:1",  # the first shard's rows committed, not compacted
    "compaction_started:1",  # its errors file written, not its final file
    "compaction_final_written:1",  # its final file written, its parts not removed
]


def requests(shard: int, count: int) -> list[dict]:
    out = []
    for i in range(count):
        url = "/v1/completions" if i % 3 == 2 else "/v1/chat/completions"
        body = {"model": "tiny", "max_tokens": 3 + i % 4, "n": 1 + i % 2, "temperature": 0.7}
        if url == "/v1/completions":
            body["prompt"] = f"shard {shard} row {i}: the quick brown fox"
        else:
            body["messages"] = [{"role": "user", "content": f"shard {shard} row {i}: name three colors"}]
        if i == 4:
            body["tools"] = [{"type": "function"}]  # an error line
        out.append({"custom_id": f"s{shard}-{i}", "method": "POST", "url": url, "body": body})
    return out


def write_inputs(folder: Path) -> set[str]:
    folder.mkdir()
    ids = set()
    for shard in range(3):
        lines = requests(shard, 6 + shard)
        ids |= {r["custom_id"] for r in lines}
        text = "".join(json.dumps(r) + "\n" for r in lines).encode()
        if shard == 1:
            (folder / f"r{shard}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
        else:
            (folder / f"r{shard}.jsonl").write_bytes(text)
    return ids


def lines_of(out: Path) -> dict[str, list[dict]]:
    """{file: its lines with `created` removed} of the final files and the errors files."""
    found = {}
    for f in sorted([*out.glob("*.jsonl"), *out.glob("_batchrun/errors/*.jsonl")]):
        lines = [json.loads(line) for line in f.read_text().splitlines()]
        for line in lines:
            (line["response"]["body"] or {}).pop("created", None)
        found[str(f.relative_to(out))] = lines
    return found


def test_batch_killed_at_many_moments_then_resumed_gives_the_uninterrupted_output(
    tmp_path: Path, tiny_model_dir: Path
):
    ids = write_inputs(tmp_path / "in")
    files = sorted(str(p) for p in (tmp_path / "in").iterdir())
    args = ["batch", *files, "--model", str(tiny_model_dir), "--no-progress"]
    code, _, err = batchrun(*args, "--output", str(tmp_path / "ref"))
    assert code == 0, err[-3000:]
    reference = lines_of(tmp_path / "ref")
    assert sorted(reference) == [
        "_batchrun/errors/r0.jsonl",
        "_batchrun/errors/r1.jsonl",
        "_batchrun/errors/r2.jsonl",
        "r0.jsonl",
        "r1.jsonl",
        "r2.jsonl",
    ]
    assert {line["custom_id"] for f in ("r0.jsonl", "r1.jsonl", "r2.jsonl") for line in reference[f]} == ids

    out = tmp_path / "out"
    for kill_at in KILLS:
        code, _, err = batchrun(*args, "--output", str(out), kill_at=kill_at)
        assert code == -signal.SIGKILL, (kill_at, err[-2000:])
    code, status, err = batchrun("status", str(out / "spec.yaml"), "--json")
    assert code == 0, err
    # one shard done before the last kill: which one depends on how the rows interleaved in the batch
    assert sorted(s["state"] for s in json.loads(status)["shards"]) == ["done", "pending", "pending"]

    code, _, err = batchrun("submit", str(out / "spec.yaml"), "--no-progress")
    assert code == 0, err[-3000:]
    assert lines_of(out) == reference
    assert not list(out.rglob("*.parts")) and not list(out.rglob(".tmp-*"))
    code, _, err = batchrun(*args, "--output", str(out))
    assert code == 0 and "nothing to do" in err
