# ruff: noqa: E501  (the table reads best one case per line)
"""The catalogue of bad inputs: one table, each case with the exact outcome a user sees.

A case is a few input files (or a spec patch) and its expected outcome, one of
- `rows`: the job finishes and the case's shard holds these rows, "ok" or the error row's reason;
- `raises`: the job (or the spec) is refused with this exception type and exact message;
- `failed`: the job fails this shard with this reason and commits the other shards.
Row cases of the same prompt kind share one job (one model load); `<in>` is the input folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.lease import LeaseHeld, TaskLease
from jobs.spec.job import SpecError, load_spec
from jobs.worker import JobFailed, run_worker
from runner.io.retry import StorageError
from runner.io.sources import InputError
from runner.models.resolve import ModelError
from runner.prompts import PromptTooLong
from runner.store import FingerprintMismatch, OutputStore
from tests.conftest import read_output, write_spec

LONG = " ".join(["fox"] * 300)  # 900 tokens: over the tiny model's 256-token context
ROLES = "['assistant', 'developer', 'system', 'tool', 'user']"


def jsonl(*lines: bytes | dict | list | str) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def parquet(table: pa.Table, cut: int = 0) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    return data[:-cut] if cut else data


@dataclass(frozen=True)
class Case:
    id: str
    files: dict[str, bytes] = field(default_factory=dict)  # input files, by name
    spec: dict = field(default_factory=dict)  # spec sections patched over the defaults
    rows: list[str] | None = None  # per input row: "ok" or its error reason
    raises: str | None = None  # "<Exception>: <message>"
    failed: str | None = None  # this shard's failure reason (another good shard is committed)
    model: str = "tiny"  # tiny | no_chat_template | raising_chat_template | missing
    setup: str | None = None  # a named precondition: fingerprint | lease | tmpfs


MESSAGES = {"prompt": {"column": None, "messages_column": "messages"}}
GOOD = {"id": "g", "text": "red green blue"}

CASES = [
    # ---- JSONL rows (one job for them all)
    Case("malformed_jsonl_line", {"x.jsonl": jsonl(GOOD, b'{"text": "red', GOOD)},
         rows=["ok", "<in>/x.jsonl line 2: invalid JSON (Unterminated string starting at column 10)", "ok"]),
    Case("json_array_not_object", {"x.jsonl": jsonl([1, 2])},
         rows=["<in>/x.jsonl line 1: not a JSON object (got list)"]),
    Case("json_string_not_object", {"x.jsonl": jsonl("text")},
         rows=["<in>/x.jsonl line 1: not a JSON object (got str)"]),
    Case("json_number_not_object", {"x.jsonl": jsonl(b"42", GOOD)},
         rows=["<in>/x.jsonl line 1: not a JSON object (got int)", "ok"]),
    Case("non_utf8_bytes", {"x.jsonl": jsonl(b'{"text": "caf\xe9"}')},
         rows=["<in>/x.jsonl line 1: not valid UTF-8 (byte 0xe9 at offset 13)"]),
    Case("missing_prompt_column", {"x.jsonl": jsonl({"id": 1, "body": "x"})},
         rows=["<in>/x.jsonl line 1: row has no field 'text' (fields: body, id)"]),
    Case("wrong_column_type_int", {"x.jsonl": jsonl({"text": 42})},
         rows=["<in>/x.jsonl line 1: field 'text' must be text (got int)"]),
    Case("wrong_column_type_list", {"x.jsonl": jsonl({"text": ["a", "b"]})},
         rows=["<in>/x.jsonl line 1: field 'text' must be text (got list)"]),
    Case("null_prompt", {"x.jsonl": jsonl({"text": None})},
         rows=["<in>/x.jsonl line 1: field 'text' is null"]),
    Case("empty_prompt", {"x.jsonl": jsonl({"text": ""})}, rows=["<in>/x.jsonl line 1: empty prompt"]),
    Case("blank_prompt", {"x.jsonl": jsonl({"text": " \n\t "})}, rows=["<in>/x.jsonl line 1: empty prompt"]),
    Case("extra_columns_are_fine", {"x.jsonl": jsonl({**GOOD, "extra": {"deep": [1]}, "n": None})},
         rows=["ok"]),
    Case("prompt_over_context_skip", {"x.jsonl": jsonl({"text": LONG}, GOOD)},
         rows=["<in>/x.jsonl line 1: prompt has 900 tokens, over the limit of 248 (on_too_long: skip)", "ok"]),
    Case("empty_jsonl_shard", {"x.jsonl": b""}, rows=[]),
    Case("blank_lines_only_shard", {"x.jsonl": b"\n \n\r\n"}, rows=[]),
    Case("zero_row_parquet", {"x.parquet": parquet(pa.table({"text": pa.array([], pa.string())}))}, rows=[]),
    Case("parquet_wrong_column_type", {"x.parquet": parquet(pa.table({"text": [1, 2]}))},
         rows=["<in>/x.parquet row 0: field 'text' must be text (got int)",
               "<in>/x.parquet row 1: field 'text' must be text (got int)"]),
    # ---- chat messages (one job; its model's chat template raises on the content "boom")
    Case("messages_bad_role", {"m.jsonl": jsonl({"messages": [{"role": "wizard", "content": "hi"}]})},
         spec=MESSAGES, model="raising_chat_template",
         rows=[f"<in>/m.jsonl line 1: field 'messages' message 0: role 'wizard' is not one of {ROLES}"]),
    Case("messages_not_a_list", {"m.jsonl": jsonl({"messages": "hi"})},
         spec=MESSAGES, model="raising_chat_template",
         rows=["<in>/m.jsonl line 1: field 'messages' must be a non-empty list of {role, content} messages"]),
    Case("message_without_content", {"m.jsonl": jsonl({"messages": [{"role": "user"}]})},
         spec=MESSAGES, model="raising_chat_template",
         rows=["<in>/m.jsonl line 1: field 'messages' message 0: needs a text 'content'"]),
    Case("chat_template_error", {"m.jsonl": jsonl({"messages": [{"role": "user", "content": "boom"}]},
                                                   {"messages": [{"role": "user", "content": "red"}]})},
         spec=MESSAGES, model="raising_chat_template",
         rows=["<in>/m.jsonl line 1: chat template failed: TemplateError: no boom here", "ok"]),
    # ---- whole shards
    Case("corrupt_parquet_footer",
         {"x.parquet": parquet(pa.table({"text": ["red", "blue"]}), cut=12), "ok.jsonl": jsonl(GOOD)},
         failed="<in>/x.parquet: not a readable Parquet file (Parquet magic bytes not found in footer. Either "
                "the file is corrupted or this is not a parquet file.)"),
    Case("parquet_without_prompt_column",
         {"x.parquet": parquet(pa.table({"id": [1], "prompt": ["red"]})), "ok.jsonl": jsonl(GOOD)},
         failed="<in>/x.parquet: no column 'text' (columns: id, prompt)"),
    # ---- the job refuses to run, or stops
    Case("prompt_over_context_error", {"x.jsonl": jsonl(GOOD, {"text": LONG})},
         spec={"prompt": {"on_too_long": "error"}},
         raises="PromptTooLong: <in>/x.jsonl line 2: prompt has 900 tokens, over the limit of 248. The job stops "
                "because prompt.on_too_long is 'error'; set it to 'skip' or 'truncate', or raise prompt.max_tokens"),
    Case("empty_glob", {"x.jsonl": jsonl(GOOD)}, spec={"input": {"path": "in/*.parquet"}},
         raises="InputError: no files match '<in>/*.parquet' (check the glob, the bucket and storage options)"),
    Case("missing_input_path", spec={"input": {"path": "in/absent.jsonl"}},
         raises="InputError: input path '<in>/absent.jsonl' does not exist (check the path and storage options)"),
    Case("unknown_file_suffix", {"x.txt": b"hello\n"},
         raises="InputError: <in>/x.txt: unknown file suffix; use .parquet/.pq or .jsonl/.json/.ndjson "
                "(optionally + .gz/.zst), narrow the glob, or set the input format"),
    Case("unreadable_model_path", {"x.jsonl": jsonl(GOOD)}, model="missing",
         raises="ModelError: model.path: '<missing>' does not exist: '<folder>' has no 'no-such-model'. Point it at a Hugging Face model folder (with config.json) or a .gguf file; relative paths are relative to the spec file"),
    Case("no_chat_template_when_asked", {"x.jsonl": jsonl(GOOD)}, spec={"prompt": {"chat_template": True}},
         model="no_chat_template",
         raises="SpecError: prompt asks for the chat template but the model's tokenizer has none; set "
                "prompt.chat_template: false (and use prompt.column or prompt.template)"),
    Case("max_new_tokens_over_context", {"x.jsonl": jsonl(GOOD)}, spec={"sampling": {"max_new_tokens": 400}},
         raises="SpecError: sampling.max_new_tokens 400 leaves no room for a prompt in the model's context of "
                "256 tokens; lower it"),
    Case("mismatched_fingerprint", {"x.jsonl": jsonl(GOOD)}, spec={"sampling": {"temperature": 0.5}},
         setup="fingerprint",
         raises="FingerprintMismatch: output <out> holds the progress of a different run:\n"
                "  sampling.temperature: 0.0 -> 0.5\n"
                "Use a new output path, or pass --force-new-run to discard this output's progress."),
    Case("two_runs_on_one_output", {"x.jsonl": jsonl(GOOD)}, setup="lease",
         raises="LeaseHeld: another job is writing this output: pid <pid> on <host> holds "
                "<out>/_batchrun/leases/task-0-of-1.json (heartbeat 0 s ago). Wait for it to finish or stop it; "
                "if it is gone, its lease expires 60 s after its last heartbeat."),
    Case("disk_full", {f"x{i}.jsonl": jsonl(*[GOOD] * 3) for i in range(8)}, setup="tmpfs",
         raises="StorageError: writing <out>/<file> failed: OSError: No space left on device — the disk is "
                "full: free some space, or point output.path at a larger disk"),
    # ---- the spec is refused before any data is touched
    Case("unknown_spec_key", spec={"output": {"colour": "red"}},
         raises="SpecError: <spec>: 1 problem(s) in the spec:\n  output.colour: Extra inputs are not permitted — "
                "unknown key; known here: path, format, compression, keep_columns, include_token_ids, parse_json, "
                "flush_rows, flush_seconds, storage_options"),
    Case("wrong_type_in_spec", spec={"sampling": {"max_new_tokens": "lots"}},
         raises="SpecError: <spec>: 1 problem(s) in the spec:\n  sampling.max_new_tokens: Input should be a valid "
                "integer, unable to parse string as an integer (got 'lots') — write a whole number"),
    Case("negative_knob", spec={"sampling": {"temperature": -1}},
         raises="SpecError: <spec>: 1 problem(s) in the spec:\n  sampling.temperature: Input should be greater "
                "than or equal to 0 (got -1)"),
    Case("zero_knob", spec={"engine": {"max_seqs": 0}},
         raises="SpecError: <spec>: 1 problem(s) in the spec:\n  engine.max_seqs: Input should be greater than 0 "
                "(got 0)"),
    Case("output_inside_input", spec={"output": {"path": "in/out"}},
         raises="SpecError: <spec>: output.path '<in>/out' is inside input.path '<in>': the next run would read "
                "the job's own output as input; write the output outside the input directory"),
]  # fmt: skip

ROW_CASES = [c for c in CASES if c.rows is not None]


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """The tiny model, and copies without a chat template / with one that raises on "boom"."""
    root = tmp_path_factory.mktemp("models")
    no_chat = shutil.copytree(tiny_model_dir, root / "no-chat")
    (no_chat / "chat_template.jinja").unlink()
    raising = shutil.copytree(tiny_model_dir, root / "raising-chat")
    template = (raising / "chat_template.jinja").read_text()
    (raising / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom here') }}"
        "{% endif %}{% endfor %}" + template
    )
    return {"tiny": tiny_model_dir, "no_chat_template": no_chat, "raising_chat_template": raising}


def _spec(folder: Path, model: Path, case: Case, inputs: Path) -> Path:
    # a catalogue of bad rows is mostly errors by design: no error budget here (tests/test_first_use.py has it)
    sections = {
        "input": {"path": str(inputs)},
        "output": {"keep_columns": []},
        "runtime": {"max_error_fraction": 1, "max_input_error_fraction": 1},
    }
    for key, value in case.spec.items():
        sections[key] = {**sections.get(key, {}), **value}
    if "path" in case.spec.get("input", {}):
        sections["input"]["path"] = str(inputs.parent / case.spec["input"]["path"])
    return write_spec(folder / "spec.yaml", model, **sections)


def _row_outcomes(out: Path, stem: str, inputs: Path) -> list[str]:
    rows = read_output(out)[stem]
    assert [r["_row"] for r in rows] == list(range(len(rows)))
    return ["ok" if r["finish_reason"] != "error" else r["error"].replace(str(inputs), "<in>") for r in rows]


@pytest.fixture(scope="module")
def row_jobs(models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """One job per prompt kind over every row case's files (as `<case id>/<file>`): {case id: (out, in)}."""
    results = {}
    for kind in ("tiny", "raising_chat_template"):
        cases = [c for c in ROW_CASES if c.model == kind]
        folder = tmp_path_factory.mktemp(f"rows-{kind}")
        inputs = folder / "in"
        for case in cases:
            for name, data in case.files.items():
                (inputs / case.id).mkdir(parents=True, exist_ok=True)
                (inputs / case.id / name).write_bytes(data)
        spec = _spec(folder, models[kind], cases[0], inputs)
        summary = run_worker(load_spec(spec), show_progress=False)
        assert summary.status == "finished"
        results |= {c.id: (folder / "out", inputs) for c in cases}
    return results


