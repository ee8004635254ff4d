"""The GPU check: where a CUDA device is present, run the CUDA tests, probe each example on the GPU
under a memory limit, and set the trace estimate for the same budget beside it, printing a
Markdown table to paste into docs/validation.md (with the date, GPU and torch version). Without a
CUDA device it says so and exits 0, having run nothing.

    make gpu-check                                    # on a GPU machine: TORCH_SPEC=torch make gpu-check
    .venv/bin/python benchmarks/gpu_check.py [--memory 4GiB]

The probe's budget on a GPU is the caching allocator's (torch.cuda.set_per_process_memory_fraction),
which counts what the trace does not know: cuDNN and cuBLAS workspaces, fused kernels' scratch
memory, the allocator's rounding and fragmentation. The trace counts tensor bytes, as `bsplan probe
--device cpu --memory-limit` does; the ratio of the two max_batch is what the GPU adds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ("cnn.py", "mlp.py", "transformer.py")
HEADER = ("| example | probe max_batch | probe peak (MiB) | probe s | traced max_batch | traced peak (MiB) | traced s "
          "| traced / probe |\n| --- | --- | --- | --- | --- | --- | --- | --- |")


def bsplan(*args: str) -> tuple[dict[str, Any], float]:
    """One bsplan command's JSON document, and its wall time."""
    begun = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "bsplan.cli", *args, "--json"], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - begun
    try:
        return json.loads(run.stdout), seconds
    except json.JSONDecodeError:
        return {"error": (run.stderr.strip().splitlines() or ["no output"])[-1]}, seconds


def row(example: str, probe: tuple[dict[str, Any], float], traced: tuple[dict[str, Any], float]) -> str:
    """One line of the table: each command's max_batch, peak and wall time, and the ratio of the two answers."""
    cells = [example]
    for data, seconds in (probe, traced):
        if "error" in data:
            cells += [f"error: {data['error']}", "-", f"{seconds:.1f}"]
            continue
        peak = data.get("peak_bytes")
        cells += [str(data["max_batch"]), "-" if peak is None else f"{peak / 2**20:.1f}", f"{seconds:.1f}"]
    found = [data.get("max_batch") for data, _ in (probe, traced)]
    cells.append(f"{found[1] / found[0]:.3f}" if all(isinstance(value, int) and value for value in found) else "-")
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="4GiB", help="the budget of both the probe and the traced estimate")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device is present: the GPU check needs one (nothing was run)")
        return 0
    print(f"{datetime.date.today()}, {torch.cuda.get_device_name(0)}, torch {torch.__version__}, budget {args.memory}\n")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"], capture_output=True, text=True, cwd=ROOT)
    print(f"CUDA tests: {(tests.stdout.strip().splitlines() or ['no output'])[-1]}\n")
    print(HEADER)
    for example in EXAMPLES:
        path = str(ROOT / "examples" / example)
        probe = bsplan("probe", path, "--device", "cuda", "--memory-limit", args.memory, "--no-save")
        traced = bsplan("estimate", path, "--memory", args.memory)
        print(row(example, probe, traced), flush=True)
    print(f"\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}")
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
