"""The job spec: what to read, how to prompt, which model, how to sample, where to write.

A spec is a YAML file validated once, here, into a `JobSpec`. Every problem is reported with its
field path and a hint, before any data is touched (`load_spec` raises `SpecError`).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from jobs.spec.base import Section, SpecError, fields_of
from jobs.spec.sampling import SamplingSpec, with_schema_file_read
from runner.engine.config import EngineConfig

__all__ = ["JobSpec", "SamplingSpec", "SpecError", "load_spec", "parse_spec"]

_ONE_SOURCE = "set exactly one of prompt.column, prompt.template, prompt.messages_column"
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]


class InputSpec(Section):
    path: list[str] = Field(description="glob, file, directory or URL (or a list of them)")
    format: Literal["parquet", "jsonl", "openai-batch"] | None = Field(
        None, description="inferred from the suffix; openai-batch: OpenAI Batch API request lines (JSONL)"
    )
    storage_options: dict[str, Any] = Field(default_factory=dict)
    id_column: str | None = Field(None, description="an input column copied to the output as `id`")
    model_mismatch: Literal["ignore", "error"] = Field(
        "ignore",
        description="openai-batch: a request whose body.model is not model.path is run anyway (one warning "
        "per job) or is an error line",
    )

    @property
    def shard_format(self) -> Literal["parquet", "jsonl"] | None:
        """How the shards are read (openai-batch request files are JSONL)."""
        return "jsonl" if self.format == "openai-batch" else self.format

    @field_validator("path", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("path")
    @classmethod
    def _not_empty(cls, v: list[str]) -> list[str]:
        if not v or any(not p.strip() for p in v):
            raise ValueError("give at least one non-empty path or glob")
        return v


class PromptSpec(Section):
    column: str | None = Field(None, description="a column holding the prompt text")
    template: str | None = Field(None, description="a Python format string over row fields: '{title}'")
    messages_column: str | None = Field(None, description="a column of chat messages [{role, content}]")
    chat_template: bool | None = Field(
        None,
        description="wrap the column's or template's text as a user turn in the tokenizer's chat template "
        "(default: on when the model has a chat template, as a chat API would; always on for messages)",
    )
    system: str | None = Field(None, description="system prompt (chat template only)")
    max_tokens: PositiveInt | None = Field(None, description="longest prompt in tokens (default: model)")
    on_too_long: Literal["error", "skip", "truncate"] = "skip"

    @model_validator(mode="after")
    def _at_most_one_source(self) -> PromptSpec:
        given = self.sources
        if len(given) > 1:
            raise ValueError(f"{_ONE_SOURCE} (got {', '.join(given)})")
        if self.messages_column and self.chat_template is False:
            raise ValueError("prompt.messages_column needs chat_template: true")
        if self.system and self.chat_template is False:
            raise ValueError("prompt.system needs the chat template (remove chat_template: false)")
        return self

    @property
    def sources(self) -> list[str]:
        """The prompt sources set (column, template, messages_column)."""
        return [k for k in ("column", "template", "messages_column") if getattr(self, k)]

    def uses_chat_template(self, model_has_one: bool) -> bool:
        """Whether prompts go through the chat template, for a model whose tokenizer has one or not."""
        if self.chat_template is not None:
            return self.chat_template
        return bool(self.messages_column) or model_has_one


class ModelSpec(Section):
    path: str = Field(
        "builtin:smollm2-135m-instruct",
        description="local HF folder, .gguf file, hub id, builtin:smollm2-135m-instruct, or a folder URL "
        "(s3://..., gs://...) downloaded once into the local cache",
    )
    revision: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict, description="for a model URL")


class OutputSpec(Section):
    path: str = Field(description="output directory or URL")
    format: Literal["parquet", "jsonl", "openai-batch"] = Field(
        "parquet", description="openai-batch: OpenAI Batch API output lines (JSONL), for openai-batch input"
    )
    compression: Literal["gzip", "zstd"] | None = Field(None, description="jsonl only")
    keep_columns: list[str] | Literal["all"] = Field(
        default_factory=list, description="input columns copied to each output row"
    )
    include_token_ids: bool = Field(False, description="add a generated_token_ids column")
    parse_json: bool = Field(
        False, description="add a generated_json column: the parsed output of JSON-schema rows"
    )
    flush_rows: PositiveInt = 1000
    flush_seconds: Annotated[float, Field(gt=0)] = 60.0
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _compression_for_jsonl(self) -> OutputSpec:
        if self.compression and self.format == "parquet":
            raise ValueError("output.compression applies to jsonl (parquet compresses internally)")
        if self.format == "openai-batch":
            given = [k for k in ("keep_columns", "include_token_ids", "parse_json") if getattr(self, k)]
            if given:
                fields = ", ".join(f"output.{k}" for k in given)
                raise ValueError(f"{fields}: not with format openai-batch (its lines have a fixed shape)")
        return self


class _EngineSection(Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def config(self) -> EngineConfig:
        """The engine's settings (the section less the job-level `backend` and `max_inflight`)."""
        return EngineConfig(**self.model_dump(exclude={"backend", "max_inflight"}))


