"""Both backends satisfy the Backend protocol that the generation loop drives."""

from __future__ import annotations

import inspect

import pytest

from runner.backends import Backend, load_backend
from runner.engine import Engine, EngineConfig
from runner.hf_backend import TransformersBackend
from tests.helpers import tiny_llama, tiny_tokenizer

_MEMBERS = [name for name in dir(Backend) if not name.startswith("_")] + [
    "tokenizer",
    "max_model_len",
    "startup",
]


@pytest.fixture(scope="module")
def backends():
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_llama(tokenizer), EngineConfig(device="cpu", kv_cache_tokens=1024), tokenizer)
    hf = TransformersBackend(tiny_llama(tokenizer), tokenizer)
    yield {"engine": engine, "transformers": hf}
    engine.close()
    hf.close()


@pytest.mark.parametrize("name", ["engine", "transformers"])
def test_backend_satisfies_the_protocol(backends, name):
    backend = backends[name]
    assert isinstance(backend, Backend)
    for member in _MEMBERS:
        assert hasattr(backend, member), member
        declared = inspect.getattr_static(Backend, member, None)
        if callable(declared):
            want = list(inspect.signature(declared).parameters)
            got = ["self", *inspect.signature(getattr(backend, member)).parameters]
            assert got == want, (member, got, want)
    assert isinstance(backend.max_model_len, int) and backend.num_unfinished == 0


@pytest.mark.parametrize("kind", ["batchrun", "transformers"])
def test_max_model_len_caps_either_backend(tiny_model_dir, kind):
    backend = load_backend(
        str(tiny_model_dir), kind, EngineConfig(device="cpu", kv_cache_tokens=1024, max_model_len=64)
    )
    try:
        assert backend.max_model_len == 64
    finally:
        backend.close()


def test_the_engine_marks_its_start_up_phases_in_order(tiny_model_dir):
    from runner.engine import Request, SamplingParams

    engine = load_backend(str(tiny_model_dir), "batchrun", EngineConfig(device="cpu", kv_cache_tokens=1024))
    assert list(engine.startup) == ["model_load", "engine_build"]  # CPU: no CUDA context, no graphs
    assert list(engine.generate([Request(0, [5, 6, 7], SamplingParams(max_new_tokens=3))]))
    marks = engine.startup
    assert list(marks) == ["model_load", "engine_build", "first_token"]
    assert marks["model_load"] <= marks["engine_build"] <= marks["first_token"]
    assert engine.stats()["graph_capture_s"] == 0.0
    engine.close()
