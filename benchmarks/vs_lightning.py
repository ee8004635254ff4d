"""bsplan's probe against Lightning's BatchSizeFinder (binsearch, its defaults), side by side, on
the same models under the same memory cap, against the truth from fresh-process checks.

    pip install "lightning>=2.4"      # or: pip install -e ".[bench]"
    .venv/bin/python benchmarks/vs_lightning.py --memory-limit 300MiB [--device cuda]
    .venv/bin/python benchmarks/vs_lightning.py --rlimit 1500MiB     # an OS limit (RLIMIT_DATA) instead

With --memory-limit both finders run under bsplan's counted limit on the CPU's tensor bytes (the
same every run); with --rlimit, each process (both finders and every truth check) runs under an
RLIMIT_DATA of that size, a real OS limit whose edge moves between runs (docs/probe.md).

The truth for a model is the largest batch B that fits when checked alone in a fresh process
(`bsplan probe --min-batch B --max-batch B`) while B + 1 does not. Each finder runs in a fresh
process of its own and its wall time is that whole process, imports included. With --repeats N
each finder runs N times, alternating, and the table gives the median wall time (the answers and
trial counts must be the same every time; a finder whose answer moves is reported as such).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bsplan.planning.units import parse_size

ROOT = Path(__file__).resolve().parent.parent


RLIMIT: int | None = None  # set by --rlimit: every process runs under RLIMIT_DATA of this size


def _limit_data() -> None:
    if RLIMIT is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (RLIMIT, RLIMIT))


def _timed(command: list[str]) -> tuple[str, float]:
    with tempfile.TemporaryDirectory() as folder:  # Lightning leaves checkpoints in its directory
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=folder, preexec_fn=_limit_data)
        return done.stdout, time.perf_counter() - start


def _bsplan(model: Path, limit: str, device: str, *extra: str) -> tuple[dict[str, Any], float]:
    cap = [] if RLIMIT is not None else ["--memory-limit", limit]
    stdout, seconds = _timed([sys.executable, "-m", "bsplan.cli", "probe", str(model), "--device", device, *cap,
                              "--json", "--no-save", *extra])
    return json.loads(stdout), seconds


def _lightning(model: Path, limit: str, device: str) -> tuple[dict[str, Any], float]:
    outside = ["--outside-limit"] if RLIMIT is not None else []
    stdout, seconds = _timed([sys.executable, str(ROOT / "benchmarks" / "lightning_finder.py"), str(model), limit,
                              "--device", device, *outside])
    return json.loads(stdout.strip().splitlines()[-1]), seconds


def fits_alone(model: Path, limit: str, device: str, batch: int) -> bool:
    return _bsplan(model, limit, device, "--min-batch", str(batch), "--max-batch", str(batch))[0].get("max_batch") == batch


def truth(model: Path, limit: str, device: str, candidate: int, steps: int = 20) -> int | None:
    """Walk from a candidate to the B that fits alone while B + 1 does not; None if that takes
    more than `steps` checks (under an OS limit the edge is a band and may not settle)."""
    batch = candidate
    for _ in range(steps):
        if not fits_alone(model, limit, device, batch):
            batch -= 1
        elif fits_alone(model, limit, device, batch + 1):
            batch += 1
        else:
            return batch
    return None


def _seconds(values: list[float]) -> str:
    """The median wall time, with the range when there are repeats."""
    median = f"{statistics.median(values):.1f}"
    return median if len(values) == 1 else f"{median} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-limit", default="300MiB")
    parser.add_argument("--rlimit", help="run every process under this RLIMIT_DATA instead of a counted limit")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each finder (alternating); the median wall time is reported")
    parser.add_argument("examples", nargs="*", default=["mlp.py", "cnn.py", "transformer.py"])
    args = parser.parse_args()
    global RLIMIT
    RLIMIT = None if args.rlimit is None else parse_size(args.rlimit)
    cap = f"RLIMIT_DATA {args.rlimit}" if args.rlimit else f"counted limit {args.memory_limit}"
    print(f"memory cap: {cap} on {args.device}\n")
    print("| model | true max | bsplan found | bsplan / true | bsplan trials | bsplan s | Lightning found | Lightning / true | Lightning trials | Lightning s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.examples:
        model = ROOT / "examples" / name
        runs = [(_bsplan(model, args.memory_limit, args.device), _lightning(model, args.memory_limit, args.device))
                for _ in range(args.repeats)]
        (ours, _), (theirs, _) = runs[0]
        our_seconds = _seconds([seconds for (_, seconds), _ in runs])
        their_seconds = _seconds([seconds for _, (_, seconds) in runs])
        answers = {(mine["max_batch"], len(mine["trials"]), other.get("max_batch"), other.get("trials"))
                   for (mine, _), (other, _) in runs}
        if len(answers) > 1:
            print(f"({name}: the answers moved between repeats, (bsplan batch, trials, Lightning batch, trials): {sorted(answers, key=str)})")
        true_max = truth(model, args.memory_limit, args.device, ours["max_batch"])
        found = theirs.get("max_batch")
        their_result = f"crashed ({theirs['error']})" if theirs.get("error") else str(found)
        their_ratio = "-" if found is None or true_max is None else f"{found / true_max:.2f}"
        our_ratio = "-" if true_max is None else f"{ours['max_batch'] / true_max:.2f}"
        print(
            f"| {name} | {true_max or 'no settled edge'} | {ours['max_batch']} | {our_ratio} | {len(ours['trials'])} | "
            f"{our_seconds} | {their_result} | {their_ratio} | {theirs.get('trials')} | {their_seconds} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
