"""Decode paged attention on the GPU: time per launch and KV read rate of every tile (keys per iteration,
warps, pipeline stages) at the decode shapes of W1, W2 and W3 (512 or 256 sequences of random context
lengths, 8 KV heads of 4 query heads each), over a bf16 cache and an fp8 cache, the fp8 one with its
dots in bf16 (`fp8-bf16dot`; `attn-decode-sweep.json` calls it `fp8`) and in fp16 (`fp8`, what the
engine runs). Each launch is timed in a CUDA graph of 10; outputs are checked against the current
tile's (BLOCK_N 64, 4 warps, 2 stages, bf16 dots) over the same cache.

    python scripts/sweep_decode_attention.py --out attn-decode-sweep.json [--current-only]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.engine.layers.fp8_format import FP8  # noqa: E402
from runner.engine.layers.paged_attention import _paged_attention_kernel  # noqa: E402

PAGE = 16
# name: (sequences, KV heads, query heads per KV head, head dim, shortest and longest context)
SHAPES = {"W3": (512, 8, 4, 128, 129, 256), "W1": (512, 8, 4, 64, 64, 1024), "W2": (256, 8, 4, 128, 64, 896)}
TILES = list(itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4)))  # (BLOCK_N, warps, stages)
CURRENT = (64, 4, 2)


def decode_batch(seqs: int, kv_heads: int, group: int, dim: int, lo: int, hi: int, fp8: bool) -> dict:
    """One query per sequence, contexts uniform in [lo, hi] on shuffled pages of a random KV cache."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(lo, hi + 1, (seqs,), generator=g)  # [B]
    pages = (ctx + PAGE - 1) // PAGE
    order = torch.randperm(int(pages.sum()), generator=g) + 1  # page 0 is the padding page
    table = torch.zeros(seqs, int(pages.max()), dtype=torch.int64)  # [B, W]
    for b, (start, n) in enumerate(
        zip((torch.cumsum(pages, 0) - pages).tolist(), pages.tolist(), strict=True)
    ):
        table[b, :n] = order[start : start + n]
    shape = (int(pages.sum()) + 1, PAGE, kv_heads, dim)
    k, v = ((torch.randn(shape) * 0.5).to("cuda", torch.bfloat16) for _ in range(2))
    if fp8:
        k, v = k.to(FP8), v.to(FP8)
    q = torch.randn(seqs, kv_heads * group, dim, device="cuda", dtype=torch.bfloat16)
    return dict(
        q=q, k=k, v=v, table=table.cuda(), cu=torch.arange(seqs + 1, device="cuda"), kv_lens=ctx.cuda(),
        group=group, kv_bytes=int(ctx.sum()) * kv_heads * dim * 2 * k.element_size(),
    )  # fmt: skip


def launch(c: dict, out: torch.Tensor, half_dot: bool, block_n: int, warps: int, stages: int) -> None:
    q, k, v, table = c["q"], c["k"], c["v"], c["table"]
    dim = q.shape[2]
    _paged_attention_kernel[(q.shape[0], k.shape[2])](
        q, k, v, out, table, c["cu"], c["kv_lens"], c["cu"], c["cu"], dim**-0.5, 0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1),
        table.stride(0), GROUP=c["group"], BLOCK_Q=1, BLOCK_M=max(16, triton.next_power_of_2(c["group"])),
        BLOCK_N=block_n, PAGE=PAGE, D=dim, D_PAD=max(16, triton.next_power_of_2(dim)), DECODE=True,
        IEEE=False, SOFTCAP=0.0, WINDOWED=False, HALF_DOT=half_dot, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def seconds_per_launch(fn, reps: int = 50) -> float:
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / (reps * 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="attn-decode-sweep.json")
    ap.add_argument("--current-only", action="store_true", help="time the engine's tile alone")
    args = ap.parse_args()
    tiles = [CURRENT] if args.current_only else TILES
    rows = []
    variants = {"bf16": [("bf16", False)], "fp8": [("fp8-bf16dot", False), ("fp8", True)]}
    for (name, shape), cache in itertools.product(SHAPES.items(), variants):
        c = decode_batch(*shape, fp8=cache == "fp8")
        reference = torch.empty_like(c["q"])
        launch(c, reference, False, *CURRENT)
        for (kv, half), tile in itertools.product(variants[cache], tiles):
            out = torch.empty_like(c["q"])
            s = seconds_per_launch(functools.partial(launch, c, out, half, *tile))
            err = (out.float() - reference.float()).abs().max().item()
            rate = round(c["kv_bytes"] / s / 1e12, 2)  # TB/s of K/V read
            rows.append(dict(shape=name, kv=kv, BN=tile[0], warps=tile[1], stages=tile[2],
                             us=round(s * 1e6, 1), tb_s=rate, max_err=err))  # fmt: skip
        for kv, _ in variants[cache]:
            mine = [r for r in rows if (r["shape"], r["kv"]) == (name, kv)]
            best = min(mine, key=lambda r: r["us"])
            now = next(r for r in mine if (r["BN"], r["warps"], r["stages"]) == CURRENT)
            print(f"{name} {kv}: current {now['us']} us ({now['tb_s']} TB/s), best {best}", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