# The engine's EngineConfig fields, with their types, defaults and bounds (runner/engine/config.py)
EngineSpec = create_model(
    "EngineSpec",
    __base__=_EngineSection,
    backend=(Literal["auto", "batchrun", "transformers"], "auto"),
    **fields_of(EngineConfig, async_mode=(bool, Field(True, alias="async"))),
    max_inflight=(
        PositiveInt | None,
        Field(None, description="requests kept in the engine at once (default: 4 x max_seqs)"),
    ),
)


class SlurmSpec(Section):
    """How `batchrun submit` asks Slurm for an array job (runtime.executor: slurm)."""

    tasks: PositiveInt = Field(1, description="array tasks; shard i goes to task i % tasks")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = Field(None, description="wall-clock limit per task, e.g. 04:00:00")
    gpus: NonNegInt = Field(0, description="GPUs per task")
    cpus: PositiveInt | None = Field(None, description="CPUs per task")
    mem: str | None = Field(None, description="memory per task, e.g. 64G")
    job_name: str | None = Field(None, description="default: the spec's name, else batchrun")
    log: str = Field("slurm-%A_%a.log", description="each task's log (sbatch --output); %A job, %a task")
    setup: list[str] = Field(
        default_factory=list,
        description="shell lines run before the task, e.g. source venv/bin/activate; with setup lines the "
        "task runs the `python` they put on PATH, without them the interpreter that ran `batchrun submit`",
    )
    extra: list[str] = Field(
        default_factory=list, description="more sbatch options, e.g. --constraint=h100 or --exclusive"
    )


class RaySpec(Section):
    """How `batchrun submit` runs the job's tasks on a Ray cluster (runtime.executor: ray)."""

    address: str | None = Field(
        None,
        description="the cluster: ray://head:10001, head:6379, or auto (the one started on this machine); "
        "default: the RAY_ADDRESS environment variable",
    )
    tasks: PositiveInt = Field(1, description="Ray tasks; shard i goes to task i % tasks")
    num_cpus_per_task: Annotated[float, Field(ge=0)] = Field(1.0, description="CPUs Ray reserves per task")
    num_gpus_per_task: NonNegInt = Field(0, description="GPUs per task (its workers: runtime.gpus)")
    max_retries: NonNegInt = Field(
        3,
        description="times Ray runs a task again after its process or node died, or after a signal stopped "
        "it (exit 75); each run resumes from the task's committed rows",
    )


class RuntimeSpec(Section):
    executor: Literal["local", "slurm", "ray"] = Field(
        "local", description="where `batchrun submit` runs the job"
    )
    task_index: NonNegInt = 0
    num_tasks: PositiveInt = 1
    grace_seconds: Annotated[float, Field(gt=0)] = 60.0
    max_held_bytes: Annotated[ByteSize, Field(gt=0)] = Field(
        ByteSize(256 * 2**20),
        description="input values held between reading and committing (queued, generating, waiting "
        "for their part), e.g. 256MiB; reading pauses above it",
    )
    heartbeat_seconds: Annotated[float, Field(gt=0)] = Field(
        5.0, description="how often progress and metrics are written to <out>/_batchrun/"
    )
    gpus: Literal["auto"] | PositiveInt | list[NonNegInt] = Field(
        "auto",
        description="worker processes on this node, one per GPU (per group of engine.tensor_parallel "
        "GPUs): auto (every visible GPU), N (the first N; N CPU workers on a machine without GPUs) or a "
        "list of GPU ids",
    )
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    max_error_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        0.1,
        description="the job stops (exit 1, nothing committed lost, not marked done) once more than this "
        "fraction of the rows that reached the model are error rows (generation failed), over the first "
        "`error_window_rows` rows and over all rows since; 1 never stops",
    )
    max_input_error_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        0.5,
        description="the same for rows that could not become a prompt (empty or missing prompt, template "
        "error, too long under on_too_long: skip), as a fraction of the rows read: dirty data runs to the "
        "end with its bad rows as error rows, a job whose prompts all fail stops early; 1 never stops",
    )
    error_window_rows: PositiveInt = Field(100, description="rows judged together at the start")

    @model_validator(mode="after")
    def _index_in_range(self) -> RuntimeSpec:
        if self.task_index >= self.num_tasks:
            raise ValueError(f"runtime.task_index {self.task_index} must be < num_tasks {self.num_tasks}")
        return self


