"""The MoE layer: routing as transformers routes, the block sort, the torch twin against transformers'
sparse blocks, and the Triton kernels against the twin (interpreter on the CPU; fp32/bf16 and a CUDA
graph on the GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from runner.engine.layers.fp8.torch import Fp8Experts, quantize_weight
from runner.engine.layers.moe.torch import SparseMoE, experts_torch, route
from runner.engine.layers.ops.torch import TorchOps
from tests.engine.conftest import run_in_triton_interpreter
from tests.engine.layers.moe.triton_cases import CASES, inputs, max_error


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


TORCH_OPS = SimpleNamespace(silu_mul=_silu_mul)


@pytest.mark.parametrize("renormalize", [False, True])
def test_route_is_softmax_topk_and_optional_renormalisation(renormalize):
    logits = torch.randn(7, 8, generator=torch.Generator().manual_seed(0))
    weights, ids = route(logits, 3, renormalize, torch.float32)
    probs = logits.softmax(-1)
    assert torch.equal(ids, probs.topk(3).indices)
    expected = probs.gather(1, ids)
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
        # Mixtral's form: softmax over the top-k logits is the same distribution
        torch.testing.assert_close(weights, logits.gather(1, ids).softmax(-1))
    torch.testing.assert_close(weights, expected)
    assert route(logits.bfloat16(), 3, renormalize, torch.bfloat16)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("tokens, top_k, experts, block", [(1, 2, 8, 16), (13, 3, 8, 4), (50, 2, 4, 16)])
def test_align_blocks_groups_pairs_by_expert(tokens, top_k, experts, block):
    pytest.importorskip("triton")
    from runner.engine.layers.moe.triton import align_blocks

    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])  # [T, k], distinct per row
    pairs, block_expert, num_used = align_blocks(ids, experts, block)
    num_pairs = tokens * top_k
    assert pairs.numel() % block == 0 and block_expert.numel() == pairs.numel() // block
    assert pairs.numel() >= num_pairs + min(experts, num_pairs) * (
        block - 1
    )  # the bound, whatever the routing
    used = int(num_used)
    assert used % block == 0 and (pairs[used:] == num_pairs).all()
    real = pairs[pairs < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once
    flat = ids.flatten()
    for b in range(used // block):
        rows = pairs[b * block : (b + 1) * block]
        rows = rows[rows < num_pairs]
        assert len(rows) and (flat[rows.long()] == block_expert[b]).all()
        assert rows.tolist() == sorted(rows.tolist())  # token order within an expert
    counts = torch.bincount(flat, minlength=experts)
    assert used == int(((counts + block - 1) // block * block).sum())


def _qwen3_moe_block(norm_topk_prob: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(
        hidden_size=32, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
    )  # fmt: skip
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return config, block


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_sparse_moe_equals_transformers_block(norm_topk_prob):
    config, block = _qwen3_moe_block(norm_topk_prob)
    ours = SparseMoE.from_hf(
        block, config.num_experts_per_tok, norm_topk_prob, torch.device("cpu"), torch.float32
    )
    assert ours.gate_up.shape == (6, 48, 32) and ours.down.shape == (6, 32, 24)
    x = torch.randn(9, 32)
    with torch.no_grad():
        expected = block(x[None])[0]
    torch.testing.assert_close(ours(x, TORCH_OPS), expected, rtol=1e-5, atol=1e-5)


def test_fused_moe_matches_torch_in_the_interpreter():
    out = run_in_triton_interpreter("tests.engine.layers.moe.triton_cases")
    assert out.count("max error") == out.count("fp8 gemm error") == len(CASES), out


def test_fp8_experts_are_each_expert_quantized_as_a_linear_and_stay_close():
    """`fp8=True` stacks the experts in fp8, each expert's rows quantized as an fp8 linear's; the block's
    output (activations quantized per token and per pair) stays within fp8 precision of transformers'."""
    config, block = _qwen3_moe_block(True)
    ours = SparseMoE.from_hf(block, 2, True, torch.device("cpu"), torch.float32, fp8=True)
    assert isinstance(ours.gate_up, Fp8Experts) and ours.down.shape == (6, 32, 24)
    wq, scale = quantize_weight(block.experts.down_proj[3].detach())
    assert torch.equal(ours.down.weight[3].float(), wq.float()) and torch.equal(ours.down.scale[3], scale)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = block(x[None])[0]
    got = ours(x, TorchOps)
    error = ((got - expected).norm() / expected.norm()).item()
    assert 1e-4 < error < 0.1, error  # quantized (not the fp32 result): two fp8 products (3 mantissa bits)


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
def test_fused_moe_on_cuda(case):
    _cuda()
    assert max_error(case, "cuda", torch.float32, _silu_mul) < 1e-5
    # bf16: the kernel sums the k choices in fp32 once, transformers adds them one rounding at a time
    assert max_error(case, "cuda", torch.bfloat16, _silu_mul) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
