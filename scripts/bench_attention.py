"""Decode attention alone: the paged kernel's K/V read rate against the copy rate measured in the same run.

One layer's launch on random K/V, bf16, pages of 16 shuffled over the cache. Cases: the steady decode
batches of W0, W1 and W2 (prompt lengths uniform in [64, 768], half their new tokens already out), and
few sequences of 16,384 keys (the 1B and 8B shapes), where keys split over several programs per
(sequence, KV head) (`decode_splits`) or not. Bytes are the K/V of every visible key; prints a table
and writes JSON.

    python scripts/bench_attention.py --out attention.json
    python scripts/bench_attention.py --splits 1,2,4,8,16,32   # every split count besides the chosen one
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `runner` imports

from runner.engine.layers.attention import AttentionBatch  # noqa: E402
from runner.engine.layers.paged_attention import decode_attention, decode_splits, sm_count  # noqa: E402

PAGE = 16


@dataclass(slots=True, frozen=True)
class Case:
    name: str
    rows: int
    kv_lens: tuple[int, int]  # uniform in [lo, hi]
    heads: int
    kv_heads: int
    dim: int


CASES = [
    Case("W0 decode", 512, (64 + 128, 768 + 128), 9, 3, 64),
    Case("W1 decode", 512, (64 + 128, 768 + 128), 32, 8, 64),
    Case("W2 decode", 256, (64 + 64, 768 + 64), 32, 8, 128),
    *(Case(f"1B, {n} x 16k", n, (16384, 16384), 32, 8, 64) for n in (1, 4, 16, 32, 64)),
    *(Case(f"8B, {n} x 16k", n, (16384, 16384), 32, 8, 128) for n in (1, 4, 16, 32, 64)),
    *(Case(f"8B, {n} x 4k", n, (4096, 4096), 32, 8, 128) for n in (4, 16, 64)),
]


@dataclass(slots=True)
class Timing:
    case: str
    splits: int
    chosen: bool  # the split count `paged_attention` takes for this case
    us: float
    gb: float  # K/V bytes read
    tb_s: float
    of_copy: float  # fraction of the measured copy rate


def copy_rate(repeats: int = 20) -> float:
    """Device-to-device copy of 4 GiB, bytes read + written per second (plain launches: a copy in a CUDA
    graph runs slower, ~2.8 TB/s on the H200)."""
    src = torch.empty(2**29, device="cuda", dtype=torch.int64)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 8 * repeats / (start.elapsed_time(end) / 1e3)


def elapsed_s(fn, repeats: int = 20) -> float:
    """Mean GPU seconds of `fn`, from a CUDA graph of `repeats` calls (as the engine's decode graphs run
    it: no host launch time between kernels), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def decode_batch(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionBatch, int]:
    """q [rows, H, D], K and V caches over shuffled pages, the batch; and the K/V bytes it reads."""
    rng = random.Random(0)
    lens = [rng.randint(*case.kv_lens) for _ in range(case.rows)]
    pages = [-(-n // PAGE) for n in lens]
    order = np.random.default_rng(0).permutation(sum(pages) + 1)
    width = max(pages)
    table = np.zeros((case.rows, width), dtype=np.int64)
    start = 0
    for row, n in enumerate(pages):
        table[row, :n] = order[start : start + n]
        start += n
    shape = (sum(pages) + 1, PAGE, case.kv_heads, case.dim)
    k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(case.rows, case.heads, case.dim, device="cuda", dtype=torch.bfloat16)

    def t(values) -> torch.Tensor:
        return torch.tensor(np.asarray(values), dtype=torch.int64, device="cuda")

    batch = AttentionBatch(
        cu_seqlens_q=t(np.arange(case.rows + 1)),
        kv_lens=t(lens),
        page_table=t(table),
        row_slot=t(np.arange(case.rows)),
        slot_mapping=t(np.zeros(case.rows)),
        num_decodes=case.rows,
        block_seq=t([]),
        block_start=t([]),
    )
    return q, k_cache, v_cache, batch, sum(lens) * 2 * case.kv_heads * case.dim * 2


def time_case(case: Case, splits: list[int], rate: float) -> list[Timing]:
    """Time `case`'s launch at each of `splits` and at the chosen split count."""
    q, k_cache, v_cache, batch, nbytes = decode_batch(case)
    out = torch.empty_like(q)
    chosen = decode_splits(case.rows, case.kv_heads, sm_count(q.device))
    scale = case.dim**-0.5
    timings = []
    for n in sorted({chosen, *splits}):
        s = elapsed_s(lambda n=n: decode_attention(q, k_cache, v_cache, out, batch, scale, 0, 0.0, n))
        t = Timing(case.name, n, n == chosen, round(s * 1e6, 1), round(nbytes / 1e9, 3),
                   round(nbytes / s / 1e12, 3), round(nbytes / s / rate, 3))  # fmt: skip
        print(json.dumps(asdict(t)), flush=True)
        timings.append(t)
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", default="1", help="split counts to time besides the chosen one")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    rate = copy_rate()
    print(f"measured: copy {rate / 1e12:.2f} TB/s, {sm_count(torch.device('cuda'))} SMs", flush=True)
    timings = [t for case in CASES for t in time_case(case, [int(n) for n in args.splits.split(",")], rate)]
    print(f"\n{'case':16} {'splits':>6} {'us':>9} {'GB':>7} {'TB/s':>6} {'of copy':>8}")
    for t in timings:
        mark = "*" if t.chosen else " "
        print(f"{t.case:16} {t.splits:>5}{mark} {t.us:9.1f} {t.gb:7.3f} {t.tb_s:6.2f} {t.of_copy:8.3f}")
    if args.out:
        result = {
            "command": " ".join(["scripts/bench_attention.py", *sys.argv[1:]]),
            "device": torch.cuda.get_device_name(),
            "copy_bytes_per_s": rate,
            "timings": [asdict(t) for t in timings],
        }
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
