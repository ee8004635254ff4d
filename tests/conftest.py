"""Shared helpers: paths to the example and test models, and a runner for the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MODELS = Path(__file__).resolve().parent / "models"


class Run:
    def __init__(self, completed: subprocess.CompletedProcess[str]) -> None:
        self.code = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr

    def json(self) -> Any:
        return json.loads(self.stdout)


def bsplan(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, **popen: Any) -> Run:
    """Run `bsplan ARGS` in a fresh process, as a user would."""
    completed = subprocess.run(
        [sys.executable, "-m", "bsplan.cli", *args],
        capture_output=True, text=True, timeout=600, cwd=cwd, env={**os.environ, **(env or {})}, **popen,
    )
    return Run(completed)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean working directory, so saved probes do not leak between tests."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
