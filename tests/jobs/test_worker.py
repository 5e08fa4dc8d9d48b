"""The whole job in-process: shards in, engine, committed parts, compacted output, error rows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.spec.job import load_spec
from jobs.worker import run_worker
from runner.prompts import PromptTooLong
from runner.store import FingerprintMismatch
from tests.conftest import read_output, write_inputs, write_spec


def _reference_tokens(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """transformers `generate`, greedy, one prompt at a time (no padding effects)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for text in prompts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


@pytest.mark.parametrize("backend", ["auto", "transformers"])
def test_job_output_equals_transformers_generate(tmp_path: Path, tiny_model_dir: Path, backend: str):
    prompts = write_inputs(tmp_path / "in")
    spec = load_spec(write_spec(tmp_path / "spec.yaml", tiny_model_dir, engine={"backend": backend}))
    summary = run_worker(spec, show_progress=False)

    total = sum(len(p) for p in prompts.values())
    assert (summary.status, summary.rows_ok, summary.rows_error, summary.shards_done) == (
        "finished",
        total,
        0,
        5,
    )
    out = read_output(tmp_path / "out")
    assert sorted(out) == ["a0", "a1", "a2", "b0", "b1"]
    for shard_id, texts in prompts.items():
        rows = out[shard_id.split(".")[0]]
        assert [r["_row"] for r in rows] == list(range(len(texts)))
        assert [r["text"] for r in rows] == texts and all(r["_shard"] == shard_id for r in rows)
        expected = _reference_tokens(tiny_model_dir, texts, 8)
        assert [r["generated_token_ids"] for r in rows] == expected
        for r, ids in zip(rows, expected, strict=True):
            assert r["generated_tokens"] == len(ids)
            assert r["finish_reason"] == ("stop" if len(ids) < 8 else "length")
    assert not list((tmp_path / "out").rglob("*.parts"))
    report = json.loads((tmp_path / "out/_batchrun/report.json").read_text())
    assert report["rows_ok"] == total and report["generated_tokens"] == summary.generated_tokens > 0


def test_second_submit_of_a_finished_job_does_nothing(tmp_path: Path, tiny_model_dir: Path, caplog):
    write_inputs(tmp_path / "in", parquet=1, jsonl=0, rows=3)
    spec = load_spec(write_spec(tmp_path / "spec.yaml", tiny_model_dir))
    first = run_worker(spec, show_progress=False)
    before = (tmp_path / "out/a0.parquet").stat().st_mtime_ns
    caplog.set_level("INFO")
    again = run_worker(spec, show_progress=False)
    assert again == first  # the report of the run that did the work, not zeros
    assert "all 1 shards of this task are done already; nothing to do" in caplog.text
    assert (tmp_path / "out/a0.parquet").stat().st_mtime_ns == before


def test_too_long_prompt_policies(tmp_path: Path, tiny_model_dir: Path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "x.jsonl").write_text(
        json.dumps({"text": "red green blue"}) + "\n" + json.dumps({"text": " ".join(["fox"] * 40)}) + "\n"
    )
    base = {"input": {"path": "in/*.jsonl"}}

    spec = load_spec(
        write_spec(
            tmp_path / "t.yaml",
            tiny_model_dir,
            **base,
            prompt={"max_tokens": 12, "on_too_long": "truncate"},
            output={"path": "out-t"},
        )
    )
    run_worker(spec, show_progress=False)
    rows = read_output(tmp_path / "out-t")["x"]
    assert [r["prompt_tokens"] for r in rows][1] == 12 and rows[1]["finish_reason"] != "error"

    spec = load_spec(
        write_spec(
            tmp_path / "e.yaml",
            tiny_model_dir,
            **base,
            prompt={"max_tokens": 12, "on_too_long": "error"},
            output={"path": "out-e"},
        )
    )
    with pytest.raises(
        PromptTooLong,
        match=r"in/x.jsonl line 2: prompt has \d+ tokens, over the limit of 12\. "
        r"The job stops because prompt.on_too_long is 'error'",
    ):
        run_worker(spec, show_progress=False)


