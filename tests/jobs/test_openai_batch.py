# ruff: noqa: E501  (exact messages read best whole)
"""OpenAI Batch API files through a job: every output body read back with the `openai` package's own
types, usage counts, custom_ids, error lines and the report of ignored fields."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
import yaml
from openai.types import Completion
from openai.types.chat import ChatCompletion

from jobs.spec.job import SpecError, load_spec, parse_spec
from jobs.worker import run_worker
from tests.helpers import tiny_tokenizer

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"


def request(custom_id: str, url: str = CHAT, **body) -> dict:
    body.setdefault("model", "tiny")
    if url == CHAT:
        body.setdefault("messages", [{"role": "user", "content": f"Name three colors ({custom_id})."}])
    else:
        body.setdefault("prompt", f"The quick brown fox ({custom_id})")
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


GOOD = [
    request("chat-1", max_tokens=5),
    request("chat-2", max_completion_tokens=4, n=2, temperature=0.8, seed=3),
    request("chat-3", max_tokens=6, logprobs=True, top_logprobs=0, user="someone"),
    request(
        "chat-4",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "red "}, {"type": "text", "text": "green"}],
            },
        ],
        max_tokens=3,
        stop=["\n"],
    ),
    request("text-1", TEXT, max_tokens=7, logprobs=0),
    request(
        "text-2", TEXT, prompt=["one prompt in a list"], max_tokens=2, top_p=0.5, user="x", metadata={"a": 1}
    ),
]
BAD = [
    (request("bad-tools", tools=[{"type": "function"}]), "body.tools: not supported by batchrun"),
    (
        request(
            "bad-image",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        ),
        "body.messages[0].content[0]: content part type 'image_url' is not supported (text only)",
    ),
    (request("bad-temp", temperature=3), "body.temperature: must be a number from 0 to 2 (got 3)"),
    (
        request("bad-top", top_logprobs=2, logprobs=True),
        "body.top_logprobs: only 0 is supported (the sampled token's logprob)",
    ),
    (
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}},
        "url: must be one of /v1/chat/completions, /v1/completions (got '/v1/embeddings')",
    ),
]


def write_requests(path: Path, lines: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())


def batch_spec(tmp_path: Path, model_dir: Path, **extra) -> Path:
    spec = {
        "input": {"path": "in", "format": "openai-batch"},
        "model": {"path": str(model_dir)},
        "sampling": {"max_new_tokens": 8},
        "output": {"path": "out", "format": "openai-batch", "flush_rows": 3},
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def read_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    data = gzip.decompress(data) if path.suffix == ".gz" else data
    return [json.loads(line) for line in data.decode().splitlines()]


def prompt_tokens(req: dict) -> int:
    tok = tiny_tokenizer()
    body = req["body"]
    if req["url"] == TEXT:
        prompt = body["prompt"][0] if isinstance(body["prompt"], list) else body["prompt"]
        return len(tok(prompt)["input_ids"])
    messages = [
        {
            "role": m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else "".join(p["text"] for p in m["content"]),
        }
        for m in body["messages"]
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_every_output_body_validates_with_the_openai_types(tmp_path: Path, tiny_model_dir: Path, caplog):
    lines = [*GOOD, *(b for b, _ in BAD), "{not json", request("chat-5", max_tokens=2)]
    write_requests(tmp_path / "in/requests.jsonl", lines[:7])
    write_requests(tmp_path / "in/more.jsonl.gz", lines[7:])

    def place_of(i: int) -> str:
        return (
            f"{tmp_path}/in/requests.jsonl line {i + 1}"
            if i < 7
            else f"{tmp_path}/in/more.jsonl.gz line {i - 6}"
        )

    caplog.set_level(logging.WARNING)
    summary = run_worker(load_spec(batch_spec(tmp_path, tiny_model_dir)), show_progress=False)
    assert (summary.rows_ok, summary.rows_error) == (7, 6)

    out = read_lines(tmp_path / "out/requests.jsonl") + read_lines(tmp_path / "out/more.jsonl")
    by_id = {line["custom_id"]: line for line in out}
    sent = {r["custom_id"] for r in lines if isinstance(r, dict)}
    assert set(by_id) == sent | {None}  # the unreadable line has no custom_id
    assert all(set(line) == {"id", "custom_id", "response", "error"} for line in out)
    assert len({line["id"] for line in out}) == len(out) and all(
        line["id"].startswith("batch_req_") for line in out
    )

    for req in [*GOOD, request("chat-5", max_tokens=2)]:
        line = by_id[req["custom_id"]]
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        parsed = (ChatCompletion if req["url"] == CHAT else Completion).model_validate(body)
        assert parsed.model == "tiny"
        n = req["body"].get("n", 1)
        limit = req["body"].get("max_tokens") or req["body"].get("max_completion_tokens")
        assert len(parsed.choices) == n and [c.index for c in parsed.choices] == list(range(n))
        assert parsed.usage.prompt_tokens == prompt_tokens(req), req["custom_id"]
        assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens
        assert parsed.usage.completion_tokens <= n * limit
        if all(c.finish_reason == "length" for c in parsed.choices):
            assert parsed.usage.completion_tokens == n * limit
        if req["custom_id"] == "chat-3":
            assert len(parsed.choices[0].logprobs.content) == parsed.usage.completion_tokens
            assert all(t.logprob <= 0 and t.top_logprobs == [] for t in parsed.choices[0].logprobs.content)
        if req["custom_id"] == "text-1":
            lp = parsed.choices[0].logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == parsed.usage.completion_tokens
            assert "".join(lp.tokens).startswith(parsed.choices[0].text)

    errors = read_lines(tmp_path / "out/_batchrun/errors/requests.jsonl") + read_lines(
        tmp_path / "out/_batchrun/errors/more.jsonl"
    )
    for req, message in BAD:
        line = by_id[req["custom_id"]]
        place = place_of(lines.index(req))
        assert line["response"]["status_code"] == 400
        assert line["error"] == {"code": "invalid_request_error", "message": f"{place}: {message}"}
        assert line["response"]["body"]["error"]["message"] == f"{place}: {message}"
        assert line in errors
    assert (
        by_id[None]["error"]["message"]
        == f"{place_of(len(lines) - 2)}: invalid JSON (Expecting property name enclosed in double quotes at column 2)"
    )
    assert len(errors) == 6

    assert "body.user is not used by batchrun and is ignored (counted in the job's log)" in caplog.text
    assert "body.user: set by 2 request(s), not used by batchrun (ignored)" in caplog.text
    assert "body.metadata: set by 1 request(s), not used by batchrun (ignored)" in caplog.text
    mismatch = f"body.model 'tiny' is not this job's model '{tiny_model_dir}': the responses echo the request's model (input.model_mismatch: ignore)"
    assert caplog.text.count(mismatch) == 1


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_response_format_constrains_the_content(tmp_path: Path, tiny_model_dir: Path, kind: str):
    pytest.importorskip("xgrammar")
    schema = {
        "type": "object",
        "properties": {"c": {"enum": ["red", "blue"]}},
        "required": ["c"],
        "additionalProperties": False,
    }
    fmt = (
        {"type": kind}
        if kind == "json_object"
        else {"type": kind, "json_schema": {"name": "c", "schema": schema}}
    )
    write_requests(
        tmp_path / "in/r.jsonl", [request(f"r{i}", max_tokens=40, response_format=fmt) for i in range(3)]
    )
    run_worker(
        load_spec(batch_spec(tmp_path, tiny_model_dir, sampling={"max_new_tokens": 40})), show_progress=False
    )
    for line in read_lines(tmp_path / "out/r.jsonl"):
        if line["error"] is not None:  # a random model may run out of tokens inside the object
            assert line["error"]["message"].endswith(
                "before the JSON schema could end: the output is incomplete"
            )
            assert line["response"]["status_code"] == 500
            continue
        content = json.loads(
            ChatCompletion.model_validate(line["response"]["body"]).choices[0].message.content
        )
        assert isinstance(content, dict)
        if kind == "json_schema":
            assert content["c"] in ("red", "blue") and set(content) == {"c"}


def test_model_mismatch_error_policy_makes_error_lines(tmp_path: Path, tiny_model_dir: Path):
    write_requests(
        tmp_path / "in/r.jsonl",
        [
            request("a", model="gpt-4o-mini", max_tokens=2),
            request("b", model=tiny_model_dir.name, max_tokens=2),
        ],
    )
    spec = batch_spec(tmp_path, tiny_model_dir, runtime={"max_error_fraction": 1})
    data = yaml.safe_load(spec.read_text())
    data["input"]["model_mismatch"] = "error"
    spec.write_text(yaml.safe_dump(data))
    run_worker(load_spec(spec), show_progress=False)
    a, b = read_lines(tmp_path / "out/r.jsonl")
    assert (
        a["error"]["message"]
        == f"{tmp_path}/in/r.jsonl line 1: body.model 'gpt-4o-mini' is not this job's model '{tiny_model_dir}' (input.model_mismatch: error)"
    )
    assert b["error"] is None and b["response"]["body"]["model"] == tiny_model_dir.name


def test_spec_rules_for_openai_batch():
    base = {
        "input": {"path": "in", "format": "openai-batch"},
        "output": {"path": "out", "format": "openai-batch"},
    }
    assert parse_spec(base).openai_batch
    cases = [
        (
            {**base, "prompt": {"column": "text"}},
            "prompt: with input.format openai-batch each request's body is the prompt; set only prompt.system, max_tokens or on_too_long",
        ),
        (
            {**base, "output": {"path": "out"}},
            "input.format and output.format: openai-batch goes with openai-batch",
        ),
        (
            {**base, "output": {"path": "out", "format": "openai-batch", "keep_columns": ["x"]}},
            "output.keep_columns: not with format openai-batch (its lines have a fixed shape)",
        ),
    ]
    for data, message in cases:
        with pytest.raises(SpecError) as e:
            parse_spec(data)
        assert message in str(e.value)


def test_preflight_refuses_a_file_of_no_runnable_requests(tmp_path: Path, tiny_model_dir: Path):
    from jobs.preflight import check_inputs

    write_requests(tmp_path / "in/r.jsonl", [{"custom_id": "a", "url": "/v1/embeddings", "body": {}}])
    [problem] = check_inputs(load_spec(batch_spec(tmp_path, tiny_model_dir)))
    assert (problem.field, problem.message) == (
        "input.format",
        f"no request in the first row of {tmp_path}/in/r.jsonl can run; the first: url: must be one of /v1/chat/completions, /v1/completions (got '/v1/embeddings')",
    )
    write_requests(tmp_path / "in/r.jsonl", [request("ok")])
    assert check_inputs(load_spec(batch_spec(tmp_path, tiny_model_dir))) == []


def test_batch_files_on_s3_give_the_local_run_s_responses(s3, tmp_path: Path, tiny_model_dir: Path):
    """Request files read from, and response files written to, a real S3 API (moto's server over
    HTTP): the same responses as the local run; error lines name the object's URL."""
    fs, bucket, options = s3
    lines = [*GOOD, *(b for b, _ in BAD)]
    write_requests(tmp_path / "in/requests.jsonl.gz", lines)
    fs.put_file(str(tmp_path / "in/requests.jsonl.gz"), f"{bucket}/in/requests.jsonl.gz")
    local = run_worker(load_spec(batch_spec(tmp_path, tiny_model_dir)), show_progress=False)
    spec = {
        "input": {"path": f"s3://{bucket}/in/*", "format": "openai-batch", "storage_options": options},
        "model": {"path": str(tiny_model_dir)},
        "sampling": {"max_new_tokens": 8},
        "output": {"path": f"s3://{bucket}/out", "format": "openai-batch", "storage_options": options},
    }
    remote = run_worker(parse_spec(spec), show_progress=False)
    assert (remote.rows_ok, remote.rows_error) == (local.rows_ok, local.rows_error) == (len(GOOD), len(BAD))

    def rounded(x):
        """Log-probabilities to 4 decimals: the two runs batch their rows differently, and a CPU matmul
        over another batch shape may differ in the last bits (the tokens and texts compare exactly)."""
        if isinstance(x, float):
            return round(x, 4)
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rounded(v) for v in x]
        return x

    def answers(out: list[dict]) -> dict:
        """custom_id -> (status, choices, usage): what does not depend on when or where it ran."""
        return {
            line["custom_id"]: (
                line["response"]["status_code"],
                rounded(line["response"]["body"].get("choices")),
                line["response"]["body"].get("usage"),
            )
            for line in out
        }

    with fs.open(f"{bucket}/out/requests.jsonl", "rb") as f:
        out = [json.loads(line) for line in f.read().decode().splitlines()]
    assert answers(out) == answers(read_lines(tmp_path / "out/requests.jsonl"))
    by_id = {line["custom_id"]: line for line in out}
    for req, message in BAD:
        place = f"s3://{bucket}/in/requests.jsonl.gz line {lines.index(req) + 1}"
        assert by_id[req["custom_id"]]["error"]["message"] == f"{place}: {message}"


