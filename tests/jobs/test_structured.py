# ruff: noqa: E501  (exact messages read best whole)
"""Structured output through `batchrun submit`: JSON schema, regex and choice rows on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import read_output, write_spec
from tests.engine.sample.test_grammar import SCHEMA
from tests.engine.sample.test_grammar_sampled import EXTRACTION
from tests.helpers import demo_model_path, tiny_llama
from tests.test_first_use import cli, jsonl

pytest.importorskip("xgrammar")

OWN = {
    "type": "object",
    "properties": {"k": {"enum": ["v", "w"]}},
    "required": ["k"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-c]{1,4}"
CHOICES = ["yes", "no", 'say "hi"']


def _present(obj: dict) -> dict:
    """`generated_json` less the keys that only other rows' schemas have: one Parquet struct column holds
    the objects of every schema in a file, and a key a row lacks reads as null."""
    return {k: v for k, v in obj.items() if v is not None}


def test_job_with_a_schema_rows_with_their_own_grammar_and_error_rows(tmp_path: Path, tiny_model_dir: Path):
    overrides = [None, None, None, None, {"regex": REGEX}, {"choice": CHOICES}, {"json_schema": json.dumps(OWN)},
                 {"json_schema": OWN}, {"regex": "(ab"}, {"max_new_tokens": 3}, {"choice": ["a"], "regex": "b"}]  # fmt: skip
    jsonl(
        tmp_path / "in/x.jsonl",
        *[{"id": i, "text": f"box {i} red", "over": o} for i, o in enumerate(overrides)],
    )
    spec = write_spec(
        tmp_path / "spec.yaml",
        tiny_model_dir,
        sampling={
            "max_new_tokens": 160,
            "temperature": 1.0,
            "json_schema": SCHEMA,
            "overrides_column": "over",
        },
        output={"parse_json": True, "keep_columns": ["id"]},
        runtime={"max_error_fraction": 1.0},
    )
    code, _, err = cli("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    rows = read_output(tmp_path / "out")["x"]
    assert [r["finish_reason"] for r in rows] == ["stop"] * 8 + ["error"] * 3
    for r in rows[:4]:
        jsonschema.validate(json.loads(r["generated_text"]), SCHEMA)
        assert _present(r["generated_json"]) == json.loads(r["generated_text"])
    assert all(re.fullmatch(REGEX, r["generated_text"]) for r in rows[4:5])
    assert rows[5]["generated_text"] in CHOICES
    for r in rows[6:8]:  # the row's own schema wins over the job's
        assert _present(r["generated_json"]) in ({"k": "v"}, {"k": "w"})
        assert json.loads(r["generated_text"]) == _present(r["generated_json"])
    assert [r["generated_json"] for r in rows[4:6]] == [None, None]  # not JSON-schema rows
    assert [r["error"] for r in rows[8:]] == [
        f"{tmp_path}/in/x.jsonl line 9: field 'over': regex: Regex parsing error at position 4: The parenthesis is not closed.",
        "reached max_new_tokens (3) before the JSON schema could end: the output is incomplete",
        f"{tmp_path}/in/x.jsonl line 11: field 'over': set at most one of json_schema, regex, choice (got regex, choice)",
    ]
    assert (rows[9]["generated_text"], rows[9]["generated_tokens"], rows[9]["generated_json"]) == (
        '{"c',
        3,
        None,
    )


def test_schema_file_beside_the_spec_and_bad_grammars_are_spec_errors(tmp_path: Path, tiny_model_dir: Path):
    jsonl(tmp_path / "in/x.jsonl", {"id": 0, "text": "box"})
    (tmp_path / "schema.json").write_text(json.dumps(OWN))
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, sampling={"max_new_tokens": 20, "json_schema": "schema.json"},
                      output={"parse_json": True})  # fmt: skip
    code, _, err = cli("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    assert read_output(tmp_path / "out")["x"][0]["generated_json"] in ({"k": "v"}, {"k": "w"})  # one schema

    bad = {"json_schema": {"type": "nope"}, "regex": "(ab", "choice": []}
    for key, value in bad.items():
        data = yaml.safe_load(spec.read_text())
        data["sampling"] = {key: value}
        spec.write_text(yaml.safe_dump(data))
        code, _, err = cli("validate", str(spec))
        assert code == 2
        message = {"json_schema": 'Unsupported type "nope"', "choice": "give at least one non-empty choice",
                   "regex": "Regex parsing error at position 4: The parenthesis is not closed."}[key]  # fmt: skip
        assert f"  sampling.{key}: {message}" in err.splitlines(), err
    data["sampling"] = {"json_schema": "missing.json"}
    spec.write_text(yaml.safe_dump(data))
    code, _, err = cli("validate", str(spec))
    assert (
        code == 2
        and f"{spec}: sampling.json_schema: cannot read a JSON schema from '{tmp_path}/missing.json'" in err
    )


def test_sampled_schema_job_with_the_demo_tokenizer_writes_strict_json(tmp_path: Path):
    """Issue 47's job: the demo model's vocabulary, temperature 1.0, top-p 0.95, seed 5. It stopped with
    "tokens sampled outside their grammar", and rows that ended held raw control characters."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    tiny_llama(tokenizer).save_pretrained(tmp_path / "model")  # a random model: near-uniform draws
    tokenizer.save_pretrained(tmp_path / "model")
    jsonl(
        tmp_path / "in/x.jsonl", *[{"id": i, "text": "Extract the fields. " * (1 + i % 7)} for i in range(24)]
    )
    spec = write_spec(
        tmp_path / "spec.yaml",
        tmp_path / "model",
        prompt={"chat_template": True},
        sampling={
            "max_new_tokens": 120,
            "temperature": 1.0,
            "top_p": 0.95,
            "seed": 5,
            "json_schema": EXTRACTION,
        },
        output={"parse_json": True, "keep_columns": ["id"], "include_token_ids": False},
        runtime={"max_error_fraction": 1.0},  # a row cut at max_new_tokens is an error row
    )
    code, _, err = cli("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    rows = read_output(tmp_path / "out")["x"]
    ok = [r for r in rows if r["finish_reason"] == "stop"]
    assert len(rows) == 24 and len(ok) >= 12
    for r in ok:
        parsed = json.loads(r["generated_text"])  # strict: no raw control characters
        jsonschema.validate(parsed, EXTRACTION)
        assert r["generated_json"] == parsed
