"""The engine with fp8 weights on the CPU (the dequantizing reference path): quantize-at-load, and fp8
checkpoints (compressed-tensors, fbgemm_fp8) read by the loader, which must give the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from runner.engine import Engine, EngineConfig, Request, SamplingParams, UnsupportedModel
from runner.engine.layers.fp8.torch import FP8, Fp8Experts, Fp8Linear, quantize_weight
from tests.engine.conftest import COMMON, random_prompts, tiny_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPRESSED_TENSORS = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                        "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                  "dynamic": True},
        }
    },
}  # fmt: skip
FBGEMM = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
CPU32 = dict(device="cpu", dtype="float32", kv_cache_tokens=4096, page_size=8)
# an MoE: its experts run in fp8 too (`Fp8Experts`); layer 1 keeps a dense MLP, quantized as any other
MODELS = {
    "llama": "llama",  # tied embeddings
    "qwen2": "qwen2",  # q/k/v biases
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **COMMON, num_experts_per_tok=2, moe_intermediate_size=48, num_experts=8, mlp_only_layers=[1]
    ),
}


def model_of(kind: str):
    spec = MODELS[kind]
    return tiny_model(spec if isinstance(spec, str) else spec(), seed=1)


def generate(engine: Engine, prompts: list[list[int]], new: int = 12) -> list[tuple[list[int], list[float]]]:
    sp = SamplingParams(max_new_tokens=new, logprobs=True, ignore_eos=True)
    done = {c.id: c for c in engine.generate(Request(i, p, sp) for i, p in enumerate(prompts))}
    return [(done[i].token_ids, done[i].logprobs) for i in range(len(prompts))]


def write_fp8_checkpoint(model, folder, quantization_config: dict, scale_shape=(-1, 1)) -> None:
    """The model's decoder linears quantized per output channel, saved as an fp8 checkpoint would be."""
    model.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    for key in list(tensors):
        if key.endswith(".weight") and key.split(".")[-2] in LINEARS:
            wq, scale = quantize_weight(tensors[key])
            tensors[key] = wq
            tensors[key.replace(".weight", ".weight_scale")] = scale.reshape(scale_shape)
            tensors[key.replace(".weight", ".input_scale")] = torch.ones(1)  # static scale: not used
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fp8_close_to_full_precision(kind):
    model = model_of(kind)
    prompts = random_prompts(4, 5, 30, seed=2)
    engine = Engine(model, EngineConfig(**CPU32, quantization="fp8"))
    assert isinstance(engine.model.layers[0].qkv, Fp8Linear)
    assert isinstance(engine.model.layers[0].mlp.gate_up, Fp8Experts if kind == "qwen3_moe" else Fp8Linear)
    assert all(
        layer.mlp.gate_up.weight.dtype == layer.mlp.down.weight.dtype == FP8 for layer in engine.model.layers
    )
    fp8 = generate(engine, prompts)
    full = generate(Engine(model, EngineConfig(**CPU32)), prompts)
    # the first token has the same context in both runs: its log-probability moves a little
    for (ta, la), (tb, lb) in zip(fp8, full, strict=True):
        assert len(ta) == 12
        if ta[0] == tb[0]:
            assert abs(la[0] - lb[0]) < 0.15, (la[0], lb[0])
    assert sum(a[0][0] == b[0][0] for a, b in zip(fp8, full, strict=True)) >= 3


@pytest.mark.parametrize("qc", [COMPRESSED_TENSORS, FBGEMM], ids=["compressed-tensors", "fbgemm_fp8"])
def test_fp8_checkpoint_loads_as_stored_and_equals_quantize_at_load(tmp_path, qc):
    model = tiny_model("qwen2", seed=4)
    write_fp8_checkpoint(model, tmp_path, qc)
    prompts = random_prompts(3, 4, 40, seed=3)
    stored = Engine.from_pretrained(tmp_path, EngineConfig(**CPU32))  # fp8 as stored, quantization none
    assert stored.model.layers[1].mlp.down.weight.dtype == FP8
    at_load = Engine(model, EngineConfig(**CPU32, quantization="fp8"))
    assert generate(stored, prompts) == generate(at_load, prompts)


def test_loader_quantizes_a_full_precision_checkpoint_as_it_loads(tmp_path):
    model = tiny_model("llama", seed=5)
    model.save_pretrained(tmp_path)
    prompts = random_prompts(3, 4, 40, seed=4)
    loaded = Engine.from_pretrained(tmp_path, EngineConfig(**CPU32, quantization="fp8"))
    at_load = Engine(model, EngineConfig(**CPU32, quantization="fp8"))
    assert generate(loaded, prompts) == generate(at_load, prompts)


def test_per_tensor_fp8_checkpoint_and_unsupported_schemes(tmp_path):
    model = tiny_model("llama", seed=6)
    write_fp8_checkpoint(model, tmp_path, {"quant_method": "fp8", "activation_scheme": "dynamic"})
    engine = Engine.from_pretrained(tmp_path, EngineConfig(**CPU32))  # per-channel scales load as well
    assert len(generate(engine, random_prompts(1, 5, 5), new=4)[0][0]) == 4
    config = json.loads((tmp_path / "config.json").read_text())
    for qc, why in [
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
        ({"quant_method": "awq", "bits": 4}, "awq"),
        ({**COMPRESSED_TENSORS, "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int",
                                                                     "strategy": "group"}}}}, "int 4-bit"),
    ]:  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
        with pytest.raises(UnsupportedModel, match=why):
            Engine.from_pretrained(tmp_path, EngineConfig(**CPU32))


