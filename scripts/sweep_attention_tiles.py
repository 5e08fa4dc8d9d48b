"""Tile settings of the paged attention kernel: its decode or prefill launch under other tiles than it takes.

`--kind decode`: the steady decode batches of W0, W1 and W2 (`bench_attention.CASES`), over a bf16 cache
and an fp8 one, the fp8 one with its dots in bf16 (`fp8-bf16dot`) and in fp16 (`fp8`, what the engine
runs), at every (keys per iteration, warps, pipeline stages); outputs are checked against the engine's
tile over the same cache, and the K/V read rate is reported. `--kind prefill`: a 16k-token step of W0's
and W2's prompts and one 16k prompt of the 1B and of the 8B shape, at every (queries per block, keys per
iteration, warps, stages). Each launch is timed in a CUDA graph (`bench_gemm.graph_ms`); the tiles
are ranked by their geometric-mean slowdown against each case's best. The tiles the engine takes
(`paged_attention.kernel_tile`) came from these.

    python scripts/sweep_attention_tiles.py --kind prefill --out tiles.json
    python scripts/sweep_attention_tiles.py --kind decode --current-only --out decode.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `runner` imports

from runner.engine.layers.attention.torch import to_cache  # noqa: E402
from runner.engine.layers.attention.triton import kernel_tile, launch, sm_count, smem_per_sm  # noqa: E402
from runner.engine.layers.fp8.format import FP8  # noqa: E402
from scripts.bench_attention import CASES, make_batch  # noqa: E402
from scripts.bench_gemm import graph_ms  # noqa: E402

DECODE_CASES = ["W0 decode", "W1 decode", "W2 decode"]
PREFILL_CASES = ["W0 prefill step", "W2 prefill step", "1B prefill 16k", "8B prefill 16k"]
# (queries per block, keys per iteration, warps, stages)
DECODE_TILES = [(1, *t) for t in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4))]
PREFILL_TILES = list(itertools.product((16, 32), (32, 64, 128), (4, 8), (2, 3)))
# cache dtype, dots in fp16
CACHES = {"bf16": (torch.bfloat16, False), "fp8-bf16dot": (FP8, False), "fp8": (FP8, True)}


def sweep(case_names: list[str], tiles: list[tuple], caches: list[str]) -> list[dict]:
    """One row per (case, cache, tile): microseconds, rate (decode: K/V TB/s), max |error| against the
    engine's tile."""
    rows = []
    cuda = torch.device("cuda")
    for case in (c for c in CASES if c.name in case_names):
        for cache in caches:
            dtype, half_dot = CACHES[cache]
            per_sm = len(case.seqs) * case.kv_heads / sm_count(cuda)
            current = kernel_tile(case.decode, case.dim, per_sm, smem=smem_per_sm(cuda))
            batches = {}  # block_q -> the same q, K and V, blocked by block_q
            for tile in sorted(set(tiles) | {current}, key=lambda t: t != current):  # the engine's first
                if tile[0] not in batches:
                    q, k_cache, v_cache, batch = make_batch(case, tile[0])
                    batches[tile[0]] = q, to_cache(k_cache, dtype), to_cache(v_cache, dtype), batch
                q, k_cache, v_cache, batch = batches[tile[0]]
                out = torch.empty_like(q)
                grid = batch.num_decodes if case.decode else batch.block_seq.numel()
                scale = case.dim**-0.5
                run = functools.partial(launch, q, k_cache, v_cache, out, batch, scale, 0, 0.0, grid,
                                        case.decode, tile=tile, fp16_dots=half_dot)  # fmt: skip
                s = graph_ms(run, 10) / 1e3
                if tile == current:
                    reference = out.float()
                keys = sum(kv for _, kv in case.seqs)
                rate = keys * 2 * case.kv_heads * case.dim * k_cache.element_size() / s / 1e12
                row = dict(case=case.name, cache=cache, block_q=tile[0], block_n=tile[1], warps=tile[2],
                           stages=tile[3], engine=tile == current, us=round(s * 1e6, 1),
                           kv_tb_s=round(rate, 2) if case.decode else None,
                           max_err=(out.float() - reference).abs().max().item())  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
            torch.cuda.empty_cache()
    return rows


def ranking(rows: list[dict]) -> None:
    """Print the tiles by geometric-mean slowdown over every (case, cache), and each one's slowdowns."""
    keys = sorted({(r["case"], r["cache"]) for r in rows})
    best = {k: min(r["us"] for r in rows if (r["case"], r["cache"]) == k) for k in keys}
    by_tile: dict[tuple, dict] = {}
    for r in rows:
        tile = (r["block_q"], r["block_n"], r["warps"], r["stages"])
        by_tile.setdefault(tile, {})[r["case"], r["cache"]] = r
    print("\nblock_q block_n warps stages  slowdown  " + "  ".join(f"{c} ({kv})" for c, kv in keys))
    ranked = sorted((math.prod(t[k]["us"] / best[k] for k in keys) ** (1 / len(keys)), tile)
                    for tile, t in by_tile.items() if len(t) == len(keys))  # fmt: skip
    for slowdown, tile in ranked:
        engine = "*" if any(by_tile[tile][k]["engine"] for k in keys) else " "
        per_case = "  ".join(f"{by_tile[tile][k]['us'] / best[k]:.2f}" for k in keys)
        print(f"{tile[0]:7} {tile[1]:7} {tile[2]:5} {tile[3]:6}{engine} {slowdown:8.2f}  {per_case}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["decode", "prefill"], default="prefill")
    ap.add_argument("--current-only", action="store_true", help="time the engine's tile alone")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    decode = args.kind == "decode"
    tiles = [] if args.current_only else DECODE_TILES if decode else PREFILL_TILES
    rows = sweep(DECODE_CASES if decode else PREFILL_CASES, tiles, list(CACHES) if decode else ["bf16"])
    ranking(rows)
    if args.out:
        result = {"command": " ".join(["scripts/sweep_attention_tiles.py", *sys.argv[1:]]),
                  "device": torch.cuda.get_device_name(), "rows": rows}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
