"""Start-to-finish time of `bsplan plan` against a bare `python -c pass`, and against importing torch.

Each command runs in a fresh process, several times after one warm-up run; the median wall time is
printed as a Markdown table for docs/plan.md. Bytecode caching is left on (PYTHONDONTWRITEBYTECODE
removed), as on a user's install, so the warm-up run compiles once. Run from the repository root:

    .venv/bin/python benchmarks/plan_startup.py [--runs 21]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAN_ARGS = ["plan", "--target", "1024", "--gpus", "4", "--max-micro", "48", "--json"]


def _bsplan() -> list[str]:
    """The console script the user runs, beside this interpreter; else the module."""
    script = Path(sys.executable).parent / "bsplan"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bsplan.cli"]


def median_seconds(command: list[str], runs: int, cwd: str) -> float:
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)  # warm the caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    runs = parser.parse_args().runs
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "bsplan " + " ".join(PLAN_ARGS): _bsplan() + PLAN_ARGS,
        "python -c 'import torch' (what plan avoids)": [sys.executable, "-c", "import torch"],
    }
    with tempfile.TemporaryDirectory() as empty:  # no saved probe to read
        medians = {name: median_seconds(command, runs, empty) for name, command in commands.items()}
    baseline = medians["python -c pass"]
    print(f"Python {platform.python_version()} on {platform.machine()}, median of {runs} runs")
    print("| command | median wall time | over `python -c pass` |")
    print("| --- | --- | --- |")
    for name, seconds in medians.items():
        print(f"| `{name}` | {seconds * 1000:.0f} ms | +{(seconds - baseline) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
