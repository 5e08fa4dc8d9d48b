"""Host time per engine step, with the device's work taken out: what the loop costs the CPU.

W0 and W1 are bound by the host (the GPU idles while it schedules): this measures the host work that
CPU and CUDA steps share (scheduling, input arrays, postprocessing; a CUDA decode step adds a graph
replay and two copies, the CPU step here eager ops on tiny tensors). A workload's prompts (DESIGN.md
shapes: 512 prompts of [64, 768] tokens -> 256 new) run through the engine on the CPU with the model's
forward replaced by constant logits, so every step costs only the scheduler, the input arrays, the
sampling of a tiny vocabulary and the postprocessing. Reports the steps' total time, ms per prefill
and decode step, and the three host parts (schedule, build_inputs, postprocess) per step, timed
around each call; the fastest of `--repeat` runs.

    python scripts/bench_host.py --workload W0 --out scripts/results/host-w0.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runner.engine import Engine, EngineConfig, Request, SamplingParams  # noqa: E402
from runner.engine.core.scheduler import Scheduler  # noqa: E402
from runner.engine.worker import model_runner as model_runner_module  # noqa: E402
from scripts.bench import WORKLOADS, make_prompts  # noqa: E402

VOCAB = 256  # the stub's logits: sampling a big vocabulary on the CPU would swamp the host parts


def stub_engine(max_seqs: int, tokens: int) -> Engine:
    """An engine on the CPU over a 1-layer tiny Llama whose forward returns constant logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )  # fmt: skip
    engine_config = EngineConfig(
        device="cpu", dtype="float32", max_seqs=max_seqs, kv_cache_tokens=tokens, max_model_len=4096
    )
    engine = Engine(LlamaForCausalLM(config).eval(), engine_config)
    logits = torch.zeros(engine.config.max_batch_tokens, VOCAB)  # [T, V]: every row draws token 7
    logits[:, 7] = 1.0
    engine.model_runner.model.forward = lambda ids, positions, kv, attn, rows, fn: logits[: rows.shape[0]]
    return engine


def timed(totals: dict[str, float], name: str, fn):
    """`fn`, adding its wall time to totals[name] at each call."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0

    return wrapper


def run(name: str, max_seqs: int) -> dict:
    w = WORKLOADS[name]
    prompts = [[t % VOCAB for t in p] for p in make_prompts(name, None)]
    engine = stub_engine(max_seqs, sum(len(p) for p in prompts) + len(prompts) * (w.new + 16))
    parts: dict[str, float] = defaultdict(float)
    scheduler = engine.scheduler
    methods = (Scheduler, "schedule"), (Scheduler, "postprocess"), (model_runner_module, "build_inputs")
    originals = [getattr(owner, attr) for owner, attr in methods]
    for (owner, attr), fn in zip(methods, originals, strict=True):
        setattr(owner, attr, timed(parts, attr, fn))
    sp = SamplingParams(max_new_tokens=w.new, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(Request(id=i, prompt_ids=p, sampling=sp))
    kinds: dict[str, list[float]] = {"prefill": [], "decode": []}
    while engine.has_unfinished():
        prefill = bool(scheduler.waiting) or any(not s.is_decoding for s in scheduler.running)
        t0 = time.perf_counter()
        engine.step()
        kinds["prefill" if prefill else "decode"].append(time.perf_counter() - t0)
    for (owner, attr), fn in zip(methods, originals, strict=True):
        setattr(owner, attr, fn)
    steps = sum(len(v) for v in kinds.values())
    return {
        "workload": name,
        "rows": len(prompts),
        "steps_s": round(sum(map(sum, kinds.values())), 3),  # the engine's steps, end to end
        "steps": {
            k: {"count": len(v), "ms_per_step": round(1e3 * sum(v) / max(1, len(v)), 3)}
            for k, v in kinds.items()
        },
        "parts_ms_per_step": {k: round(1e3 * v / steps, 3) for k, v in parts.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="W0", choices=[n for n, w in WORKLOADS.items() if not w.experts])
    ap.add_argument("--max-seqs", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3, help="runs; the fastest is kept")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = [run(args.workload, args.max_seqs) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["steps_s"])
    result = {
        "command": " ".join(["scripts/bench_host.py", *sys.argv[1:]]),
        "commit": subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **best,
        "steps_s_all_runs": [r["steps_s"] for r in runs],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
