"""Load a safetensors checkpoint tensor by tensor, with fp8 linear weights as fp8.

Used by `Engine.from_pretrained`. The checkpoint's tensors go into a shell: a `Skeleton` for the
Llama-family folders that `loading/hf_config.py` reads (no transformers import: the start-up's largest
cost), else a transformers model built on the meta device. When the checkpoint is stored in fp8
(its `quantization_config`, see `loading/quantization.py`), when `engine.quantization` is `fp8`, or under
tensor parallelism, each tensor goes straight from the file to the device, so a model never needs
its high-precision copy in host memory (a 70B bf16 checkpoint quantizes to ~70 GB on one GPU);
otherwise to the host, as transformers would load it, and the engine copies what it uses.

A linear module whose weight is fp8 carries it as `module.weight` (float8_e4m3fn [N, K]) and its
scales as `module.weight_scale` (fp32, [N] or one per-tensor value): the same form whether the file
stored it so or the loader quantized it (`quantize=True`: every `nn.Linear` in the decoder layers but
an MoE's router and shared-expert gate, per output channel; embeddings, norms and the LM head stay in
`dtype`).

An MoE checkpoint stores each expert's projections apart (`mlp.experts.3.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.3.w1.weight`: transformers 5 calls the block `mlp`) where transformers 5
holds them stacked (`experts.gate_up_proj` [E, 2 I, H], `experts.down_proj` [E, H, I]): each lands
in its expert's slice of the stack, in `dtype` (the engine quantizes stacked experts itself,
`fp8.Fp8Experts`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from runner.engine.layers.fp8.torch import FP8, quantize_weight
from runner.engine.loading.hf_config import read_light_config
from runner.engine.loading.quantization import UNUSED_SUFFIXES, read_quantization
from runner.engine.loading.skeleton import Skeleton
from runner.engine.parallel.layers import SINGLE, TensorParallel
from runner.engine.parallel.weight_split import HeadSplit, cut, split_decoder
from runner.engine.types import UnsupportedModel

log = logging.getLogger(__name__)

ROUTERS = (".gate", ".shared_expert_gate")
# one expert's projection in a checkpoint: gate / up -> halves of gate_up_proj, down -> down_proj
EXPERT_KEY = re.compile(r"(.+)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
STACKED = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
           "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", 0), "w2": ("down_proj", 0)}  # fmt: skip


def safetensors_files(path: str | Path) -> list[Path] | None:
    """The checkpoint's safetensors files (one or several), None when the folder has none."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    return [single] if single.is_file() else None


def load_hf_model(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    fp8: bool,
    hf_config=None,
    revision=None,
    tp: TensorParallel = SINGLE,
):
    """The model `Engine.from_pretrained` builds on: fp8 checkpoints (and any safetensors checkpoint when
    `fp8` or tensor-parallel) tensor by tensor onto `device`; others onto the host. A Llama-family
    safetensors folder (`loading/hf_config.py`) loads into a `Skeleton` without importing transformers;
    the rest load through transformers. `tp`: the decoder layers are cut to the rank's slice.

    Raises UnsupportedModel for quantization schemes the fast path does not run.
    """
    config = hf_config or load_config(path, revision)
    light = config if isinstance(config, SimpleNamespace) else None  # read without transformers
    files = safetensors_files(path)
    stored = read_quantization(config)
    on_device = bool(stored or fp8 or tp.size > 1)
    if files and (light or on_device):
        return load_checkpoint(path, dtype, device if on_device else torch.device("cpu"), fp8, tp, light)
    if stored:
        raise UnsupportedModel(
            f"{path}: an fp8 checkpoint loads from a local folder of safetensors files (download it first)"
        )
    from transformers import AutoModelForCausalLM

    # fp8: the engine quantizes as it copies the weights
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision)
    split_decoder(model, tp)
    return model


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    quantize: bool,
    tp: TensorParallel = SINGLE,
    light_config=None,
):
    """The model of the safetensors checkpoint at `path` with its tensors on `device`: a `Skeleton` of
    `light_config` (a `model_config.read_light_config` namespace), else a transformers causal LM.

    fp8-stored linear weights stay fp8 (with `weight_scale`); with `quantize`, the decoder layers'
    high-precision linear weights are quantized to fp8 on the device as they load. `tp`: each decoder
    tensor is cut to the rank's slice as it is read, so a rank holds only its part.
    """
    from safetensors import safe_open

    files = safetensors_files(path)
    assert files, f"{path}: no safetensors files"  # the caller checks first
    if light_config is not None:
        config = light_config
        stored = read_quantization(config)
        model = Skeleton(config, _shapes(files), Path(path))
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        stored = read_quantization(config)
        model = _meta_model(config, dtype)
        if stored is not None and any(
            n.endswith(".experts.gate_up_proj") for n, _ in model.named_parameters()
        ):
            raise UnsupportedModel(
                f"{path}: a mixture of experts stored in fp8 ({stored.method}); the fast path quantizes "
                "experts itself: run the high-precision checkpoint with engine.quantization: fp8"
            )
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and _in_layers(name)]
    # an MoE's router and shared-expert gate stay in the model dtype (layers/moe/torch.py reads them so)
    quantizable = {n for n in linears if not n.endswith(ROUTERS)} if quantize else set()
    split = HeadSplit.of(config, tp) if tp.size > 1 else None
    num_fp8 = 0
    expert_parts: dict[str, int] = {}  # stacked expert parameter -> expert slices filled
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_tensor(name)
                key = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's block, transformers 5's name
                if EXPERT_KEY.fullmatch(key):
                    t = cut(key, t, split, tp).contiguous() if split is not None else t
                    _load_expert(model, key, t, dtype, expert_parts)
                    continue
                if split is not None and _in_layers(key):
                    module = model.get_submodule(key.rpartition(".")[0])
                    t = cut(key, t, split, tp, getattr(module, "is_transposed", False)).contiguous()
                num_fp8 += _load_tensor(model, key, t, dtype, quantizable)
    if light_config is None:
        _check_experts(model, path, expert_parts)
        _finish_transformers_model(model, path, device)
    if stored or quantize:
        how = f"stored so, {stored.method}" if stored else "quantized as they loaded"
        log.info("loaded %s: %d fp8 linear weights (%s)", path, num_fp8, how)
    else:
        log.info("loaded %s", path)
    return model.eval()