def test_two_tasks_share_the_files_and_answer_as_one(tmp_path: Path, tiny_model_dir: Path):
    """A Slurm array's tasks (task_index of num_tasks) split the request files between them: together
    they answer every request once, as one task does."""
    write_requests(tmp_path / "in/a.jsonl", GOOD[:3])
    write_requests(tmp_path / "in/b.jsonl", GOOD[3:])
    one = tmp_path / "one"
    one.mkdir()
    (one / "in").symlink_to(tmp_path / "in")
    run_worker(load_spec(batch_spec(one, tiny_model_dir)), show_progress=False)
    for task in (0, 1):
        spec = batch_spec(tmp_path, tiny_model_dir, runtime={"task_index": task, "num_tasks": 2})
        assert run_worker(load_spec(spec), show_progress=False).rows_ok == 3

    def texts(out: list[dict]) -> list[tuple]:  # (logprobs differ in the last bits with the batch)
        return [
            (x["custom_id"], [(c.get("text") or c["message"]["content"], c["finish_reason"])
                              for c in x["response"]["body"]["choices"]])
            for x in out
        ]  # fmt: skip

    for name in ("a.jsonl", "b.jsonl"):
        assert texts(read_lines(tmp_path / "out" / name)) == texts(read_lines(one / "out" / name))
