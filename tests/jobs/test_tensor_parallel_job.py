"""A tensor-parallel job on the CPU as a real subprocess: the same output as one rank; a rank lost
mid-job (SIGKILL from outside) fails the job promptly, keeps what was committed, and a resume finishes
it with exactly the single-rank output."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from jobs.spec.job import load_spec
from jobs.worker import run_worker
from tests.conftest import committed_rows, read_output, write_inputs, write_spec
from tests.test_kill_resume import _visible_count, batchrun

ROWS = {"a0": 12, "a1": 13}  # write_inputs(parquet=2, jsonl=0, rows=12): a1 has one row more
SAMPLING = {"max_new_tokens": 16, "ignore_eos": True}  # greedy (temperature 0 by default)
OUTPUT = {"flush_rows": 4}
ENGINE = {"device": "cpu", "max_seqs": 4}


def _spec(path: Path, model_dir: Path, tensor_parallel: int, out: str) -> Path:
    return write_spec(
        path,
        model_dir,
        sampling=SAMPLING,
        output={**OUTPUT, "path": out},
        engine={**ENGINE, "tensor_parallel": tensor_parallel},
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir: Path) -> tuple[Path, dict[str, list[dict]]]:
    """The inputs, and the output of the same job on one rank (in-process) to compare against."""
    root = tmp_path_factory.mktemp("tp-job")
    write_inputs(root / "in", parquet=2, jsonl=0, rows=12)
    reference = _spec(root / "ref.yaml", tiny_model_dir, 1, "ref")
    run_worker(load_spec(reference), show_progress=False)
    output = read_output(root / "ref")
    assert {k: [r["_row"] for r in v] for k, v in output.items()} == {
        k: list(range(n)) for k, n in ROWS.items()
    }
    assert all(r["generated_tokens"] == SAMPLING["max_new_tokens"] for v in output.values() for r in v)
    return root, output


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc/*/stat's ppid."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        parents[int(text[: text.index(" ")])] = int(text[text.rindex(")") + 2 :].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _followers(pid: int) -> list[int]:
    """The spawned tensor-parallel ranks under `pid` (not multiprocessing's resource tracker)."""
    return [
        p
        for p in _children(pid)
        if "multiprocessing.spawn" in (cmd := _cmdline(p)) and "resource_tracker" not in cmd
    ]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.slow  # the resume below ends equal to the one-rank output too
def test_two_ranks_write_the_one_rank_output(job, tiny_model_dir: Path):
    root, reference = job
    spec = _spec(root / "tp2.yaml", tiny_model_dir, 2, "tp2")
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    assert "x 2 ranks (tensor parallel)" in err
    assert read_output(root / "tp2") == reference  # every column: ids, text, greedy tokens and text


def test_a_lost_rank_fails_the_job_promptly_and_a_resume_finishes_it_exactly(job, tiny_model_dir: Path):
    root, reference = job
    spec = _spec(root / "lost.yaml", tiny_model_dir, 2, "lost")
    out = root / "lost"
    proc = batchrun("submit", str(spec), "--no-progress", wait=False)
    try:
        deadline = time.monotonic() + 120
        while _visible_count(out) == 0:  # a part is committed: the group is running steps
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        followers = _followers(proc.pid)
        assert len(followers) == 1, [(p, _cmdline(p)) for p in _children(proc.pid)]
        rank1 = followers[0]
        assert proc.poll() is None, "the job finished before the kill: give it more work"
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err[-3000:]
    assert took < 30, took
    assert f"tensor-parallel rank 1 (pid {rank1}) exited with code -9" in err, err[-3000:]
    assert "The engine failed: RankLost: tensor-parallel rank 1" in err, err[-3000:]
    assert "Every finished row is committed" in err
    assert _gone(rank1)

    committed = committed_rows(out)
    total = sum(len(v) for v in committed.values())
    assert 0 < total < sum(ROWS.values()), "the kill came after the job had done every row"
    for stem, rows in committed.items():
        assert len(rows) == len(set(rows)), f"duplicate committed rows in {stem}"
        assert set(rows) <= set(range(ROWS[stem])), stem

    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    final = read_output(out)
    assert final == reference  # no row lost, none duplicated, the same greedy generations
    for stem, rows in committed.items():
        assert set(rows) <= {r["_row"] for r in final[stem]}
    assert not list(out.rglob("*.parts")) and not list(out.rglob(".tmp-*"))


@pytest.mark.gpu
def test_two_gpus_write_every_row_once(job, tiny_model_dir: Path):
    """On 2 GPUs (NCCL, decode steps in CUDA graphs): the whole runner writes every row exactly once."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    root, reference = job
    spec = write_spec(
        root / "gpu.yaml",
        tiny_model_dir,
        sampling=SAMPLING,
        output={**OUTPUT, "path": "gpu"},
        engine={"device": "cuda", "dtype": "float32", "tensor_parallel": 2},
    )
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    assert "x 2 ranks (tensor parallel)" in err
    output = read_output(root / "gpu")
    assert {k: [r["_row"] for r in v] for k, v in output.items()} == {
        k: list(range(n)) for k, n in ROWS.items()
    }
    assert all(r["generated_tokens"] == SAMPLING["max_new_tokens"] for v in output.values() for r in v)
