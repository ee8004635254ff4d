"""Probing under a limit from outside the process: each trial in a fresh process forked from a
template that imported torch once, holding what a plain training process holds."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES, MODELS

from bsplan.backends.host import _read_counters
from bsplan.measure.options import ProbeOptions
from bsplan.measure.world import World

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20

pytestmark = pytest.mark.slow


def test_each_trial_runs_in_a_fresh_process_ready_in_far_less_than_an_import_of_torch() -> None:
    importing = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); import torch; "
                                "print(time.perf_counter() - t)"], capture_output=True, text=True, check=True)
    import_seconds = float(importing.stdout.split()[-1])
    with World(MODELS / "tiny.py", ProbeOptions(device="cpu"), "a limit from outside the process") as world:
        pids, overheads = [], []
        for batch in (1, 8, 64, 8):
            begun = time.perf_counter()
            pids.append(world._ranks[0][0].pid if world._ranks else None)
            trial = world(batch)
            overheads.append(time.perf_counter() - begun - trial.seconds)
            assert trial.fits and not world._ranks  # stopped after every trial
    assert len(set(pids)) == len(pids) or pids[0] is not None
    # After the first, a trial process is forked and ready in a small part of what importing torch takes.
    assert max(overheads[1:]) < min(0.5, import_seconds / 2), (overheads, import_seconds)


def test_a_trial_process_at_rest_holds_what_a_plain_training_process_holds() -> None:
    """VmData (what RLIMIT_DATA counts) of a trial process with its model and optimizer built, against
    a plain training script's at the same point: bsplan's own modules and state add little."""
    plain = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plain_training.py"), str(EXAMPLES / "cnn.py"), "1",
                            "--steps", "1", "--vmdata"], capture_output=True, text=True, check=True)
    plain_rest, plain_threads = map(int, plain.stdout.split()[1:3])
    with World(EXAMPLES / "cnn.py", ProbeOptions(device="cpu"), "a limit from outside the process") as world:
        status = _read_counters(Path(f"/proc/{world._ranks[0][0].pid}/status"))
    assert abs(status["VmData"] - plain_rest) < 16 * MIB, (status["VmData"] / MIB, plain_rest / MIB)
    # The threads too (their stacks and heaps count): a fork lacks those its template's imports started.
    assert status["Threads"] == plain_threads
