"""Llama-family folders load without transformers (`loading/hf_config.py`, `skeleton.py`): the same config,
rope and greedy tokens as transformers gives, and no transformers import on the way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from runner.engine import EngineConfig
from runner.engine.layers.rope import rope_tables, rotary_of
from runner.engine.loading.hf_config import read_light_config
from runner.engine.loading.loader import load_checkpoint, load_config, load_hf_model
from runner.engine.loading.skeleton import Skeleton
from runner.engine.models import model_shape
from tests.engine.conftest import COMMON, CONFIGS, hf_greedy, random_prompts, tiny_model
from tests.engine.test_greedy_parity import check, check_cuda, run_engine

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    },
    "yarn": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
    },
    "yarn-mscale": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False,
    },
}  # fmt: skip


def saved(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[*CONFIGS, "mistral-window"])
def folder(request, tmp_path_factory) -> tuple[Path, object]:
    """(a saved tiny model's folder, the transformers model), one per Llama-family config."""
    if request.param == "mistral-window":  # the window caps the length
        model = tiny_model(MistralConfig(**COMMON, sliding_window=96))
    else:
        model = tiny_model(request.param)
    return saved(model, tmp_path_factory.mktemp(request.param)), model


def test_the_config_and_rope_match_transformers(folder):
    path, model = folder
    light = read_light_config(path)
    assert light is not None
    assert model_shape(light) == model_shape(AutoConfig.from_pretrained(path))
    skeleton = load_hf_model(path, torch.float32, torch.device("cpu"), False)
    assert isinstance(skeleton, Skeleton)
    s = model_shape(light)
    ours = rope_tables(
        skeleton.model.rotary_emb, s.head_dim, s.max_model_len, torch.device("cpu"), torch.float32
    )
    theirs = rope_tables(
        model.model.rotary_emb, s.head_dim, s.max_model_len, torch.device("cpu"), torch.float32
    )
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_greedy_tokens_match_transformers(folder):
    path, model = folder
    prompts = random_prompts(6, 1, 60, seed=3)
    max_new = [12] * len(prompts)
    reference = [hf_greedy(model, p, n) for p, n in zip(prompts, max_new, strict=True)]
    skeleton = load_hf_model(path, torch.float32, torch.device("cpu"), False)
    done, _ = run_engine(skeleton, prompts, max_new, EngineConfig(device="cpu", kv_cache_tokens=4096))
    check(done, prompts, max_new, reference)


@pytest.mark.gpu
def test_greedy_tokens_match_transformers_on_cuda(folder):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    path, model = folder
    prompts = random_prompts(6, 1, 60, seed=3)
    max_new = [12] * len(prompts)
    reference = [hf_greedy(model, p, n) for p, n in zip(prompts, max_new, strict=True)]
    skeleton = load_hf_model(path, torch.float32, torch.device("cuda"), False)
    config = EngineConfig(device="cuda", dtype="float32", kv_cache_tokens=4096)
    done, _ = run_engine(skeleton, prompts, max_new, config)
    check_cuda(done, model, prompts, max_new, reference)


def test_fp8_loads_the_same_through_either_shell(tmp_path):
    """Quantized at load, a Skeleton and transformers' meta model hold the same weights: the same tokens."""
    path = saved(tiny_model("llama"), tmp_path)
    prompts, max_new = random_prompts(4, 1, 40, seed=4), [8] * 4
    runs = []
    for light in (read_light_config(path), None):
        model = load_checkpoint(path, torch.float32, torch.device("cpu"), quantize=True, light_config=light)
        done, _ = run_engine(
            model, prompts, max_new, EngineConfig(device="cpu", kv_cache_tokens=4096, quantization="fp8")
        )
        runs.append([done[i].token_ids for i in range(len(prompts))])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("legacy", [False, True], ids=["rope_parameters", "rope_scaling"])
def test_rotary_of_matches_transformers(tmp_path, name, legacy):
    """Every rope type `rotary_of` computes, from transformers 5's `rope_parameters` and from the older
    `rope_scaling` + `rope_theta` that most hub checkpoints still carry."""
    rope = dict(ROPES[name])
    raw = LlamaConfig(**COMMON, rope_parameters=dict(rope)).to_dict()
    if legacy:
        del raw["rope_parameters"]
        raw["rope_theta"] = rope.pop("rope_theta")
        raw["rope_scaling"] = {"type" if name == "linear" else "rope_type": rope.pop("rope_type"), **rope}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    light = read_light_config(tmp_path)
    ours = rotary_of(light.rope_parameters, light.head_dim, light.max_position_embeddings)
    theirs = LlamaRotaryEmbedding(AutoConfig.from_pretrained(tmp_path))
    assert torch.equal(ours.original_inv_freq, theirs.original_inv_freq)
    assert ours.attention_scaling == theirs.attention_scaling


def test_per_layer_attention_types_load_through_transformers(tmp_path):
    config = Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=96, max_window_layers=1)
    path = saved(tiny_model(config), tmp_path)
    assert read_light_config(path) is None
    assert type(load_hf_model(path, torch.float32, torch.device("cpu"), False)).__name__ == "Qwen2ForCausalLM"


def test_a_config_that_leaves_fields_to_transformers_loads_through_it(tmp_path):
    path = saved(tiny_model("qwen2"), tmp_path)
    raw = json.loads((path / "config.json").read_text())
    del raw["rms_norm_eps"]
    (path / "config.json").write_text(json.dumps(raw))
    assert read_light_config(path) is None
    assert type(load_config(path)).__name__ == "Qwen2Config"
    assert type(load_hf_model(path, torch.float32, torch.device("cpu"), False)).__name__ == "Qwen2ForCausalLM"


def test_a_missing_tensor_is_named(tmp_path):
    path = saved(tiny_model("qwen3"), tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no tensor for model\.layers\.1\.mlp\.down_proj\.weight"):
        load_hf_model(path, torch.float32, torch.device("cpu"), False)


def test_loading_and_building_does_not_import_transformers(tmp_path):
    """What the start-up saves: a job's engine loads and builds without transformers in the process."""
    path = saved(tiny_model("llama"), tmp_path)
    code = f"""
import sys, torch
from runner.engine import Engine, EngineConfig
from runner.engine.loading.loader import load_hf_model
model = load_hf_model({str(path)!r}, torch.float32, torch.device("cpu"), False)
Engine(model, EngineConfig(device="cpu", kv_cache_tokens=1024))
print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[3])  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
