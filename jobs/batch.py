"""`batchrun batch IN.jsonl --model PATH --output DIR`: an OpenAI batch file run without writing a spec.

The equivalent spec is written to `DIR/spec.yaml` (input and model paths absolute, the output `.`, so
the spec stays valid where DIR goes) and the job runs from it, so `batchrun status DIR/spec.yaml`,
resuming with `batchrun submit DIR/spec.yaml` (or the same `batch` command) and Slurm work as usual.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from jobs.spec.job import SpecError, parse_spec

SPEC_NAME = "spec.yaml"


def write_batch_spec(inputs: list[str], model: str, output: str) -> Path:
    """Write the spec of an OpenAI batch job into the `output` directory; returns its path.

    Raises SpecError for an output URL (the spec file must be local) or a spec that does not validate.
    """
    if "://" in output:
        raise SpecError(
            f"--output {output}: `batchrun batch` writes its spec into a local directory; for an object "
            "store write a spec with input.format and output.format openai-batch and use `batchrun submit`"
        )
    folder = Path(output).expanduser().absolute()
    data = {
        "input": {"path": [_absolute(p) for p in inputs], "format": "openai-batch"},
        "model": {"path": _absolute(model) if os.path.exists(model) else model},
        "output": {"path": ".", "format": "openai-batch"},
    }
    parse_spec(data, "batchrun batch", folder)  # refuse a bad one before writing it
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SPEC_NAME
    path.write_text(
        "# written by `batchrun batch`; run it again with `batchrun submit` (this file)\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    return path


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().absolute())
