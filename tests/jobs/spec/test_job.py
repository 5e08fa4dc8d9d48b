from pathlib import Path

import pytest

from jobs.spec.job import SpecError, load_spec, parse_spec

MINIMAL = {"input": {"path": "in/*.jsonl"}, "prompt": {"column": "text"}, "output": {"path": "out"}}


def test_minimal_spec_fills_defaults_and_anchors_relative_paths(tmp_path: Path):
    spec = parse_spec(MINIMAL, base_dir=tmp_path)
    assert spec.input.path == [str(tmp_path / "in/*.jsonl")]
    assert spec.output.path == str(tmp_path / "out")
    assert spec.model.path == "builtin:smollm2-135m-instruct"
    assert spec.sampling.temperature == 0.0 and spec.prompt.on_too_long == "skip"
    assert spec.engine.async_mode is True


def test_urls_and_absolute_paths_are_kept(tmp_path: Path):
    data = {
        **MINIMAL,
        "input": {"path": ["s3://b/in/*.parquet", "/abs/x.jsonl"]},
        "output": {"path": "s3://b/o"},
    }
    spec = parse_spec(data, base_dir=tmp_path)
    assert spec.input.path == ["s3://b/in/*.parquet", "/abs/x.jsonl"]
    assert spec.output.path == "s3://b/o"


def test_every_problem_is_listed_with_its_field_path(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "input: {path: x.jsonl, colour: red}\n"
        "prompt: {column: text, template: '{a}'}\n"
        "sampling: {temperature: -1, top_p: 2, max_new_tokens: lots}\n"
        "engine: {backend: vllm}\n"
    )
    with pytest.raises(SpecError) as e:
        load_spec(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: 7 problem(s) in the spec:")
    for line in [
        "  input.colour: Extra inputs are not permitted — unknown key; known here: path, format, "
        "storage_options, id_column, model_mismatch",
        "  prompt: set exactly one of prompt.column, prompt.template, prompt.messages_column "
        "(got column, template)",
        "  sampling.temperature: Input should be greater than or equal to 0 (got -1)",
        "  sampling.top_p: Input should be less than or equal to 1 (got 2)",
        "  sampling.max_new_tokens: Input should be a valid integer, unable to parse string as an integer"
        " (got 'lots') — write a whole number",
        "  engine.backend: Input should be 'auto', 'batchrun' or 'transformers' (got 'vllm')",
        "  output: Field required — this field is required",
    ]:
        assert line in msg.splitlines(), (line, msg)


def test_yaml_syntax_and_missing_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(SpecError, match=r"nope.yaml: cannot read the spec"):
        load_spec(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("input: [unclosed\n")
    with pytest.raises(SpecError, match=r"broken.yaml: not valid YAML"):
        load_spec(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match=r"must be a YAML mapping"):
        load_spec(listy)


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"prompt": {"column": "t", "system": "s", "chat_template": False}}, "prompt.system needs the chat"),
        ({"output": {"path": "o", "compression": "gzip"}}, "output.compression applies to jsonl"),
        ({"runtime": {"task_index": 3, "num_tasks": 2}}, "runtime.task_index 3 must be < num_tasks 2"),
        ({"output": {"path": "o", "flush_rows": 0}}, "output.flush_rows: Input should be greater than 0"),
    ],
)
def test_cross_field_rules(patch, expected):
    with pytest.raises(SpecError, match=expected.replace(".", r"\.")):
        parse_spec({**MINIMAL, **patch})


def test_demo_spec_is_valid():
    spec = load_spec(Path(__file__).parents[3] / "specs" / "demo.yaml")
    assert spec.prompt.uses_chat_template(True) and spec.model.path == "builtin:smollm2-135m-instruct"


def test_regression_output_inside_input_is_read_back_as_input_on_the_next_run(tmp_path: Path):
    """Found by the bad-input catalogue: output.path under the input directory was accepted, and the
    next run listed the job's own output files (and _batchrun/ state) as new input shards."""
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "input": {"path": "data"}, "output": {"path": "data/out/"}}, base_dir=tmp_path)
    assert str(e.value) == (
        f"<spec>: output.path '{tmp_path}/data/out' is inside input.path '{tmp_path}/data': the next run "
        "would read the job's own output as input; write the output outside the input directory"
    )
    parse_spec(
        {**MINIMAL, "input": {"path": "data/*.jsonl"}, "output": {"path": "data-out"}}, base_dir=tmp_path
    )


