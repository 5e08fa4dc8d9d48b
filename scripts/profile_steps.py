"""Where a workload's time goes, step by step: GPU time per step kind and the top kernels (CUDA).

Runs a DESIGN.md workload through the engine in the synchronous loop, with a CUDA event pair
around each step's launch, and sorts the steps into prefill (any prompt tokens) and decode
(decodes only). For each kind it reports steps, GPU ms (sum, mean), host ms outside the wait, and
the tokens computed; then a torch.profiler pass over the first `--profile-prefill` steps and over
`--profile-decode` steady decode steps gives the kernels that take the GPU time in each.

    python scripts/profile_steps.py --workload W2 --out steps.json
    python scripts/profile_steps.py --workload W3 --quantization fp8 --max-seqs 1024 --out steps.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.engine import Engine, EngineConfig, Request, SamplingParams  # noqa: E402
from scripts.bench import WORKLOADS, build_model, make_prompts  # noqa: E402


def top_kernels(prof, limit: int = 25) -> list[dict]:
    """The CUDA kernels (and copies) that took the most device time in `prof`."""
    rows = []
    for ev in prof.key_averages():
        device_us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if device_us > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"kernel": ev.key[:120], "calls": ev.count, "ms": round(device_us / 1e3, 2)})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return [{"total_ms": round(total, 2)}] + rows[:limit]


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """The engine settings a profile takes from the command line (the rest are EngineConfig's defaults)."""
    ap.add_argument("--max-seqs", type=int, default=EngineConfig().max_seqs)
    ap.add_argument("--quantization", default="none", choices=["none", "fp8"])
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])


def engine_config(args: argparse.Namespace, async_mode: bool) -> EngineConfig:
    """bf16 on CUDA with the settings of `add_engine_args`."""
    return EngineConfig(
        device="cuda", dtype="bfloat16", async_mode=async_mode, max_seqs=args.max_seqs,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
    )  # fmt: skip


def submit(engine: Engine, prompts: list[list[int]], sp: SamplingParams, run: int, vocab: int) -> None:
    """Add every prompt with its token ids shifted by `run`: no prefix of an earlier run is reused."""
    for i, p in enumerate(prompts):
        engine.add(Request(run * len(prompts) + i, [(t + run) % vocab for t in p], sp))


def timed_steps(engine: Engine, limit: int | None = None) -> list[dict]:
    """Run engine steps (synchronous loop), timing each one's GPU work with CUDA events."""
    out = []
    runner = engine.model_runner
    while engine.has_unfinished() and (limit is None or len(out) < limit):
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        t1 = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launched = runner.launch(batch)
        end.record()
        t2 = time.perf_counter()
        engine._in_flight.append((batch, launched))
        engine._postprocess(*engine._wait_oldest())
        t3 = time.perf_counter()
        end.synchronize()
        out.append({
            "decodes": batch.num_decodes, "prefill_tokens": sum(batch.num_new[batch.num_decodes:]),
            "gpu_ms": start.elapsed_time(end), "schedule_ms": (t1 - t0) * 1e3,
            "launch_ms": (t2 - t1) * 1e3, "collect_ms": (t3 - t2) * 1e3, "graphed": launched.graphed,
        })  # fmt: skip
    return out


def summarize(steps: list[dict]) -> dict:
    kinds = {
        "prefill": [s for s in steps if s["prefill_tokens"]],
        "decode": [s for s in steps if not s["prefill_tokens"]],
    }
    out = {}
    for kind, group in kinds.items():
        if not group:
            continue
        gpu = sum(s["gpu_ms"] for s in group)
        out[kind] = {
            "steps": len(group),
            "gpu_ms": round(gpu, 1),
            "gpu_ms_mean": round(gpu / len(group), 2),
            "schedule_ms": round(sum(s["schedule_ms"] for s in group), 1),
            "launch_ms": round(sum(s["launch_ms"] for s in group), 1),
            "collect_ms": round(sum(s["collect_ms"] for s in group), 1),
            "prefill_tokens": sum(s["prefill_tokens"] for s in group),
            "decode_rows": sum(s["decodes"] for s in group),
            "graphed": sum(s["graphed"] for s in group),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="W2")
    ap.add_argument("--profile-prefill", type=int, default=4, help="first steps to profile kernels of")
    ap.add_argument("--profile-decode", type=int, default=10, help="steady decode steps to profile")
    add_engine_args(ap)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = build_model(args.workload)
    prompts = make_prompts(args.workload, None)
    new = WORKLOADS[args.workload].new
    engine = Engine(model, engine_config(args, async_mode=False))
    sp = SamplingParams(max_new_tokens=new, ignore_eos=True)
    vocab = model.config.vocab_size
    submit(engine, prompts, sp, 1, vocab)  # a first full pass compiles the kernels and captures the graphs
    while engine.has_unfinished():
        engine.step()
    submit(engine, prompts, sp, 0, vocab)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    steps = timed_steps(engine)
    wall = time.perf_counter() - t0
    report = {"workload": args.workload, "command": " ".join(sys.argv), "wall_s": round(wall, 3)}
    report.update(summarize(steps))

    submit(engine, prompts, sp, 2, vocab)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_steps(engine, args.profile_prefill)
        torch.cuda.synchronize()
    report["prefill_kernels"] = top_kernels(prof)
    sched = engine.scheduler
    while sched.waiting or any(s.num_computed < s.prompt_len for s in sched.running):
        engine.step()
    timed_steps(engine, 5)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_steps(engine, args.profile_decode)
        torch.cuda.synchronize()
    report["decode_kernels"] = top_kernels(prof)
    report["stats"] = engine.stats()
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
