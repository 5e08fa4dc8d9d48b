"""Node scaling: one DESIGN.md workload through the whole runner (Parquet in, Parquet out) on 1, 2, ... GPUs.

Builds the workload's random-weight model as a local Hugging Face folder with a word-level tokenizer
over its whole vocabulary (token i is the word "w<i>", no EOS: every row generates exactly `new`
tokens), writes `--shards` Parquet shards of `--rows` prompts in all (lengths uniform in [64, 768]
words, seed 0), then runs `batchrun submit` once per `--gpus` value, each into a new output folder
(never one an earlier run of this script left: its heartbeats would be read as this run's). For
each run it reports the end-to-end rate (generated tokens / wall time of the command, model load and
engine build included), the generation rate (generated tokens / time from the first heartbeat that
saw a generated token, less one heartbeat interval, to the last heartbeat), the start-up phases from
the output's report.json (the node's, and each worker's: they should overlap, not queue) with the
time to the first token, and checks that every run's output holds the same rows as the first one's.
With `--resubmit`, the same command runs again on the finished output and its wall time is
reported (a no-op resubmit: nothing to do). Writes JSON.

    python scripts/bench_gpus.py --workload W1 --rows 8192 --shards 16 --gpus 1,2 --resubmit --out gpus.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.bench import WORKLOADS, build_model  # noqa: E402

HEARTBEAT_S = 1.0


def save_model(name: str, folder: Path) -> None:
    """The workload's random model (bf16) and a word-level tokenizer of its vocabulary, in `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = build_model(name, "cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0").save_pretrained(folder)


def write_shards(folder: Path, vocab: int, rows: int, shards: int) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        n = rows // shards + (s < rows % shards)
        texts = [" ".join(f"w{rng.randrange(vocab)}" for _ in range(rng.randint(64, 768))) for _ in range(n)]
        pq.write_table(pa.table({"text": texts}), folder / f"part-{s:03d}.parquet", row_group_size=256)


def fresh_output(work: Path, gpus: int) -> Path:
    """An output folder no run has used: `out-<gpus>gpu-<date-time>[-n]`, created here."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        out = work / f"out-{gpus}gpu-{stamp}" if n == 0 else work / f"out-{gpus}gpu-{stamp}-{n}"
        try:
            out.mkdir(parents=True)
            return out
        except FileExistsError:
            continue
    raise SystemExit(f"no free output folder name in {work}")


def submit(path: Path) -> tuple[float, subprocess.CompletedProcess]:
    """`batchrun submit` of the spec at `path` as a user runs it: its wall time and the process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", str(path), "--no-progress"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    return time.perf_counter() - t0, proc


def start_up(out: Path) -> dict:
    """The run's start-up phases (report.json's last attempt), the time from the command's start to
    its first token (their sum), and each worker's phases when there were several."""
    report = json.loads((out / "_batchrun" / "report.json").read_text())
    phases = report["attempts"][-1].get("phases", {})
    workers = {
        f.stem.removeprefix("report-"): json.loads(f.read_text())["attempts"][-1].get("phases", {})
        for f in sorted((out / "_batchrun").glob("report-task*.json"))
    }
    engines = report["engine"].values() if len(workers) > 1 else [report["engine"]]  # {task-i: ...} on a node
    graphs = {
        "graphs_captured": sum(e.get("graphs_captured", 0) for e in engines),
        "graph_capture_s": round(max((e.get("graph_capture_s", 0.0) for e in engines), default=0.0), 2),
    }  # captured on first use, during generation: the time they take out of it (the slowest worker's)
    return {
        "first_token_s": round(sum(phases.values()), 2),
        "phases": phases,
        "worker_phases": workers,
        **graphs,
    }


def run(work: Path, model: Path, gpus: int, new: int, engine: dict, sampling: dict, resubmit: bool) -> dict:
    """`batchrun submit` on `gpus` GPUs into a fresh output (spec sections `engine` and `sampling` added);
    its rates, start-up phases and output's row set; with `resubmit`, the no-op resubmit's wall time."""
    out = fresh_output(work, gpus)
    spec = {
        "input": {"path": str(work / "in" / "*.parquet")},
        "prompt": {"column": "text"},
        "model": {"path": str(model)},
        "sampling": {"max_new_tokens": new, "ignore_eos": True, **sampling},
        "engine": engine,
        "output": {"path": str(out)},
        "runtime": {"gpus": gpus, "heartbeat_seconds": HEARTBEAT_S},
    }
    path = work / f"spec-{out.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    wall, proc = submit(path)
    if proc.returncode != 0:
        raise SystemExit(f"{gpus} GPU run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [
        json.loads(x)
        for f in (out / "_batchrun" / "metrics").glob("*.jsonl")
        for x in f.read_text().splitlines()
    ]
    generated = sum(
        max(x["generated_tokens"] for x in lines if x["task"] == t) for t in {x["task"] for x in lines}
    )
    first = min(x["time"] for x in lines if x["generated_tokens"] > 0) - HEARTBEAT_S
    last = max(x["time"] for x in lines)
    rows = sorted(
        (f.name, r)
        for f in out.glob("*.parquet")
        for r in pq.read_table(f, columns=["_row"])["_row"].to_pylist()
    )
    result = {
        "gpus": gpus,
        "output": str(out),
        "generated_tokens": generated,
        "wall_s": round(wall, 2),
        "end_to_end_tok_s": round(generated / wall, 1),
        "generation_s": round(last - first, 2),
        "generation_tok_s": round(generated / (last - first), 1),
        **start_up(out),
        "rows": len(rows),
        "row_set": rows,
        "summary": [x for x in (proc.stdout + proc.stderr).splitlines() if "tok/s" in x or "start-up" in x],
    }
    if resubmit:
        again, proc = submit(path)
        nothing = proc.returncode == 0 and "nothing to do" in proc.stderr
        result |= {"resubmit_wall_s": round(again, 2), "resubmit_did_nothing": nothing}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="W1")
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--new", type=int, default=None, help="tokens per row (default: the workload's)")
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--work", default="bench-gpus", help="folder for the model, the shards and the outputs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resubmit", action="store_true", help="then time the same command again (a no-op)")
    ap.add_argument(
        "--engine", default="{}", help='the spec\'s engine section as JSON, e.g. {"max_seqs": 1024}'
    )
    ap.add_argument(
        "--sampling", default="{}", help='more sampling fields as JSON, e.g. {"temperature": 0.8}'
    )
    args = ap.parse_args()
    work = Path(args.work).resolve()
    model = work / "model"
    if not (model / "config.json").exists():
        save_model(args.workload, model)
    write_shards(work / "in", WORKLOADS[args.workload].vocab, args.rows, args.shards)
    new = args.new or WORKLOADS[args.workload].new
    engine, sampling = json.loads(args.engine), json.loads(args.sampling)
    runs = [run(work, model, int(g), new, engine, sampling, args.resubmit) for g in args.gpus.split(",")]
    base, base_rows = runs[0], runs[0]["row_set"]
    for r in runs:
        r["same_rows_as_first"] = r.pop("row_set") == base_rows
        r["speedup_generation"] = round(r["generation_tok_s"] / base["generation_tok_s"], 3)
        r["speedup_end_to_end"] = round(r["end_to_end_tok_s"] / base["end_to_end_tok_s"], 3)
        print(json.dumps(r), flush=True)
    doc = {
        "command": " ".join(sys.argv),
        "workload": args.workload,
        "rows": args.rows,
        "new": new,
        "engine": engine,
        "sampling": sampling,
        "runs": runs,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