class JobSpec(Section):
    """A whole job, as written in spec.yaml."""

    name: str | None = None
    input: InputSpec
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    output: OutputSpec
    engine: EngineSpec = Field(default_factory=EngineSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)

    @model_validator(mode="after")
    def _prompt_source(self) -> JobSpec:
        requests = self.input.format == "openai-batch"
        if requests != (self.output.format == "openai-batch"):
            raise ValueError("input.format and output.format: openai-batch goes with openai-batch")
        if requests and (self.prompt.sources or self.prompt.chat_template is not None):
            raise ValueError(
                "prompt: with input.format openai-batch each request's body is the prompt; set only "
                "prompt.system, max_tokens or on_too_long"
            )
        if not requests and not self.prompt.sources:
            raise ValueError(_ONE_SOURCE)
        return self

    @property
    def openai_batch(self) -> bool:
        """Input and output are OpenAI Batch API files."""
        return self.input.format == "openai-batch"


_HINTS = {
    "missing": "this field is required",
    "int_parsing": "write a whole number",
    "float_parsing": "write a number",
    "bool_parsing": "write true or false",
}


def _known_keys(loc: tuple) -> list[str]:
    """The keys allowed beside an unknown key at `loc` (aliases as the user writes them)."""
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        ann = model.model_fields[str(part)].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return [f.alias or name for name, f in model.model_fields.items()]


def format_errors(err: ValidationError, source: str) -> str:
    """One line per problem: `<field.path>: <what is wrong> (got <value>) — <hint>`."""
    lines = [f"{source}: {err.error_count()} problem(s) in the spec:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        hint = _HINTS.get(e["type"], "")
        if e["type"] == "extra_forbidden":
            hint = f"unknown key; known here: {', '.join(_known_keys(e['loc']))}"
        msg = e["msg"].removeprefix("Value error, ")
        shows_value = e["type"] not in ("missing", "extra_forbidden", "value_error")
        got = f" (got {e['input']!r})" if shows_value else ""
        lines.append(f"  {where}: {msg}{got}" + (f" — {hint}" if hint else ""))
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "<spec>", base_dir: Path | None = None) -> JobSpec:
    """Validate a spec mapping; relative local paths are taken from `base_dir` (the spec's folder)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping with sections input, prompt, output")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_errors(e, source)) from None
    spec = _anchor_paths(spec, base_dir) if base_dir else spec
    _check_output_outside_input(spec, source)
    return spec.model_copy(update={"sampling": with_schema_file_read(spec.sampling, source)})


def _check_output_outside_input(spec: JobSpec, source: str) -> None:
    """An output that an input path or glob covers would be read back as input by the next run."""
    out = spec.output.path.rstrip("/")
    for path in spec.input.path:
        if _may_read_under(path.rstrip("/"), out):
            raise SpecError(
                f"{source}: output.path {spec.output.path!r} is inside input.path {path!r}: the next run "
                "would read the job's own output as input; write the output outside the input directory"
            )


def _may_read_under(path: str, out: str) -> bool:
    """Whether input `path` (a file, a directory: everything below it, or a glob) can match a file under
    folder `out`: `data/in-*.parquet` or `data/*` never match `data/out/x`, `data/*/x` and `data/**` may."""
    parts, out_parts = path.split("/"), out.split("/")
    if not any(set(p) & set("*?[") for p in parts):
        return out_parts[: len(parts)] == parts
    for i, name in enumerate(out_parts):
        if i == len(parts):
            return False  # the glob matches shallower paths only (a folder it matches is not listed)
        if parts[i] == "**":
            return True
        if not fnmatch.fnmatchcase(name, parts[i]):
            return False
    return len(parts) > len(out_parts)  # the glob goes deeper than `out`: files under it may match


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    return parse_spec(data, str(path), path.resolve().parent)


def _is_local_relative(p: str) -> bool:
    return "://" not in p and not Path(p).is_absolute() and not p.startswith("~")


def _anchor(p: str, base: Path) -> str:
    return str(base / p) if _is_local_relative(p) else p


def _anchor_paths(spec: JobSpec, base: Path) -> JobSpec:
    """Relative paths in a spec file mean relative to that file, wherever batchrun is started."""
    model_path = spec.model.path
    # `models/x` beside the spec is a local path even if x is missing (then it says so), not a hub id
    if _is_local_relative(model_path) and (base / model_path.split("/")[0]).exists():
        model_path = str(base / model_path)
    slurm = spec.runtime.slurm.model_copy(update={"log": _anchor(spec.runtime.slurm.log, base)})
    sampling = spec.sampling
    if isinstance(sampling.json_schema, str):
        sampling = sampling.model_copy(update={"json_schema": _anchor(sampling.json_schema, base)})
    return spec.model_copy(
        update={
            "input": spec.input.model_copy(update={"path": [_anchor(p, base) for p in spec.input.path]}),
            "output": spec.output.model_copy(update={"path": _anchor(spec.output.path, base)}),
            "model": spec.model.model_copy(update={"path": model_path}),
            "runtime": spec.runtime.model_copy(update={"slurm": slurm}),
            "sampling": sampling,
        }
    )
