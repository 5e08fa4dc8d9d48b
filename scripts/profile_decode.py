"""GPU idle time between steady-state decode steps, from a torch.profiler trace (CUDA).

Builds a DESIGN.md workload, runs it through the engine until every prompt is prefilled and the
batch is pure decode, then profiles `--steps` engine steps. From the trace's GPU kernels (and
memcpys) it reports the window from the first kernel's start to the last one's end, the union of
busy intervals in it, and the idle gaps: idle % = 1 - busy / window, of which gaps longer than
20 µs are counted as idle between steps (shorter ones are the launch bubbles between the kernels
of one graph). Writes the numbers as JSON
(and the Chrome trace with --trace). With --whole-run it profiles a whole second pass of the workload
instead (prefill and mixed steps too; the first pass compiles the kernels and captures the graphs),
and sums the gaps by their length.

    python scripts/profile_decode.py --workload W1 --steps 30 --out decode_idle.json
    python scripts/profile_decode.py --workload W3 --quantization fp8 --max-seqs 1024 --whole-run \
        --out w3-idle.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.engine import Engine, Request, SamplingParams  # noqa: E402
from scripts.bench import WORKLOADS, build_model, make_prompts  # noqa: E402
from scripts.profile_steps import add_engine_args, engine_config, submit, top_kernels  # noqa: E402

STEP_GAP_US = 20.0  # a gap this long is host latency between steps, not a kernel-to-kernel bubble


def busy_intervals(prof) -> list[tuple[float, float]]:
    """(start, end) in µs of every GPU kernel and memcpy/memset in the trace."""
    out = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.end > ev.time_range.start:
            out.append((ev.time_range.start, ev.time_range.end))
    return sorted(out)


def idle_report(intervals: list[tuple[float, float]], steps: int) -> dict:
    start, end = intervals[0][0], max(e for _, e in intervals)
    busy, gaps = 0.0, []
    cur_s, cur_e = intervals[0]
    for s, e in intervals[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    window = end - start
    big = sorted(gaps, reverse=True)
    between = sum(g for g in gaps if g > STEP_GAP_US)
    return {
        "gap_ms_by_length_us": {
            f"{lo}-{hi}": round(sum(g for g in gaps if lo <= g < hi) / 1e3, 1)
            for lo, hi in ((0, 5), (5, 20), (20, 100), (100, 1000), (1000, 10**9))
        },
        "steps": steps,
        "window_ms": round(window / 1e3, 3),
        "step_ms": round(window / 1e3 / steps, 3),
        "busy_ms": round(busy / 1e3, 3),
        "idle_pct": round(100 * (1 - busy / window), 3),
        "idle_between_steps_pct": round(100 * between / window, 3),  # gaps > STEP_GAP_US only
        "gaps": len(gaps),
        "largest_gaps_us": [round(g, 1) for g in big[:10]],
        "kernels": len(intervals),
    }


def whole_run(
    engine: Engine, prompts: list[list[int]], sp: SamplingParams, vocab: int
) -> tuple[dict, profile]:
    """Idle gaps and top kernels of a whole pass of `prompts`, after a first pass (shifted token ids)
    that compiles the kernels and captures the graphs."""
    submit(engine, prompts, sp, 1, vocab)
    while engine.has_unfinished():
        engine.step()
    submit(engine, prompts, sp, 0, vocab)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        torch.cuda.synchronize()
    return idle_report(busy_intervals(prof), steps) | {"kernels_ms": top_kernels(prof)}, prof


def write_report(args, report: dict, prof, engine: Engine) -> None:
    report.update(workload=args.workload, async_mode=not args.sync, command=" ".join(sys.argv),
                  stats=engine.stats())  # fmt: skip
    print(json.dumps(report))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="W1")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sync", action="store_true", help="profile the synchronous loop instead")
    ap.add_argument("--whole-run", action="store_true", help="profile a whole (second) pass instead")
    add_engine_args(ap)
    ap.add_argument("--out", default=None)
    ap.add_argument("--trace", default=None, help="also write the Chrome trace here")
    args = ap.parse_args()
    model = build_model(args.workload)
    prompts = make_prompts(args.workload, None)
    new = WORKLOADS[args.workload].new
    engine = Engine(model, engine_config(args, async_mode=not args.sync))
    sp = SamplingParams(max_new_tokens=new, ignore_eos=True)
    if args.whole_run:
        write_report(args, *whole_run(engine, prompts, sp, model.config.vocab_size), engine)
        engine.close()
        return
    for i, p in enumerate(prompts):
        engine.add(Request(i, p, sp))
    sched = engine.scheduler
    while sched.waiting or any(s.num_computed < s.prompt_len for s in sched.running):
        engine.step()
    for _ in range(10):  # into steady state: graphs captured, pipeline full
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    write_report(args, idle_report(busy_intervals(prof), args.steps), prof, engine)
    while engine.has_unfinished():
        engine.step()
    engine.close()


if __name__ == "__main__":
    main()
