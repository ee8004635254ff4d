"""In-process trials or a fresh process per trial? Runs the same search both ways on each example
under the same --memory-limit and reports max_batch, trials and wall time (docs/probe.md).

    .venv/bin/python benchmarks/trial_isolation.py --memory-limit 300MiB
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bsplan.measure.search import find_max_batch
from bsplan.planning.results import Trial
from bsplan.planning.units import parse_size

ROOT = Path(__file__).resolve().parent.parent


def _probe(model: Path, limit: str, *extra: str) -> dict:
    command = [sys.executable, "-m", "bsplan.cli", "probe", str(model), "--device", "cpu", "--memory-limit", limit,
               "--json", "--no-save", *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
    return json.loads(done.stdout)


def in_process(model: Path, limit: str) -> tuple[int | None, int, float]:
    start = time.perf_counter()
    result = _probe(model, limit)
    return result["max_batch"], len(result["trials"]), time.perf_counter() - start


def fresh_process_per_trial(model: Path, limit: str) -> tuple[int | None, int, float]:
    """The same search, each trial a `bsplan probe --min-batch B --max-batch B` of its own."""
    trials = 0

    def run(batch: int) -> Trial:
        nonlocal trials
        trials += 1
        result = _probe(model, limit, "--min-batch", str(batch), "--max-batch", str(batch))
        return Trial(**result["trials"][0])

    start = time.perf_counter()
    outcome = find_max_batch(run, 1, 65536, 1, parse_size(limit))
    return outcome.max_fit, trials, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-limit", default="300MiB")
    parser.add_argument("examples", nargs="*", default=["mlp.py", "cnn.py", "transformer.py"])
    args = parser.parse_args()
    print("| example | way | max_batch | trials | wall s |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.examples:
        model = ROOT / "examples" / name
        for way, run in (("in-process", in_process), ("fresh process per trial", fresh_process_per_trial)):
            largest, trials, seconds = run(model, args.memory_limit)
            print(f"| {name} | {way} | {largest} | {trials} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
