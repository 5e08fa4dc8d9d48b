"""`Engine.close()` gives back every byte the engine took on the device (KV pool, weights, graphs and
their pool, token and staging buffers, cuBLAS workspaces)."""

from __future__ import annotations

import gc

import pytest
import torch

from runner.engine import Engine, EngineConfig, Request, SamplingParams
from tests.engine.conftest import random_prompts, tiny_model


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_close_gives_back_all_device_memory(cuda_graphs: bool):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model("llama")
    torch.cuda.synchronize()
    gc.collect()
    torch._C._cuda_clearCublasWorkspaces()  # earlier tests' workspaces, which close() would also free
    baseline = torch.cuda.memory_allocated()
    engine = Engine(model, EngineConfig(device="cuda", dtype="float32", cuda_graphs=cuda_graphs, max_seqs=64))
    prompts = random_prompts(40, 1, 300, seed=2)
    requests = [Request(i, p, SamplingParams(max_new_tokens=12, temperature=0.8 * (i % 2), seed=i))
                for i, p in enumerate(prompts)]  # fmt: skip
    assert len(list(engine.generate(requests))) == 40
    assert (engine.stats()["graphs_captured"] > 0) == cuda_graphs
    assert (engine.stats()["graph_capture_s"] > 0) == cuda_graphs  # the time they took, for the report
    assert torch.cuda.memory_allocated() > baseline + engine.kv.num_pages * engine.stats()["kv_page_bytes"]
    engine.close()
    assert torch.cuda.memory_allocated() == baseline
    del engine
    gc.collect()
    assert torch.cuda.memory_allocated() == baseline