def _run(case: Case, folder: Path, models: dict[str, Path]) -> str:
    """The case's job: its exception as "<Type>: <message>", or its failed shards."""
    inputs = folder / "in"
    inputs.mkdir()
    for name, data in case.files.items():
        (inputs / name).write_bytes(data)
    model = models.get(case.model, folder / "no-such-model")
    spec_path = _spec(folder, model, case, inputs)
    out = folder / "out"
    try:
        spec = load_spec(spec_path)
        if case.setup == "fingerprint":
            run_worker(load_spec(_spec(folder, model, Case("first"), inputs)), show_progress=False)
        if case.setup == "lease":
            store = OutputStore.for_output(spec.output)
            with TaskLease(store.fs, store.root, 0, 1):
                run_worker(spec, show_progress=False)
        else:
            run_worker(spec, show_progress=False)
    except JobFailed as e:
        assert read_output(out).keys() == {"ok"}  # the good shard is committed
        [(shard, reason)] = e.summary.failed_shards.items()
        return f"{shard}: {reason}"
    except (
        SpecError,
        InputError,
        PromptTooLong,
        ModelError,
        FingerprintMismatch,
        LeaseHeld,
        StorageError,
    ) as e:
        return f"{type(e).__name__}: {e}"
    return "finished"


def _normalize(text: str, folder: Path, case: Case) -> str:
    import os
    import re
    import socket

    text = text.replace(str(folder / "spec.yaml"), "<spec>").replace(str(folder / "in"), "<in>")
    text = text.replace(str(folder / "out"), "<out>").replace(str(folder / "no-such-model"), "<missing>")
    text = text.replace(f"'{folder}'", "'<folder>'")
    text = text.replace(f"pid {os.getpid()} on {socket.gethostname()}", "pid <pid> on <host>")
    if case.setup == "tmpfs":
        # where the disk fills up (a part, or a compacted shard) depends on timing
        text = re.sub(r"writing (part )?<out>/\S+ failed", "writing <out>/<file> failed", text)
    return text


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A 32 KiB tmpfs at tmp_path/out (skips where mounting is not allowed)."""
    out = tmp_path / "out"
    out.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(out)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); tests/test_storage_faults.py covers ENOSPC")
    yield out
    subprocess.run(["umount", str(out)], check=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, models, request):
    if case.rows is not None:
        out, inputs = request.getfixturevalue("row_jobs")[case.id]
        [name] = case.files
        stem = f"{case.id}/{name.split('.')[0]}"
        assert _row_outcomes(out, stem, inputs / case.id) == case.rows
        errors = out / "_batchrun/errors" / f"{stem}.jsonl"
        listed = [json.loads(x)["_row"] for x in errors.read_text().splitlines()] if errors.exists() else []
        assert listed == [i for i, r in enumerate(case.rows) if r != "ok"]
        return
    if case.setup == "tmpfs":
        request.getfixturevalue("tmpfs")
    outcome = _normalize(_run(case, tmp_path, models), tmp_path, case)
    if case.failed is not None:
        shard = next(n for n in case.files if n != "ok.jsonl")
        assert outcome == f"{shard}: {case.failed}"
        return
    assert outcome == case.raises
    if case.setup == "tmpfs":  # what was committed before the disk filled up is intact and readable
        committed = [p for p in (tmp_path / "out").rglob("*.parquet") if not p.name.startswith(".tmp-")]
        assert committed and all(pq.read_table(p).num_rows > 0 for p in committed)


def test_the_catalogue_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
