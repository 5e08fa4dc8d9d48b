"""Configuration sweep: the engine at every setting of the grid gives transformers' greedy tokens.

Grid: max_seqs x max_batch_tokens x page_size x async x CUDA graphs. A tiny 2-layer random Llama in
fp32; prompts from 1 token to max_model_len - 1 (so a sample stops at max_model_len), duplicates (prefix
cache), greedy requests with n > 1, and sampled ones (temperature, top-k / top-p / min-p, seeds) whose
tokens must be the same in every configuration (a seeded draw never depends on the batch). The
reference (transformers `generate`, one prompt at a time) is computed once per prompt set.

    python scripts/sweep_config.py --device cuda --out sweep.json            # the full grid (GPU)
    python scripts/sweep_config.py --device cpu --subset                     # what CI runs
    compute-sanitizer --tool memcheck --target-processes all \\
        python scripts/sweep_config.py --device cuda --sanitizer-sample      # a sample under memcheck

Prints the grid and its counts, one line per configuration, and a JSON summary (also to --out).
Exits 1 when any configuration fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `runner`, `tests`

GRID = {
    "max_seqs": [1, 3, 64, 512, 1024, 2048],
    "max_batch_tokens": [64, 1000, 8192, 32768],
    "page_size": [8, 16, 64],
    "async_mode": [True, False],
    "cuda_graphs": [True, False],
}
# every value of every axis at least once, in 6 configurations (the CPU's share of CI)
SUBSET = [
    dict(max_seqs=1, max_batch_tokens=64, page_size=8, async_mode=True, cuda_graphs=True),
    dict(max_seqs=3, max_batch_tokens=1000, page_size=16, async_mode=False, cuda_graphs=False),
    dict(max_seqs=64, max_batch_tokens=64, page_size=64, async_mode=True, cuda_graphs=False),
    dict(max_seqs=512, max_batch_tokens=8192, page_size=8, async_mode=False, cuda_graphs=True),
    dict(max_seqs=1024, max_batch_tokens=32768, page_size=16, async_mode=True, cuda_graphs=True),
    dict(max_seqs=2048, max_batch_tokens=1000, page_size=64, async_mode=True, cuda_graphs=True),
]
# small enough to finish under memcheck (~100x slower), wide enough to take every kernel path
SANITIZER_SAMPLE = [SUBSET[0], SUBSET[2], SUBSET[4], SUBSET[5]]
NEW_TOKENS = 8


@dataclass(slots=True)
class Workload:
    """The requests of one sweep: (id, prompt, greedy?) and the greedy reference per prompt."""

    prompts: list[list[int]]  # unique prompts
    requests: list[tuple[str, int, dict]]  # (request id, prompt index, SamplingParams fields)
    reference: dict[int, list[int]]  # prompt index -> transformers' greedy tokens


@dataclass(slots=True)
class Outcome:
    config: dict
    ok: bool
    seconds: float
    greedy_mismatches: int = 0
    sampled_mismatches: int = 0
    error: str | None = None
    stats: dict | None = None


def grid_configs(grid: dict[str, list]) -> list[dict]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def build_model(device: str):
    from tests.engine.conftest import tiny_model

    return tiny_model("llama", seed=0).to(device)


def make_workload(model, unique: int, copies: int, seed: int = 0) -> Workload:
    """`unique` prompts of 1 .. max_model_len - 1 tokens, each requested `copies` times (a greedy one, a
    greedy n=2 one, then sampled ones), with the greedy reference of each prompt."""
    from tests.engine.conftest import VOCAB, hf_greedy

    limit = model.config.max_position_embeddings
    rng = random.Random(seed)
    edges = [1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, limit - NEW_TOKENS, limit - 2, limit - 1]
    lengths = (edges + [rng.randint(1, limit - 1) for _ in range(unique)])[:unique]
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]
    sampled = [
        dict(temperature=1.0, top_k=20),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.3, min_p=0.05),
    ]
    requests = []
    for copy in range(copies):
        for i in range(len(prompts)):
            kind = (i + copy) % 5
            fields = dict(n=1 + kind) if kind < 2 else dict(sampled[kind - 2], seed=1000 * copy + i)
            requests.append((f"{i}/{copy}", i, dict(fields, max_new_tokens=NEW_TOKENS, ignore_eos=True)))
    reference = {i: hf_greedy(model, p, min(NEW_TOKENS, limit - len(p))) for i, p in enumerate(prompts)}
    return Workload(prompts, requests, reference)


def run_config(model, config: dict, work: Workload, device: str) -> tuple[dict, dict]:
    """Run every request under `config`: ({(id, sample): tokens}, engine stats)."""
    import torch

    from runner.engine import Engine, EngineConfig, Request, SamplingParams

    # CUDA: a fixed pool (the sweep's workers share the GPU; a pool from free memory is bench.py's job)
    extra = {"dtype": "float32", "kv_cache_tokens": 1 << 16} if device == "cuda" else {}
    engine = Engine(model, EngineConfig(device=device, **extra, **config))
    try:
        requests = [Request(rid, work.prompts[i], SamplingParams(**f)) for rid, i, f in work.requests]
        tokens = {(c.id, c.sample_index): c.token_ids for c in engine.generate(requests)}
        stats = engine.stats()
    finally:
        engine.close()
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens, stats


def check(work: Workload, tokens: dict, sampled_ref: dict | None) -> tuple[int, int]:
    """(greedy mismatches against transformers, sampled mismatches against the first configuration)."""
    greedy = sampled = 0
    for rid, i, fields in work.requests:
        if fields.get("temperature"):
            sampled += sampled_ref is not None and tokens.get((rid, 0)) != sampled_ref[(rid, 0)]
        else:
            greedy += sum(tokens.get((rid, s)) != work.reference[i] for s in range(fields["n"]))
    return greedy, sampled


def sweep(configs: list[dict], device: str, unique: int, copies: int, log=print) -> list[Outcome]:
    """Run `configs` on `device` over one workload; one Outcome per configuration."""
    model = build_model(device)
    work = make_workload(model, unique, copies)
    sampled_ref = None
    outcomes = []
    for config in configs:
        t0 = time.perf_counter()
        try:
            tokens, stats = run_config(model, config, work, device)
            greedy, sampled = check(work, tokens, sampled_ref)
            sampled_ref = sampled_ref or tokens
            ok = greedy == sampled == 0
            out = Outcome(config, ok, 0.0, greedy, sampled, stats=stats)
        except Exception as e:  # a failing configuration is a result, the sweep goes on
            out = Outcome(config, False, 0.0, error=f"{type(e).__name__}: {e}")
            if device == "cuda" and "CUDA error" in str(e):
                log(f"FAIL {config}: {out.error} (the device is unusable now: stopping)")
                outcomes.append(out)
                break
        out.seconds = round(time.perf_counter() - t0, 2)
        log(
            ("ok  " if out.ok else "FAIL")
            + f" {config} {out.seconds}s"
            + (f" {out.error}" if out.error else "")
            + ("" if out.ok or out.error else f" mismatches {out.greedy_mismatches}/{out.sampled_mismatches}")
        )
        outcomes.append(out)
    return outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--subset", action="store_true", help="the 6 configurations CI runs on the CPU")
    which.add_argument("--sanitizer-sample", action="store_true", help="4 configurations, a small workload")
    ap.add_argument("--unique", type=int, default=None, help="unique prompts (default 60 on CUDA, 24 on CPU)")
    ap.add_argument("--copies", type=int, default=None, help="requests per prompt (default 2)")
    ap.add_argument("--workers", type=int, default=1, help="processes sharing the device, configs split")
    ap.add_argument("--out", default=None, help="write the outcomes as JSON here")
    args = ap.parse_args()
    if args.sanitizer_sample:
        configs, unique, copies = SANITIZER_SAMPLE, 16, 1
    else:
        configs = SUBSET if args.subset else grid_configs(GRID)
        unique, copies = (60, 2) if args.device == "cuda" else (24, 2)
    unique, copies = args.unique or unique, args.copies or copies
    print(json.dumps({"grid": GRID, "configurations": len(configs), "unique_prompts": unique,
                      "requests": unique * copies, "device": args.device}))  # fmt: skip
    if args.workers > 1:  # configurations split over processes that share the device
        parts = [configs[i :: args.workers] for i in range(args.workers)]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            done = pool.starmap(sweep, [(part, args.device, unique, copies) for part in parts])
        outcomes = [o for part in done for o in part]
    else:
        outcomes = sweep(configs, args.device, unique, copies)
    failed = [o for o in outcomes if not o.ok]
    summary = {"configurations": len(configs), "run": len(outcomes), "passed": len(outcomes) - len(failed),
               "failed": [asdict(o) for o in failed]}  # fmt: skip
    print(json.dumps(summary))
    if args.out:
        doc = {"command": " ".join(sys.argv), "summary": summary, "outcomes": [asdict(o) for o in outcomes]}
        Path(args.out).write_text(json.dumps(doc, indent=1))
    sys.exit(1 if failed or len(outcomes) < len(configs) else 0)


if __name__ == "__main__":
    main()
