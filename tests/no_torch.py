"""Runs `bsplan ARGS` in a fresh process and checks that it never imported torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# main() as the console script runs it, then a report on stderr of whether anything imported torch.
_REPORT_TORCH = """
import sys
sys.argv = ["bsplan", *sys.argv[1:]]
from bsplan.cli.app import main
try:
    main()
except SystemExit as done:
    print("torch loaded:", "torch" in sys.modules, "exit:", done.code, file=sys.stderr)
"""


def run_without_torch(*args: str, cwd: Path) -> str:
    """stdout of a run that exited 0 without importing torch."""
    done = subprocess.run([sys.executable, "-c", _REPORT_TORCH, *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert done.stderr.strip().endswith("torch loaded: False exit: 0"), done.stderr
    return done.stdout
