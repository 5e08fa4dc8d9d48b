"""`model.revision` reaches every load (config, weights, tokenizer), and the tokenizer is loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from jobs.spec.job import load_spec
from jobs.worker import run_worker
from tests.conftest import read_output, write_inputs, write_spec

HUB_ID = "someorg/tiny-llama"


@pytest.fixture
def loads(monkeypatch, tiny_model_dir: Path) -> list[tuple[str, str | None]]:
    """Every from_pretrained call of the hub id, as (class, revision); it is served from the local tiny
    model folder (no network)."""
    calls: list[tuple[str, str | None]] = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def load(path, *args, _cls=cls, _original=original, **kwargs):
            if str(path) != HUB_ID:  # transformers' own nested loads of the local folder
                return _original(path, *args, **kwargs)
            calls.append((_cls.__name__, kwargs.get("revision")))
            return _original(
                str(tiny_model_dir), *args, **{k: v for k, v in kwargs.items() if k != "revision"}
            )

        monkeypatch.setattr(cls, "from_pretrained", load)
    return calls


@pytest.mark.parametrize("backend", ["batchrun", "transformers"])
def test_revision_reaches_every_load_and_the_tokenizer_loads_once(tmp_path: Path, loads, backend: str):
    write_inputs(tmp_path / "in", parquet=1, jsonl=0, rows=3)
    spec = write_spec(
        tmp_path / "spec.yaml",
        Path("unused"),
        model={"path": HUB_ID, "revision": "v1.2"},
        engine={"backend": backend},
    )
    run_worker(load_spec(spec), show_progress=False)
    assert sum(len(rows) for rows in read_output(tmp_path / "out").values()) == 3
    classes = [name for name, _ in loads]
    assert classes.count("AutoTokenizer") == 1
    assert "AutoModelForCausalLM" in classes
    if backend == "batchrun":
        assert "AutoConfig" in classes
    assert {revision for _, revision in loads} == {"v1.2"}
