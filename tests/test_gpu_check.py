"""The GPU check (`make gpu-check`), as far as a machine without CUDA can test it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run")
def test_without_cuda_the_check_says_so_and_exits_cleanly() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("no CUDA device is present") and run.stderr == ""


def test_a_row_sets_the_probe_and_the_trace_side_by_side() -> None:
    check = _module()
    probe = ({"max_batch": 100, "peak_bytes": 300 * 2**20}, 12.34)
    traced = ({"max_batch": 110, "peak_bytes": 299 * 2**20}, 3.0)
    assert check.row("cnn.py", probe, traced) == "| cnn.py | 100 | 300.0 | 12.3 | 110 | 299.0 | 3.0 | 1.100 |"
    assert len(check.row("cnn.py", probe, traced).split("|")) == len(check.HEADER.splitlines()[0].split("|"))
    failed = ({"error": "CUDA out of memory"}, 1.0)
    assert check.row("mlp.py", failed, traced) == "| mlp.py | error: CUDA out of memory | - | 1.0 | 110 | 299.0 | 3.0 | - |"