def test_fused_fp8_experts_on_cuda(case):
    """fp8 experts: the kernels (fp8 tensor-core products) against the torch reference on the same
    quantized weights, activations quantized by the Triton kernels in both."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with fp8 (compute capability 8.9+)")
    from runner.engine.layers.moe.triton import fused_experts
    from runner.engine.layers.ops import triton as fused
    from tests.engine.layers.moe.triton_cases import _error, fp8_gemm_error

    # Hopper's fp8 tensor cores accumulate in reduced precision within a product (fast accumulation,
    # as the dense fp8 GEMMs run): ~1e-4 relative on the 64-row and larger tiles, exact on the 16-row ones
    assert fp8_gemm_error(case, "cuda") < 1e-3
    for dtype in (torch.float32, torch.bfloat16):
        x, gate_up, down, weights, ids = inputs(case, "cuda", dtype)
        experts = Fp8Experts.quantize(gate_up), Fp8Experts.quantize(down)
        got = fused_experts(x, *experts, weights, ids, fused.silu_mul)
        # the sum over the k choices in another order moves an intermediate across an fp8 rounding
        # now and then: one fp8 step (2^-4) of one term
        assert _error(got, experts_torch(x, *experts, weights, ids, fused.silu_mul)) < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False], ids=["triton", "torch"])
def test_moe_replays_in_a_cuda_graph_without_host_syncs(fused):
    """Captured once, replayed with other tokens and another routing: same as eager (a host sync or a
    data-dependent shape would fail the capture or give stale results)."""
    _cuda()
    from runner.engine.layers.moe.triton import fused_experts

    experts = fused_experts if fused else experts_torch
    case = (7, 24, 64, 48, 8, 2, False)
    x, gate_up, down, weights, ids = inputs(case, "cuda", torch.float32)
    static = [t.clone() for t in (x, weights, ids)]
    experts(*static[:1], gate_up, down, *static[1:], _silu_mul)  # warm up: compile kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = experts(static[0], gate_up, down, static[1], static[2], _silu_mul)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for seed in (8, 9):
        x2, _, _, w2, ids2 = inputs((seed, *case[1:]), "cuda", torch.float32)
        for dst, src in zip(static, (x2, w2, ids2), strict=True):
            dst.copy_(src)
        graph.replay()
        torch.testing.assert_close(
            out, experts_torch(x2, gate_up, down, w2, ids2, _silu_mul), rtol=1e-5, atol=1e-5
        )


def test_stacked_experts_from_a_module_list():
    """transformers 4 keeps experts as a ModuleList of MLPs (Mixtral: w1 gate, w3 up, w2 down)."""
    from runner.engine.layers.moe.torch import stacked_experts

    _, block = _qwen3_moe_block(True)
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    inter = down.shape[2]

    def linear(w: torch.Tensor) -> torch.nn.Linear:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight.data.copy_(w)
        return layer

    for names in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        experts = torch.nn.ModuleList()
        for e in range(gate_up.shape[0]):
            mlp = torch.nn.Module()
            for name, w in zip(names, (gate_up[e, :inter], gate_up[e, inter:], down[e]), strict=True):
                setattr(mlp, name, linear(w))
            experts.append(mlp)
        got = stacked_experts(experts, torch.device("cpu"), torch.float32)
        assert torch.equal(got[0], gate_up) and torch.equal(got[1], down)
