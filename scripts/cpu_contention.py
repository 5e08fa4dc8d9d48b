"""The CPU demo's throughput idle and beside CPU-heavy processes (issue #22's shared-machine check).

    .venv/bin/python scripts/cpu_contention.py --busy 0 1 2

Runs specs/demo.yaml (the same job as `make demo`) into a fresh output folder once per busy count,
with that many `python -c 'while 1: pass'` loops running beside it, and prints one JSON line each:
generated tok/s from report.json, the wall time, and the ratio to the idle run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_demo(busy: int, max_new_tokens: int | None) -> dict:
    """One demo run with `busy` busy loops beside it (and fewer new tokens, if given)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = yaml.safe_load((ROOT / "specs/demo.yaml").read_text())
        spec["input"]["path"] = str(ROOT / "specs/demo_data/*.jsonl")
        spec["output"]["path"] = f"{tmp}/out"
        if max_new_tokens:
            spec["sampling"]["max_new_tokens"] = max_new_tokens
        path = Path(tmp) / "demo.yaml"
        path.write_text(yaml.safe_dump(spec))
        hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(busy)]
        try:
            started = time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "jobs.cli", "submit", str(path), "--no-progress"],
                check=True,
                cwd=ROOT,
                stderr=subprocess.DEVNULL,
            )
            wall = time.monotonic() - started
            load = os.getloadavg()[0]
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        report = json.loads((Path(tmp) / "out/_batchrun/report.json").read_text())
    return {
        "busy_loops": busy,
        "load_average": round(load, 2),
        "generated_tokens_per_s": report["generated_tokens_per_s"],
        "generated_tokens": report["generated_tokens"],
        "job_wall_s": report["wall_seconds"],
        "process_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy loops per run (0: idle)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="shorter runs (default: the spec's)")
    args = parser.parse_args()
    idle = None
    for busy in args.busy:
        result = run_demo(busy, args.max_new_tokens)
        if busy == 0:
            idle = result["generated_tokens_per_s"]
        if idle:
            result["vs_idle"] = round(result["generated_tokens_per_s"] / idle, 2)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
