"""scripts/torture.py as a test: SIGKILL a real job at random moments (seeded), resume, compare.

The fast tier (20 kill points) runs in CI; the long tier (200) is marked slow: `make test-all`, or
`python scripts/torture.py --kills 200` by hand. A failure prints the seed and the attempt's log.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _torture(tmp_path: Path, model: Path, kills: int, seed: int) -> dict:
    cmd = [sys.executable, str(REPO / "scripts/torture.py"), "--kills", str(kills), "--seed", str(seed)]
    cmd += ["--model", str(model), "--workdir", str(tmp_path / "torture")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["points"] >= kills and summary["rounds"] >= 1
    checks = ("duplicates", "lost", "mismatches", "leftovers")
    assert [summary[k] for k in checks] == [0, 0, 0, 0]
    return summary


def test_torture_fast_tier_20_kill_points(tmp_path: Path, tiny_model_dir: Path):
    _torture(tmp_path, tiny_model_dir, kills=20, seed=20)


@pytest.mark.slow
def test_torture_long_tier_200_kill_points(tmp_path: Path, tiny_model_dir: Path):
    _torture(tmp_path, tiny_model_dir, kills=200, seed=2026)
