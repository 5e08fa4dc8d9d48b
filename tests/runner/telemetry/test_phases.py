"""Start-up phases: contiguous from the process's start, summed over attempts, shown in run order."""

from __future__ import annotations

import subprocess
import sys

from runner.telemetry.phases import Phases, describe, summed


def test_phases_are_contiguous_and_a_repeated_phase_adds_up():
    phases = Phases(origin=100.0)
    phases.done("launch", at=100.5)
    phases.done("imports", at=102.0)
    phases.add_marks({"model_load": 105.0, "engine_build": 105.25})
    phases.done("imports", at=106.0)  # more imports later: the same phase grows
    assert phases.seconds == {"launch": 0.5, "imports": 2.25, "model_load": 3.0, "engine_build": 0.25}
    assert sum(phases.seconds.values()) == 6.0  # origin to the last mark


def test_a_mark_from_before_the_last_phase_adds_nothing_and_moves_nothing_back():
    phases = Phases(origin=10.0)
    phases.done("plan", at=12.0)
    phases.add_marks({"model_load": 11.0, "first_token": 13.0})
    assert phases.seconds == {"plan": 2.0, "model_load": 0.0, "first_token": 1.0}


def test_the_first_phase_starts_when_the_process_did():
    code = (
        "import time; time.sleep(1.0); from runner.telemetry.phases import Phases; "
        "p = Phases(); p.done('launch'); print(p.seconds['launch'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 1.0 <= float(out) < 30.0


def test_summed_over_attempts_and_described_in_run_order():
    total = summed([{"launch": 0.5, "model_load": 3.0}, {}, {"launch": 0.25, "graph_capture": 1.0}])
    assert total == {"launch": 0.75, "model_load": 3.0, "graph_capture": 1.0}
    node = {
        "worker_first_token": 2.0,
        "start_workers": 0.1,
        "first_token": 0.0,
        "launch": 0.4,
        "worker_launch": 1.5,
    }
    assert describe(node) == (
        "launch 0.4 s, start_workers 0.1 s, first_token 0.0 s, worker_launch 1.5 s, "
        "worker_first_token 2.0 s (4.0 s in all)"
    )