def test_resume_with_a_changed_spec_is_refused_naming_the_field(tmp_path: Path, tiny_model_dir: Path):
    write_inputs(tmp_path / "in", parquet=1, jsonl=0, rows=3)
    run_worker(load_spec(write_spec(tmp_path / "spec.yaml", tiny_model_dir)), show_progress=False)
    changed = load_spec(
        write_spec(tmp_path / "spec.yaml", tiny_model_dir, sampling={"max_new_tokens": 8, "temperature": 0.7})
    )
    with pytest.raises(FingerprintMismatch) as e:
        run_worker(changed, show_progress=False)
    assert "sampling.temperature: 0.0 -> 0.7" in str(e.value)
    assert "--force-new-run" in str(e.value)
    summary = run_worker(changed, force_new_run=True, show_progress=False)
    assert summary.rows_ok == 3


def test_torn_part_is_quarantined_and_its_rows_redone(tmp_path: Path, tiny_model_dir: Path):
    write_inputs(tmp_path / "in", parquet=1, jsonl=0, rows=4)
    spec = load_spec(write_spec(tmp_path / "spec.yaml", tiny_model_dir))
    reference = run_worker(spec, show_progress=False)
    expected = read_output(tmp_path / "out")["a0"]
    # Recreate the state of a killed run: one committed part, one torn part (a writer killed mid-write
    # on a filesystem without atomic rename would leave such a thing).
    rows = expected
    (tmp_path / "out/a0.parquet").unlink()
    parts = tmp_path / "out/a0.parts"
    parts.mkdir()
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows[:2]), parts / "part-000000-aaaa.parquet")
    good = parts / "part-000001-bbbb.parquet"
    pq.write_table(pa.Table.from_pylist(rows[2:]), good)
    good.write_bytes(good.read_bytes()[:-20])
    summary = run_worker(spec, show_progress=False)
    assert summary.attempts[-1]["rows_ok"] == 2 and reference.rows_ok == 4
    assert read_output(tmp_path / "out")["a0"] == expected
    assert (tmp_path / "out/_batchrun/quarantine/a0/part-000001-bbbb.parquet").exists()


def test_template_and_messages_prompts(tmp_path: Path, tiny_model_dir: Path):
    from jobs.plan import input_columns

    inp = tmp_path / "in"
    inp.mkdir()
    rows = [{"title": "red", "body": "green blue"}, {"title": "fox"}]
    (inp / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = load_spec(
        write_spec(
            tmp_path / "spec.yaml",
            tiny_model_dir,
            prompt={"column": None, "template": "{title}: {body}"},
            output={"keep_columns": ["title"]},
        )
    )
    assert input_columns(spec) == ["title", "body"]
    run_worker(spec, show_progress=False)
    out = read_output(tmp_path / "out")["t"]
    assert out[0]["finish_reason"] != "error" and out[0]["title"] == "red"
    assert (
        out[1]["error"] == f"{inp / 't.jsonl'} line 2: prompt.template needs field 'body' which the row lacks"
    )


def test_start_up_phases_in_the_summary_and_summed_over_attempts_in_the_report(
    tmp_path: Path, tiny_model_dir
):
    write_inputs(tmp_path / "in", parquet=1, jsonl=0, rows=2)
    spec = load_spec(write_spec(tmp_path / "spec.yaml", tiny_model_dir))
    first = run_worker(spec, show_progress=False)
    # the CPU path: no CUDA context, no graphs
    assert list(first.phases) == [
        "launch", "imports", "resolve_model", "tokenizer", "fingerprint", "plan",
        "model_load", "engine_build", "first_token",
    ]  # fmt: skip
    assert all(s >= 0 for s in first.phases.values()) and first.phases["model_load"] > 0
    assert any(line.startswith("start-up: launch ") for line in first.lines())

    write_inputs(tmp_path / "in2", parquet=1, jsonl=0, rows=3)
    (tmp_path / "in2/a0.parquet").rename(tmp_path / "in/a9.parquet")  # new work: a second attempt
    second = run_worker(spec, show_progress=False)
    report = json.loads((tmp_path / "out/_batchrun/report.json").read_text())
    mine, theirs = report["attempts"][1]["phases"], report["attempts"][0]["phases"]
    assert theirs == first.phases and mine.keys() == first.phases.keys()
    assert report["phases"] == {k: round(theirs[k] + mine[k], 3) for k in mine} == second.phases
    assert any(line.startswith("start-up of this attempt: launch ") for line in second.lines())
