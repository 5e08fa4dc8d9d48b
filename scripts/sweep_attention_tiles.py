"""Prefill attention tiles: the paged kernel's prefill launch under other tile settings than it takes.

For each prefill case of `bench_attention.py` (a 16k-token step of W0's and W2's prompts, one 16k prompt
of the 1B and of the 8B shape), times the launch at every (queries per block, keys per iteration, warps,
pipeline stages) and prints the settings by their geometric-mean slowdown against each case's best.
What `paged_attention.py` takes (BLOCK_N, PREFILL_BLOCK_Q, its stage rule) came from this.

    python scripts/sweep_attention_tiles.py --out tiles.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `runner` imports

from runner.engine.layers.paged_attention import _paged_attention_kernel  # noqa: E402
from scripts.bench_attention import CASES, elapsed_s, make_batch  # noqa: E402

SWEEP = ["W0 prefill step", "W2 prefill step", "1B prefill 16k", "8B prefill 16k"]
TILES = list(itertools.product((16, 32), (32, 64, 128), (4, 8), (2, 3)))  # block_q, block_n, warps, stages


def launch(q, k_cache, v_cache, out, batch, block_q: int, block_n: int, warps: int, stages: int) -> None:
    """The kernel's prefill launch, as `paged_attention` makes it, with the given tiles."""
    group = q.shape[1] // k_cache.shape[2]
    dim = q.shape[2]
    _paged_attention_kernel[(batch.block_seq.numel(), k_cache.shape[2], 1)](
        q, k_cache, v_cache, out, batch.page_table, batch.row_slot, batch.cu_seqlens_q, batch.kv_lens,
        batch.block_seq, batch.block_start, out, out, 1, dim**-0.5, 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), batch.page_table.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=max(16, triton.next_power_of_2(block_q * group)),
        BLOCK_N=block_n, PAGE=k_cache.shape[1], D=dim, D_PAD=max(16, triton.next_power_of_2(dim)),
        DECODE=False, IEEE=False, SPLIT=False, SOFTCAP=0.0, WINDOWED=False, HALF_DOT=False,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    times: dict[tuple, dict[str, float]] = {tile: {} for tile in TILES}
    for case in (c for c in CASES if c.name in SWEEP):
        for tile in TILES:
            q, k_cache, v_cache, batch = make_batch(case, tile[0])
            out = torch.empty_like(q)
            run = functools.partial(launch, q, k_cache, v_cache, out, batch, *tile)
            times[tile][case.name] = elapsed_s(run, 10)
            print(case.name, tile, f"{times[tile][case.name] * 1e6:.1f} us", flush=True)
        torch.cuda.empty_cache()
    best = {name: min(t[name] for t in times.values()) for name in SWEEP}
    mean = {tile: math.prod(t[n] / best[n] for n in SWEEP) ** (1 / len(SWEEP)) for tile, t in times.items()}
    ranked = sorted((m, tile) for tile, m in mean.items())
    print("\nblock_q block_n warps stages  slowdown (geometric mean)  " + "  ".join(SWEEP))
    for slowdown, tile in ranked:
        per_case = "  ".join(f"{times[tile][n] / best[n]:.2f}" for n in SWEEP)
        print(f"{tile[0]:7} {tile[1]:7} {tile[2]:5} {tile[3]:6}  {slowdown:25.2f}  {per_case}")
    if args.out:
        rows = [{"block_q": t[0], "block_n": t[1], "warps": t[2], "stages": t[3],
                 "us": {n: round(s * 1e6, 1) for n, s in times[t].items()}} for t in TILES]  # fmt: skip
        result = {"command": " ".join(["scripts/sweep_attention_tiles.py", *sys.argv[1:]]),
                  "device": torch.cuda.get_device_name(), "tiles": rows}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
