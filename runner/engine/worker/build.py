"""What every rank builds from a loaded transformers model: our forward (its slice in a tensor-parallel
group), the KV pool sized to the device's free memory (the ranks agree on the smallest), and the model
runner; and the loop a spawned rank runs (`follow`)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from runner.engine.config import EngineConfig
from runner.engine.core.kv import KVManager
from runner.engine.core.kv.sizing import MemoryPlan, check_weights_fit, kv_pool_pages, step_workspace_bytes
from runner.engine.layers.attention.cpu import batched_attention
from runner.engine.layers.linear import engine_weight_bytes
from runner.engine.loading.source import ModelSource
from runner.engine.models import PagedModel, build_model, model_shape
from runner.engine.parallel.group import Group, StepChannel, rank_device
from runner.engine.parallel.layers import SINGLE, TensorParallel
from runner.engine.worker.model_runner import ModelRunner

CPU_DEFAULT_KV_TOKENS = 32768


def build_runner(
    model, config: EngineConfig, group: Group | None
) -> tuple[PagedModel, KVManager, ModelRunner]:
    """Our forward of a transformers `model` (a rank's slice in a group), its KV pool and its model
    runner: what every rank of a tensor-parallel group builds alike (the ranks agree on the pool)."""
    tp = group.tp if group is not None else SINGLE
    shape = model_shape(model.config)
    device = rank_device(config.resolve_device(), tp.rank)
    dtype = config.resolve_dtype(device)
    max_model_len = config.resolve_max_model_len(shape.max_model_len)
    fp8 = config.quantization == "fp8"
    weights, to_copy = engine_weight_bytes(model, device, dtype, fp8)
    memory = _device_memory(device)
    if memory is not None:
        check_weights_fit(to_copy, *memory, str(device), str(dtype).removeprefix("torch."))
    kv_dtype = config.resolve_kv_dtype(device, dtype)
    paged = build_model(model, device, dtype, fp8=fp8, tp=tp)
    # eager steps from piece graphs along the decode graphs; a group's ranks run eager steps eagerly
    piece_tokens = config.max_batch_tokens if config.cuda_graphs and tp.size == 1 else 0
    num_pages = _num_pages(config, paged, kv_dtype, device, weights, max_model_len, piece_tokens > 0)
    if group is not None:  # the smallest pool any rank has room for
        pages = torch.tensor([num_pages])
        with group.collective():  # waits for every rank's model: one that failed to load stops the group
            dist.all_reduce(pages, op=dist.ReduceOp.MIN, group=group.channel.group)
        num_pages = int(pages)
    if device.type == "cuda":
        from runner.engine.layers.attention.triton import paged_attention as attention
    else:
        attention = batched_attention
    kv = KVManager(num_pages, config.page_size, config.max_seqs, -(-max_model_len // config.page_size))
    lead = group if group is not None and tp.rank == 0 else None
    runner = ModelRunner(
        paged,
        kv.table,
        num_pages,
        config.page_size,
        kv_dtype,
        attention,
        config.cuda_graphs,
        lead,
        piece_tokens,
    )
    return paged, kv, runner


def follow(
    config: EngineConfig, tp: TensorParallel, channel: StepChannel, source: ModelSource, device
) -> None:
    """A spawned rank of a tensor-parallel group (`group.start_group`): load this rank's slice of the
    model, build the same runner as rank 0, and run rank 0's steps until it closes the engine."""
    model = source.load(config.resolve_dtype(device), device, config.quantization == "fp8", tp)
    _, _, runner = build_runner(model, config, Group(tp, channel, []))
    runner.capture_graphs()  # with rank 0's
    runner.follow(channel)


def _num_pages(
    config: EngineConfig,
    model: PagedModel,
    kv_dtype: torch.dtype,
    device: torch.device,
    weights: int,
    max_len: int,
    piece_graphs: bool,
) -> int:
    """KV pages for the pool: `kv_cache_tokens`, a fixed default on the CPU, else what the device's free
    memory holds after the weights and the step workspace (the model reports its activations), in
    pages of `kv_dtype` (fp8: half the bytes of bf16, so twice the pages). `piece_graphs`: eager steps may run
    from piece graphs (CUDA graphs on, a single rank)."""
    if config.kv_cache_tokens is not None:
        return config.kv_cache_tokens // config.page_size
    memory = _device_memory(device)
    if memory is None:
        return CPU_DEFAULT_KV_TOKENS // config.page_size
    s, itemsize = model.shape, model.dtype.itemsize
    workspace = step_workspace_bytes(
        config.max_batch_tokens,
        config.max_seqs,
        model.activation_width(),
        s.vocab,
        itemsize,
        config.cuda_graphs,
        piece_graphs,
    )
    page_bytes = s.num_layers * 2 * config.page_size * s.num_kv_heads * s.head_dim * kv_dtype.itemsize
    plan = MemoryPlan(*memory, weights, workspace, page_bytes, config.page_size)
    return kv_pool_pages(plan, config.kv_memory_fraction, max_len, config.max_seqs, config.max_batch_tokens)


def _device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device; None elsewhere (the CPU pool has a fixed default size)."""
    return torch.cuda.mem_get_info(device) if device.type == "cuda" else None