def load_config(path: str | Path, revision: str | None = None):
    """The model's config: read without transformers for the folders `loading/hf_config.py` reads, else
    transformers' AutoConfig (a hub id at `revision`, or any other model type)."""
    light = read_light_config(path)
    if light is not None:
        return light
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, revision=revision)


def _meta_model(config, dtype: torch.dtype):
    """A transformers causal LM of `config` on the meta device: the shell a checkpoint that
    `loading/hf_config.py` does not read loads into."""
    from transformers import AutoModelForCausalLM

    config.__dict__.pop("quantization_config", None)  # we load the fp8 tensors, not transformers
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _finish_transformers_model(model, path: str | Path, device: torch.device) -> None:
    """Tie the LM head, rebuild the rotary buffers, check that every parameter loaded, and read the
    generation config of a transformers model filled from a checkpoint."""
    from transformers import GenerationConfig

    if model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    rebuild_buffers(model, device)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: the checkpoint has no tensor for {', '.join(missing[:5])}")
    with contextlib.suppress(OSError):  # no generation_config.json: keep the one built from config
        model.generation_config = GenerationConfig.from_pretrained(path)


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor name in the checkpoint's files -> its shape, from the headers (no tensor is read)."""
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _in_layers(module_name: str) -> bool:
    return ".layers." in f".{module_name}"


def _load_tensor(model, key: str, t: torch.Tensor, dtype: torch.dtype, quantizable: set[str]) -> int:
    """Put one checkpoint tensor into `model`; returns 1 when it made an fp8 weight."""
    prefix, _, leaf = key.rpartition(".")
    if key.endswith(UNUSED_SUFFIXES):
        return 0
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        log.debug("checkpoint tensor %s has no place in the model; skipped", key)
        return 0
    if leaf == "weight_scale":
        module.weight_scale = t.float()
        return 0
    if leaf == "weight" and t.dtype == FP8:
        module.weight = nn.Parameter(t, requires_grad=False)
        return 1
    if leaf == "weight" and prefix in quantizable:
        wq, module.weight_scale = quantize_weight(t)
        module.weight = nn.Parameter(wq, requires_grad=False)
        return 1
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(t.to(dtype), requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = t.to(dtype) if t.is_floating_point() else t
    else:
        log.debug("checkpoint tensor %s has no place in the model; skipped", key)
    return 0


def _load_expert(model, key: str, t: torch.Tensor, dtype: torch.dtype, parts: dict[str, int]) -> None:
    """Copy one expert's projection t ([N, K], this rank's rows or columns) into its slice of the stack."""
    block, expert, proj = EXPERT_KEY.fullmatch(key).groups()
    experts = model.get_submodule(f"{block}.experts")
    name, half = STACKED[proj]
    stacked = getattr(experts, name)
    transposed = getattr(experts, "is_transposed", False)
    if stacked.is_meta:  # the first expert tensor of this stack: allocate it (the rank's part) where t is
        n, k = t.shape[0] * (2 if name == "gate_up_proj" else 1), t.shape[1]
        shape = (stacked.shape[0], k, n) if transposed else (stacked.shape[0], n, k)
        stacked = nn.Parameter(torch.empty(shape, dtype=dtype, device=t.device), requires_grad=False)
        setattr(experts, name, stacked)
    rows = stacked.data[int(expert)]  # [2 I, H] or [H, I] (transposed: [H, 2 I] or [I, H])
    if transposed:
        rows = rows.t()
    if name == "gate_up_proj":
        rows = rows.narrow(0, half * t.shape[0], t.shape[0])
    rows.copy_(t)
    full = f"{block}.experts.{name}"
    parts[full] = parts.get(full, 0) + 1


def _check_experts(model, path: str | Path, parts: dict[str, int]) -> None:
    """Every expert slice of every stack filled (gate_up: two parts an expert, down: one)."""
    for full, count in parts.items():
        block, _, name = full.rpartition(".experts.")
        per_expert = 2 if name == "gate_up_proj" else 1
        expected = getattr(model.get_submodule(f"{block}.experts"), name).shape[0] * per_expert
        if count != expected:
            raise ValueError(f"{path}: the checkpoint has {count} of the {expected} expert tensors of {full}")


def rebuild_buffers(model, device: torch.device) -> None:
    """Non-persistent buffers (the rotary module's inv_freq) are not in the file: build those modules anew."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "rope_type"):
                raise ValueError(f"module {name} has buffers that the checkpoint does not hold")
            with torch.device(device):
                rebuilt = type(module)(config=model.config)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, rebuilt)
