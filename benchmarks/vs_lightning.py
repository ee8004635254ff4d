"""bsplan's probe against Lightning's BatchSizeFinder (binsearch, its defaults), side by side, on
the same models under the same memory cap, against the truth from fresh-process checks.

    pip install "lightning>=2.4"      # or: pip install -e ".[bench]"
    .venv/bin/python benchmarks/vs_lightning.py --memory-limit 300MiB [--device cuda]
    .venv/bin/python benchmarks/vs_lightning.py --rlimit-over-torch 300MiB   # an OS limit instead

With --memory-limit both finders run under bsplan's counted limit on the CPU's tensor bytes (the
same every run). The truth for a model is then the largest batch B that fits when checked alone in
a fresh process (`bsplan probe --min-batch B --max-batch B`) while B + 1 does not.

With --rlimit-over-torch SIZE every process (both finders and every truth check) runs under one
RLIMIT_DATA: the VmData of a process that has only imported torch, plus SIZE. That is a real OS
limit whose edge moves between runs (docs/probe.md), so bsplan's probe runs without
--memory-limit, and the truth is a band of plain training processes (benchmarks/plain_training.py,
no bsplan code, 3 runs at each batch of a grid around the answers): `stable`, the largest batch that
fitted in all 3, and `ever`, the largest that fitted in any.

Each finder runs in a fresh process of its own and its wall time is that whole process, imports
included. With --repeats N each finder runs N times, alternating, and the table gives the median
wall time (and each answer and trial count).
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


def torch_vmdata() -> int:
    """VmData of a fresh process that has only imported torch."""
    code = "import torch\nfor line in open('/proc/self/status'):\n    line.startswith('VmData') and print(line.split()[1])"
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0]) * 1024


def plain_fits(model: Path, batch: int) -> bool:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plain_training.py"), str(model), str(batch)],
                          capture_output=True, text=True, preexec_fn=_limit_data)
    if done.returncode not in (0, 3):
        raise RuntimeError(f"plain training of {model.name} at {batch} failed: {done.stderr[-500:]}")
    return done.returncode == 0


def band(model: Path, answers: list[int], runs: int = 3) -> tuple[int | None, int | None]:
    """(stable, ever) over a grid from 70% of the smallest answer to 130% of the largest, about 25
    batches: the largest that fitted in every run, and the largest that fitted in any."""
    low, high = max(1, int(0.7 * min(answers))), int(1.3 * max(answers)) + 1
    step = max(1, (high - low) // 25)
    stable = ever = None
    for batch in range(low, high + 1, step):
        fitted = sum(plain_fits(model, batch) for _ in range(runs))
        if fitted == runs:
            stable = batch
        if fitted:
            ever = batch
    return stable, ever


def outside_limit_table(examples: list[str], repeats: int) -> None:
    print("| model | fresh-process band (stable..ever) | bsplan found | bsplan / stable | bsplan trials | bsplan s "
          "| Lightning found | Lightning trials | Lightning s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in examples:
        model = ROOT / "examples" / name
        runs = [(_bsplan(model, "", "cpu"), _lightning(model, "1GiB", "cpu")) for _ in range(repeats)]
        ours = [result["max_batch"] for (result, _), _ in runs]
        trials = [len(result["trials"]) for (result, _), _ in runs]
        theirs = [other.get("max_batch") or other.get("error") for _, (other, _) in runs]
        stable, ever = band(model, [batch for batch in ours if batch] + [b for b in theirs if isinstance(b, int)])
        ratios = ", ".join("-" if not stable or not batch else f"{batch / stable:.2f}" for batch in ours)
        print(f"| {name} | {stable}..{ever} | {', '.join(map(str, ours))} | {ratios} | {', '.join(map(str, trials))} "
              f"| {_seconds([seconds for (_, seconds), _ in runs])} | {', '.join(map(str, theirs))} "
              f"| {', '.join(str(other.get('trials')) for _, (other, _) in runs)} | {_seconds([seconds for _, (_, seconds) in runs])} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-limit", default="300MiB")
    parser.add_argument("--rlimit-over-torch", help="run every process under RLIMIT_DATA = torch's own VmData + this")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each finder (alternating); the median wall time is reported")
    parser.add_argument("examples", nargs="*", default=["mlp.py", "cnn.py", "transformer.py"])
    args = parser.parse_args()
    global RLIMIT
    if args.rlimit_over_torch is not None:
        bare = torch_vmdata()
        RLIMIT = bare + parse_size(args.rlimit_over_torch)
        print(f"memory cap: RLIMIT_DATA {RLIMIT} bytes = torch's VmData {bare} + {args.rlimit_over_torch}, on the CPU\n")
        outside_limit_table(args.examples, args.repeats)
        return
    print(f"memory cap: counted limit {args.memory_limit} on {args.device}\n")
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
