"""Attention alone: the paged kernel's decode K/V read rate and prefill FLOP rate, against the copy and
matmul rates measured in the same run (`bench.measure_rates`).

One layer's launch on random K/V, bf16, pages of 16 shuffled over the cache, timed in a CUDA graph
(`bench_gemm.graph_ms`: as the engine's decode graphs run it, no host time between launches). Decode
cases: the steady batches of W0, W1 and W2 (prompt lengths uniform in [64, 768], half their new tokens
out) and of W3 at `--max-seqs 1024`, and few sequences of 4k or 16k keys (the 1B and 8B shapes), whose
keys split over several programs per (sequence, KV head) (`decode_splits`); `--splits` times other split
counts too. Decode bytes are the K/V of every key read. Prefill cases: a 16,384-token step of W0's and
W2's prompts, a 16k prompt of the 1B and of the 8B shape, and the last 4k chunk of the 8B one; prefill
FLOPs are 4 x heads x head_dim per (query, visible key) pair. Prints a table, writes JSON.

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

from runner.engine.layers.attention.torch import (  # noqa: E402
    PREFILL_BLOCK_Q,
    AttentionBatch,
    decode_order,
    prefill_blocks,
)
from runner.engine.layers.attention.triton import (  # noqa: E402
    decode_attention,
    decode_splits,
    paged_attention,
    sm_count,
)
from scripts.bench import Rates, measure_rates  # noqa: E402
from scripts.bench_gemm import graph_ms  # noqa: E402

PAGE = 16


@dataclass(slots=True, frozen=True)
class Case:
    name: str
    seqs: list[tuple[int, int]]  # (q_len, kv_len) of each sequence; all q_len 1: a decode launch
    heads: int
    kv_heads: int
    dim: int

    @property
    def decode(self) -> bool:
        return all(q == 1 for q, _ in self.seqs)


def uniform(n: int, lo: int, hi: int, decode: bool) -> list[tuple[int, int]]:
    """n sequences of lengths uniform in [lo, hi] (seed 0): decodes, or whole prompts."""
    rng = random.Random(0)
    lens = [rng.randint(lo, hi) for _ in range(n)]
    return [(1 if decode else length, length) for length in lens]


def prompts_filling(tokens: int) -> int:
    """How many W-workload prompts (uniform in [64, 768], seed 0) fit a step of `tokens`."""
    rng, total, n = random.Random(0), 0, 0
    while (total := total + rng.randint(64, 768)) <= tokens:
        n += 1
    return n


W_STEP = prompts_filling(16384)
CASES = [
    Case("W0 decode", uniform(512, 64 + 128, 768 + 128, True), 9, 3, 64),
    Case("W1 decode", uniform(512, 64 + 128, 768 + 128, True), 32, 8, 64),
    Case("W2 decode", uniform(256, 64 + 64, 768 + 64, True), 32, 8, 128),
    # W3 at --max-seqs 1024: 128-token prompts admitted over ~8 steps, half their new tokens out
    Case("W3 decode", uniform(1024, 188, 196, True), 32, 8, 128),
    *(Case(f"1B decode {n} x 16k", [(1, 16384)] * n, 32, 8, 64) for n in (1, 4, 16, 32, 64)),
    *(Case(f"8B decode {n} x 16k", [(1, 16384)] * n, 32, 8, 128) for n in (1, 4, 16, 32, 64)),
    *(Case(f"8B decode {n} x 4k", [(1, 4096)] * n, 32, 8, 128) for n in (4, 16, 64)),
    Case("W0 prefill step", uniform(W_STEP, 64, 768, False), 9, 3, 64),
    Case("W2 prefill step", uniform(W_STEP, 64, 768, False), 32, 8, 128),
    Case("1B prefill 16k", [(16384, 16384)], 32, 8, 64),
    Case("8B prefill 16k", [(16384, 16384)], 32, 8, 128),
    Case("8B prefill 12-16k", [(4096, 16384)], 32, 8, 128),
]


@dataclass(slots=True)
class Timing:
    case: str
    splits: int  # decode: split count (0 for prefill)
    chosen: bool  # the split count `paged_attention` takes for this case
    us: float
    work: float  # decode: GB of K/V read; prefill: TFLOP
    rate: float  # decode: TB/s; prefill: TFLOP/s
    of_peak: float  # decode: of the measured copy rate; prefill: of the measured bf16 matmul rate


def make_batch(
    case: Case, block_q: int = PREFILL_BLOCK_Q
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionBatch]:
    """q [T, H, D], K and V caches over shuffled pages, and the batch (prefill blocks of `block_q`); the
    same values at every call."""
    q_lens = np.array([q for q, _ in case.seqs])
    kv_lens = np.array([kv for _, kv in case.seqs])
    pages = [-(-n // PAGE) for n in kv_lens]
    order = np.random.default_rng(0).permutation(sum(pages) + 1)
    table = np.zeros((len(pages), max(pages)), dtype=np.int64)
    start = 0
    for row, n in enumerate(pages):
        table[row, :n] = order[start : start + n]
        start += n
    shape = (sum(pages) + 1, PAGE, case.kv_heads, case.dim)
    g = torch.Generator(device="cuda").manual_seed(0)
    k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    v_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(int(q_lens.sum()), case.heads, case.dim, device="cuda", dtype=torch.bfloat16, generator=g)
    decodes = len(case.seqs) if case.decode else 0
    block_seq, block_start = prefill_blocks(q_lens[decodes:], kv_lens[decodes:], decodes, block_q)

    def t(values) -> torch.Tensor:
        return torch.tensor(np.asarray(values), dtype=torch.int64, device="cuda")

    batch = AttentionBatch(
        cu_seqlens_q=t(np.concatenate(([0], np.cumsum(q_lens)))),
        kv_lens=t(kv_lens),
        page_table=t(table),
        row_slot=t(np.arange(len(pages))),
        slot_mapping=t(np.zeros(len(q))),
        num_decodes=decodes,
        decode_seq=t(decode_order(kv_lens[:decodes])),
        block_seq=t(block_seq),
        block_start=t(block_start),
    )
    return q, k_cache, v_cache, batch


def time_case(case: Case, splits: list[int], rates: Rates) -> list[Timing]:
    """Time `case`'s launch: a decode one at each of `splits` and at the chosen split count."""
    q, k_cache, v_cache, batch = make_batch(case)
    scale = case.dim**-0.5
    if not case.decode:
        pairs = sum(q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2 for q_len, kv_len in case.seqs)
        flops = 4 * case.heads * case.dim * pairs
        s = graph_ms(lambda: paged_attention(q, k_cache, v_cache, batch, scale)) / 1e3
        t = Timing(case.name, 0, True, round(s * 1e6, 1), round(flops / 1e12, 3), round(flops / s / 1e12, 1),
                   round(flops / s / rates.bf16_flops, 3))  # fmt: skip
        print(json.dumps(asdict(t)), flush=True)
        return [t]
    nbytes = sum(kv for _, kv in case.seqs) * 2 * case.kv_heads * case.dim * 2
    out = torch.empty_like(q)
    chosen = decode_splits(len(case.seqs), case.kv_heads, sm_count(q.device))
    timings = []
    for n in sorted({chosen, *splits}):
        s = graph_ms(lambda n=n: decode_attention(q, k_cache, v_cache, out, batch, scale, 0, 0.0, n)) / 1e3
        t = Timing(case.name, n, n == chosen, round(s * 1e6, 1), round(nbytes / 1e9, 3),
                   round(nbytes / s / 1e12, 3), round(nbytes / s / rates.bytes_per_s, 3))  # fmt: skip
        print(json.dumps(asdict(t)), flush=True)
        timings.append(t)
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", default="1", help="decode split counts to time besides the chosen one")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    rates = measure_rates()
    print(
        f"measured: copy {rates.bytes_per_s / 1e12:.2f} TB/s, bf16 matmul {rates.bf16_flops / 1e12:.0f} "
        f"TFLOP/s, {sm_count(torch.device('cuda'))} SMs",
        flush=True,
    )
    splits = [int(n) for n in args.splits.split(",")]
    timings = []
    for case in CASES:
        timings += time_case(case, splits, rates)
        torch.cuda.empty_cache()
    print(f"\n{'case':20} {'splits':>6} {'us':>9} {'GB|TFLOP':>9} {'rate':>7} {'of peak':>8}")
    for t in timings:
        mark = "*" if t.chosen and t.splits else " "
        print(f"{t.case:20} {t.splits:>5}{mark} {t.us:9.1f} {t.work:9.3f} {t.rate:7.2f} {t.of_peak:8.3f}")
    if args.out:
        result = {
            "command": " ".join(["scripts/bench_attention.py", *sys.argv[1:]]),
            "device": torch.cuda.get_device_name(),
            "rates": asdict(rates),
            "timings": [asdict(t) for t in timings],
        }
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