def test_fp8_modules_on_the_device_share_the_fused_weights():
    """A model whose fp8 weights already sit on the engine's device (the loader's, or bench W70's) is not
    held twice: its q/k/v and gate/up modules end up as views of the engine's fused matrices."""
    model = tiny_model("llama", seed=7)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in LINEARS:
                wq, module.weight_scale = quantize_weight(module.weight)
                module.weight = torch.nn.Parameter(wq, requires_grad=False)
    engine = Engine(model, EngineConfig(**CPU32))
    att, layer = model.model.layers[0].self_attn, engine.model.layers[0]
    assert att.q_proj.weight.data_ptr() == layer.qkv.weight.data_ptr()
    assert att.k_proj.weight.untyped_storage().data_ptr() == layer.qkv.weight.untyped_storage().data_ptr()
    assert model.model.layers[1].mlp.up_proj.weight.untyped_storage().data_ptr() == (
        engine.model.layers[1].mlp.gate_up.weight.untyped_storage().data_ptr()
    )
    assert len(generate(engine, random_prompts(2, 5, 9), new=3)[1][0]) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["qwen2", "qwen3_moe"])
def test_fp8_on_cuda_tracks_the_cpu_reference(kind):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a CUDA GPU with compute capability 9.0+")
    model = model_of(kind)
    prompts = random_prompts(6, 5, 60, seed=2)
    ref = generate(Engine(model, EngineConfig(**CPU32, quantization="fp8")), prompts)
    cuda = dict(device="cuda", kv_cache_tokens=4096, page_size=8, quantization="fp8")
    for dtype in ("float32", "bfloat16"):
        engine = Engine(model, EngineConfig(**cuda, dtype=dtype))
        assert engine.model.layers[0].qkv.fast and engine.model.layers[1].mlp.down.fast
        got = generate(engine, prompts)
        assert engine.stats()["graph_steps"] > 0
        # _scaled_mm rounds its output to bf16: first tokens agree, their log-probabilities are close
        assert sum(a[0][0] == b[0][0] for a, b in zip(got, ref, strict=True)) >= 5
        for (ta, la), (tb, lb) in zip(got, ref, strict=True):
            if ta[0] == tb[0]:
                assert abs(la[0] - lb[0]) < 0.1
        sync = generate(Engine(model, EngineConfig(**cuda, dtype=dtype, async_mode=False)), prompts)
        assert [t for t, _ in sync] == [t for t, _ in got]


MOE_CHECKPOINTS = {
    "qwen3_moe": MODELS["qwen3_moe"],
    "qwen2_moe": lambda: Qwen2MoeConfig(  # shared expert and its gate (kept in the model dtype)
        **COMMON,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        num_experts=4,
        shared_expert_intermediate_size=80,
    ),
    "mixtral": lambda: MixtralConfig(  # stored as block_sparse_moe.experts.N.w1/w3/w2
        **{**COMMON, "intermediate_size": 48}, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
    ),
}


@pytest.mark.parametrize("kind", sorted(MOE_CHECKPOINTS))
def test_moe_checkpoint_quantized_at_load_equals_the_model_in_memory(tmp_path, kind):
    """A checkpoint stores each expert apart; the loader stacks them as transformers 5 holds them, so
    `quantization: fp8` from the folder gives the tokens and log-probabilities of the model in memory."""
    model = tiny_model(MOE_CHECKPOINTS[kind](), seed=1)
    model.save_pretrained(tmp_path)
    assert any(".experts.0." in key for key in load_file(tmp_path / "model.safetensors"))
    prompts = random_prompts(3, 5, 30, seed=2)
    config = EngineConfig(**CPU32, quantization="fp8")
    from_folder = Engine.from_pretrained(str(tmp_path), config=config, tokenizer=None)
    assert isinstance(from_folder.model.layers[0].mlp.gate_up, Fp8Experts)
    assert generate(from_folder, prompts) == generate(Engine(model, config), prompts)


def test_moe_checkpoint_missing_an_expert_is_an_error(tmp_path):
    tiny_model(MOE_CHECKPOINTS["qwen3_moe"](), seed=1).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"has 15 of the 16 expert tensors of model\.layers\.0\.mlp\.experts\.gate_up_proj"
    ):
        Engine.from_pretrained(
            str(tmp_path), config=EngineConfig(**CPU32, quantization="fp8"), tokenizer=None
        )


def test_moe_checkpoint_stored_in_fp8_is_sent_to_the_fallback(tmp_path):
    """Stored fp8 experts (their own scales per expert) are not read: the engine says so before loading,
    and the runner falls back, rather than take fp8 values for bf16 ones."""
    model = tiny_model(MOE_CHECKPOINTS["qwen3_moe"](), seed=1)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for key in [k for k in tensors if ".experts." in k]:
        tensors[key], tensors[key.replace(".weight", ".weight_scale")] = quantize_weight(tensors[key])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"quantization_config": FBGEMM}))
    with pytest.raises(UnsupportedModel, match="a mixture of experts stored in fp8 \\(fbgemm_fp8\\)"):
        Engine.from_pretrained(str(tmp_path), config=EngineConfig(**CPU32), tokenizer=None)
