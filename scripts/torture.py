"""Crash-at-random-points torture: SIGKILL a real job at N random moments, resume, compare.

    python scripts/torture.py --kills 200 --seed 7          # the long tier, by hand
    python scripts/torture.py --kills 20 --seed 7 --model DIR --workdir /tmp/t

A tiny job (Parquet, JSONL, gzip JSONL and a shard with bad rows; a 2-layer random Llama) is run
once uninterrupted as the reference, counting the kill points it passes (runner/faults.py). Then
attempts run on a fresh output, each killed at a moment drawn (seeded, printed) from the whole
reference run: either the n-th pass of a kill point — inside a part write, before a publish, between
compaction steps, right after the fingerprint — or a delay uniform over the reference's wall time.
Each killed attempt is resumed by the next. After every kill the committed rows must hold no
duplicate `_row` and keep every row committed before (none lost); when an attempt finishes, the
output must equal the reference (same rows, identical greedy text and token ids, same error files)
with no parts, temp files, quarantine or lease left, and the next round starts on an empty output.

Jobs are forked from this process, which imports torch once and never runs it (forking after torch
ran threads is unsafe), so an attempt costs the job, not 7 s of imports. The last line printed is
the summary; the exit status is 0 only if every check held.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# what a job imports lazily (torch, transformers' model classes), imported once, before any fork
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402, F401

import jobs.cli  # noqa: E402
import jobs.worker  # noqa: E402, F401
import runner.engine  # noqa: E402, F401
from runner import faults  # noqa: E402
from tests.conftest import committed_rows, read_output, write_inputs, write_spec  # noqa: E402

BAD_SHARD = b'{"id": "c-0", "text": "red green blue"}\n{"id": "c-1", "text": broken\n[1, 2]\n{"id": "c-3"}\n'


@dataclass(slots=True)
class Summary:
    seed: int
    points: int = 0  # attempts killed
    resumes: int = 0  # attempts that started on an output holding an earlier attempt's progress
    rounds: int = 0  # rounds finished and compared with the reference
    rows: int = 0  # output rows compared with the reference
    duplicates: int = 0
    lost: int = 0
    mismatches: int = 0
    leftovers: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.lost or self.mismatches or self.leftovers or self.failures)

    def line(self) -> str:
        return (
            f"torture: seed={self.seed} points={self.points} resumes={self.resumes} rounds={self.rounds} "
            f"rows={self.rows} duplicates={self.duplicates} lost={self.lost} mismatches={self.mismatches} "
            f"leftovers={self.leftovers} failures={len(self.failures)} -> {'OK' if self.ok else 'FAILED'}"
        )


def run_attempt(
    spec: Path, log: Path, kill_at: str = "", delay: float | None = None, counts: Path | None = None
):
    """Fork a `batchrun submit` of `spec`; returns (exit code or -signal, seconds).

    `kill_at` arms a kill point in the child; `delay` SIGKILLs it from here after that many seconds;
    `counts` receives the kill points the child passed (JSON), when it exits normally.
    """
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            faults.arm(kill_at)
            passed = faults.count_points()
            try:
                jobs.cli.main(["submit", str(spec), "--no-progress"])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            if counts is not None:
                counts.write_text(json.dumps(passed))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - started
        if delay is not None and time.monotonic() - started >= delay:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), time.monotonic() - started
        time.sleep(0.005)


def leftovers(out: Path) -> list[str]:
    """Anything a finished job must not leave behind: parts, temp files, quarantined parts, leases."""
    found = [p for p in out.rglob("*") if p.name.endswith(".parts") or p.name.startswith(".tmp-")]
    found += [p for p in (out / "_batchrun").glob("quarantine/**/*") if p.is_file()]
    found += list((out / "_batchrun").glob("leases/*"))
    return sorted(str(p.relative_to(out)) for p in found)


def error_files(out: Path) -> dict[str, str]:
    errors = out / "_batchrun" / "errors"
    return {str(p.relative_to(errors)): p.read_text() for p in sorted(errors.rglob("*.jsonl"))}


def prepare(workdir: Path, model: Path) -> tuple[Path, Path]:
    """Inputs and a spec in `workdir`; returns (spec, reference spec)."""
    write_inputs(workdir / "in", parquet=2, jsonl=2, rows=7)
    (workdir / "in" / "c.jsonl").write_bytes(BAD_SHARD)
    spec = write_spec(workdir / "spec.yaml", model, output={"flush_rows": 3})
    ref = write_spec(workdir / "ref.yaml", model, output={"flush_rows": 3, "path": "ref"})
    return spec, ref


def draw(rng: random.Random, events: list[str], wall: float) -> tuple[str, float | None, str]:
    """One kill moment from the whole reference run: a kill point pass, or a delay (half each)."""
    if rng.random() < 0.5:
        kill_at = rng.choice(events)
        return kill_at, None, f"at {kill_at}"
    delay = round(rng.uniform(0.0, wall), 3)
    return "", delay, f"after {delay:.3f} s"


def torture(workdir: Path, model: Path, kills: int, seed: int) -> Summary:
    """Kill `kills` attempts at random moments (seeded), resuming each; see the module docstring."""
    spec, ref_spec = prepare(workdir, model)
    logs = workdir / "logs"
    logs.mkdir()
    code, wall = run_attempt(ref_spec, logs / "reference.log", counts=workdir / "counts.json")
    if code != 0:
        raise SystemExit(f"the reference run failed ({code}); see {logs / 'reference.log'}")
    passed = json.loads((workdir / "counts.json").read_text())
    events = [f"{point}:{n}" for point, count in sorted(passed.items()) for n in range(1, count + 1)]
    reference = read_output(workdir / "ref")
    reference_errors = error_files(workdir / "ref")
    print(f"torture: seed={seed} reference {wall:.2f} s, kill points passed: {passed}", flush=True)

    rng = random.Random(seed)
    out = workdir / "out"
    summary = Summary(seed)
    attempt, before = 0, {}
    while not summary.failures and (summary.points < kills or out.exists()):
        attempt += 1
        if summary.points < kills:
            kill_at, delay, what = draw(rng, events, wall)
        else:  # enough kills: finish the round unharmed, to compare it
            kill_at, delay, what = "", None, "none (the last resume)"
        if before:
            summary.resumes += 1
        log = logs / f"attempt-{attempt:04d}.log"
        code, took = run_attempt(spec, log, kill_at, delay)
        print(f"attempt {attempt}: kill {what}: exit {code} after {took:.2f} s", flush=True)
        if code == -signal.SIGKILL:
            summary.points += 1
            now = committed_rows(out) if out.exists() else {}
            for rows in now.values():
                summary.duplicates += len(rows) - len(set(rows))
            for stem, rows in before.items():
                summary.lost += len(set(rows) - set(now.get(stem, [])))
            if summary.duplicates or summary.lost:
                summary.failures.append(f"attempt {attempt} ({what}): duplicates or lost rows; see {log}")
            before = now
            continue
        if code != 0:
            summary.failures.append(f"attempt {attempt} ({what}) exited {code}; see {log}")
            break
        summary.rounds += 1
        final = read_output(out)
        summary.rows += sum(len(v) for v in final.values())
        for stem in reference.keys() | final.keys():
            expected, got = reference.get(stem, []), final.get(stem, [])
            summary.mismatches += sum(a != b for a, b in zip(expected, got, strict=False)) + abs(
                len(expected) - len(got)
            )
        if error_files(out) != reference_errors:
            summary.mismatches += 1
        left = leftovers(out)
        summary.leftovers += len(left)
        if summary.mismatches or left:
            summary.failures.append(f"round {summary.rounds} (attempt {attempt}): output differs or {left}")
            break
        shutil.rmtree(out)
        before = {}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="kill points to reach (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--model", type=Path, default=None, help="a tiny HF model folder (default: built)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir, kept")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    if args.workdir is None:
        import tempfile

        args.workdir = Path(tempfile.mkdtemp(prefix="batchrun-torture-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or _build_model(args.workdir / "model")
    print(f"torture: seed={seed} workdir={args.workdir} (rerun: --seed {seed})", flush=True)
    started = time.monotonic()
    summary = torture(args.workdir, model, args.kills, seed)
    for failure in summary.failures:
        print(f"FAILED: {failure}", flush=True)
    print(f"torture: {time.monotonic() - started:.0f} s", flush=True)
    print(summary.line(), flush=True)
    print(json.dumps(asdict(summary)), flush=True)
    sys.exit(0 if summary.ok else 1)


def _build_model(folder: Path) -> Path:
    """Build the tests' tiny model in a child process (this one must not run torch before forking)."""
    pid = os.fork()
    if pid == 0:
        from tests.helpers import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        tiny_llama(tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "building the tiny model failed"
    return folder


if __name__ == "__main__":
    main()
