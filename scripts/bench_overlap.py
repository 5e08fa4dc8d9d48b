"""Decode attention beside the matmuls: side by side against one after the other, a layer at a time (CUDA).

bench.py's roofline counts a decode step by its bytes alone, so W1 >= 0.75 and W2 >= 0.85 of it ask the
decode attention (memory-bound) and the decode matmuls (compute-bound on the H200 at these row counts) to
run at the same time. This times one layer's decode work at the steady batch of W1, W2 and W3
(`bench_attention.CASES`; W3 at `--max-seqs 1024`), in CUDA graphs, as the engine's decode graphs run it:

- `matmuls`, `attention`: the layer's four matmuls (qkv, o, gate/up, down) on every row; its attention.
- `serial`: the two, one after the other (what the engine runs).
- `halves`: the batch in two halves of alternate rows, each half's matmuls and attention in turn.
- `side_by_side`: the halves pipelined over two streams, one half's attention beside the other half's
  matmuls (NanoFlow's nano-batches, SGLang's two-batch overlap).
- at each `--sms` count k: the attention, and the matmuls, of one half on a green context of k SMs, and
  `side_by_side` with the attention on those k SMs; `partition_bound` is the best that halves on disjoint
  SM sets could do, 2 x max(attention on k, matmuls on the other SMs), over the k that pair up.

All figures are µs per layer. Prints one JSON line per workload, writes JSON.

    python scripts/bench_overlap.py --out overlap.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `runner` imports

from runner.engine.layers.attention.triton import decode_attention, decode_splits, sm_count  # noqa: E402
from scripts.bench import WORKLOADS, measure_rates  # noqa: E402
from scripts.bench_attention import CASES, Case, make_batch  # noqa: E402
from scripts.bench_gemm import graph_ms  # noqa: E402

LAYERS = 4  # layers a timed call runs


def attention_fn(case: Case) -> Callable[[], None]:
    """One layer's decode attention launch over `case`'s batch (as `paged_attention` splits it)."""
    q, k_cache, v_cache, batch = make_batch(case)
    out = torch.empty_like(q)
    splits = decode_splits(len(case.seqs), case.kv_heads, sm_count(q.device))
    return lambda: decode_attention(q, k_cache, v_cache, out, batch, case.dim**-0.5, 0, 0.0, splits)


def matmuls_fn(workload: str, rows: int) -> Callable[[], None]:
    """One layer's qkv, o, gate/up and down matmuls on `rows` rows (random bf16 weights)."""
    w = WORKLOADS[workload]
    shapes = {  # (out, in) of each weight
        "qkv": ((w.heads + 2 * w.kv_heads) * w.head_dim, w.hidden),
        "o": (w.hidden, w.heads * w.head_dim),
        "gate_up": (2 * w.inter, w.hidden),
        "down": (w.hidden, w.inter),
    }
    weights = {n: torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02 for n, s in shapes.items()}
    x = torch.randn(rows, w.hidden, device="cuda", dtype=torch.bfloat16)
    act = torch.randn(rows, w.inter, device="cuda", dtype=torch.bfloat16)

    def run() -> None:
        F.linear(x, weights["qkv"])
        F.linear(x, weights["o"])
        F.linear(x, weights["gate_up"])
        F.linear(act, weights["down"])

    return run


def per_layer_us(fn: Callable[[], None]) -> float:
    """µs of one layer of `fn` (LAYERS layers a call, replayed from a CUDA graph)."""
    return round(graph_ms(fn, calls=5) * 1e3 / LAYERS, 1)


def layers(*fns: Callable[[], None]) -> Callable[[], None]:
    """LAYERS layers of `fns`, one after the other, on the current stream."""

    def run() -> None:
        for _ in range(LAYERS):
            for fn in fns:
                fn()

    return run


def on_stream(stream: torch.cuda.Stream, fn: Callable[[], None]) -> Callable[[], None]:
    """LAYERS calls of `fn` on `stream`, forked from and joined to the current stream."""
    body = layers(fn)

    def run() -> None:
        main = torch.cuda.current_stream()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            body()
        main.wait_stream(stream)

    return run


def side_by_side(halves: list[tuple[Callable, Callable]], side: torch.cuda.Stream) -> Callable[[], None]:
    """LAYERS layers of two halves (matmuls, attention), pipelined: each half's attention runs on `side`
    beside the other half's matmuls on the current stream; each half's layers stay in order."""
    (mm_a, att_a), (mm_b, att_b) = halves

    def run() -> None:
        main = torch.cuda.current_stream()
        ready_a, ready_b, done_a, done_b = (torch.cuda.Event() for _ in range(4))
        side.wait_stream(main)
        mm_a()
        ready_a.record(main)
        for _ in range(LAYERS):
            side.wait_event(ready_a)
            with torch.cuda.stream(side):
                att_a()
            done_a.record(side)
            mm_b()  # beside a's attention
            ready_b.record(main)
            side.wait_event(ready_b)
            with torch.cuda.stream(side):
                att_b()
            done_b.record(side)
            main.wait_event(done_a)
            mm_a()  # beside b's attention
            ready_a.record(main)
            main.wait_event(done_b)
        main.wait_stream(side)

    return run


def time_workload(workload: str, sms: list[int]) -> dict:
    """µs per layer of every arrangement in the module docstring, for `workload`'s steady decode."""
    case = next(c for c in CASES if c.name == f"{workload} decode")
    halves = [Case(case.name, case.seqs[i::2], case.heads, case.kv_heads, case.dim) for i in (0, 1)]
    att, mm = attention_fn(case), matmuls_fn(workload, len(case.seqs))
    half = [(matmuls_fn(workload, len(h.seqs)), attention_fn(h)) for h in halves]
    (mm_a, att_a), (mm_b, att_b) = half
    r = {"workload": workload, "rows": len(case.seqs)}
    r["matmuls"] = per_layer_us(layers(mm))
    r["attention"] = per_layer_us(layers(att))
    r["serial"] = per_layer_us(layers(mm, att))
    r["halves"] = per_layer_us(layers(mm_a, att_a, mm_b, att_b))
    r["side_by_side"] = per_layer_us(side_by_side(half, torch.cuda.Stream()))
    green = {}
    for k in sms:
        context = torch.cuda.GreenContext.create(num_sms=k)  # held: its stream dies with it
        stream = context.Stream()
        green[k] = {
            "attention_half": per_layer_us(on_stream(stream, att_a)),
            "matmuls_half": per_layer_us(on_stream(stream, mm_a)),
            "side_by_side": per_layer_us(side_by_side(half, stream)),
        }
    r["green"] = green
    total = sm_count(torch.device("cuda"))
    pairs = [(k, total - k) for k in sms if total - k in green]
    if pairs:
        r["partition_bound"] = min(
            2 * max(green[a]["attention_half"], green[m]["matmuls_half"]) for a, m in pairs
        )
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--sms", default="32,66,100", help="SM counts of the green contexts")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    rates = measure_rates()
    sms = [int(k) for k in args.sms.split(",")]
    results = []
    for name in args.workloads.split(","):
        results.append(time_workload(name, sms))
        print(json.dumps(results[-1]), flush=True)
        torch.cuda.empty_cache()
    if args.out:
        result = {
            "command": " ".join(["scripts/bench_overlap.py", *sys.argv[1:]]),
            "device": torch.cuda.get_device_name(),
            "sms": sm_count(torch.device("cuda")),
            "rates": {"bf16_flops": rates.bf16_flops, "bytes_per_s": rates.bytes_per_s},
            "results": results,
        }
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