def test_s3_to_s3_spec_is_valid():
    spec = load_spec(Path(__file__).parents[3] / "specs" / "s3-to-s3.yaml")
    assert spec.input.path == ["s3://my-bucket/in/*.parquet"] and spec.output.path == "s3://my-bucket/out/"
    assert spec.model.storage_options == spec.output.storage_options == {"profile": "default"}


# --- the engine and sampling sections are the engine's own settings ------------------------------------


def _declared(cls) -> dict[str, tuple]:
    """Each dataclass field's (default, bounds) as the engine declares them."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        parts = [hint, *typing.get_args(hint)]
        bounds = sorted(repr(m) for p in parts for m in getattr(p, "__metadata__", ()))
        out[f.name] = (f.default, bounds)
    return out


def _section(model) -> dict[str, tuple]:
    out = {}
    for name, field in model.model_fields.items():
        parts = [field.annotation, *__import__("typing").get_args(field.annotation)]
        bounds = [repr(m) for m in field.metadata] + [
            repr(m) for p in parts for m in getattr(p, "__metadata__", ())
        ]
        out[name] = (field.default, sorted(bounds))
    return out


@pytest.mark.parametrize(
    "section, engine_type, job_only, engine_only, differs",
    [
        ("engine", "EngineConfig", {"backend", "max_inflight"}, set(), set()),
        # the job's seed is an integer that each row's seed derives from; logprobs are not offered yet
        ("sampling", "SamplingParams", {"overrides_column"}, {"logprobs"}, {"seed", "json_schema", "choice"}),
    ],
)
def test_spec_sections_agree_with_the_engine_field_by_field(
    section, engine_type, job_only, engine_only, differs
):
    import runner.engine as engine
    from jobs.spec.job import JobSpec

    model = JobSpec.model_fields[section].annotation
    spec_fields, engine_fields = _section(model), _declared(getattr(engine, engine_type))
    assert spec_fields.keys() - engine_fields.keys() == job_only
    assert engine_fields.keys() - spec_fields.keys() == engine_only
    for name in engine_fields.keys() & spec_fields.keys() - differs:
        assert spec_fields[name] == engine_fields[name], name


def test_engine_settings_reach_the_engine_config(tmp_path):
    spec = parse_spec(
        {
            "input": {"path": "in"},
            "prompt": {"column": "t"},
            "output": {"path": "out"},
            "engine": {"max_model_len": 128, "max_seqs": 8, "async": False, "kv_memory_fraction": 0.5},
            "sampling": {"stop": "END", "temperature": 0.5, "seed": 3},
        }
    )
    config = spec.engine.config()
    assert (config.max_model_len, config.max_seqs, config.async_mode, config.kv_memory_fraction) == (
        128,
        8,
        False,
        0.5,
    )
    params = spec.sampling.params()
    assert (params.stop, params.temperature, params.seed) == (("END",), 0.5, 3)


@pytest.mark.parametrize(
    "engine, message",
    [
        ({"max_model_len": 0}, "engine.max_model_len: Input should be greater than 0"),
        (
            {"kv_memory_fraction": 0.99},
            "engine.kv_memory_fraction: Input should be less than or equal to 0.95",
        ),
    ],
)
def test_engine_bounds_are_the_engine_configs(engine, message):
    from runner.engine import EngineConfig

    with pytest.raises(SpecError, match=message):
        parse_spec(
            {"input": {"path": "in"}, "prompt": {"column": "t"}, "output": {"path": "o"}, "engine": engine}
        )
    with pytest.raises(ValueError):
        EngineConfig(**engine)


def test_engine_kv_cache_dtype_reaches_the_engine_config_and_a_bad_one_is_named():
    from runner.engine import EngineConfig

    base = {"input": {"path": "in"}, "prompt": {"column": "t"}, "output": {"path": "o"}}
    assert parse_spec({**base, "engine": {"kv_cache_dtype": "fp8"}}).engine.config().kv_cache_dtype == "fp8"
    assert parse_spec(base).engine.config().kv_cache_dtype == "auto"
    with pytest.raises(SpecError, match=r"engine\.kv_cache_dtype: Input should be 'auto' or 'fp8'"):
        parse_spec({**base, "engine": {"kv_cache_dtype": "int8"}})
    with pytest.raises(ValueError, match="engine.kv_cache_dtype='int8'"):
        EngineConfig(kv_cache_dtype="int8")
