"""`bsplan noise`: its options, its run, its progress on stderr and its result as a table. Kept beside
app.py, which declares the command with these options and hands its values here. No torch at import.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from bsplan.planning.errors import BsplanError
from bsplan.planning.noise import BOOTSTRAP_LEVEL, NoiseOptions, NoiseResult

MODEL = typer.Argument(..., metavar="MODEL",
                       help="A model file whose train_batches(batch_size) yields real batches (docs/noise.md).")
SMALL_BATCH = typer.Option(None, help="B_small, the micro-batch: the only batch that must fit. Default: 32, or a saved probe's "
                                      "recommended batch of this model when smaller.")
BIG_BATCH = typer.Option(None, help="B_big, a multiple of B_small, summed from micro-batches of it. Default: 8 x B_small.")
MAX_STEPS = typer.Option(200, help="Most steps, each of B_big samples.")
REL_ERROR = typer.Option(0.1, help="Stop once the standard error is below this fraction of the noise scale (after 30 steps).")
CHECKPOINT = typer.Option(None, help="A state dict to load (the noise scale changes during training). "
                                     "Default: build_model()'s weights.")
ALLOW_SYNTHETIC = typer.Option(False, "--allow-synthetic", help="Measure make_batch's batches when there is no train_batches "
                                                                 "(a number about that generator, not your data).")
DEVICE = typer.Option(None, help="cuda, cuda:N or cpu. Default: cuda:0 when CUDA is available, else cpu.")
SEED = typer.Option(0, help="Seeds torch and Python's random before the model is built and the data drawn.")
JSON = typer.Option(False, "--json", help="Print one JSON document (bsplan.noise/1) on stdout instead of a table.")
OUTPUT = typer.Option(None, help="Also write the JSON result to this file (bsplan plan --noise-scale FILE reads it).")


def run_noise_command(values: dict[str, Any], fail: Callable[[BsplanError, bool], NoReturn],
                      emit: Callable[..., None], stderr: Console) -> None:
    """The command with its option values: measure, then the table or the JSON; exit 130 when interrupted."""
    json_out = bool(values["json_out"])
    try:
        options = NoiseOptions(values["small_batch"], values["big_batch"], values["max_steps"], values["rel_error"],
                               values["checkpoint"], values["allow_synthetic"], values["device"], values["seed"])
        from bsplan.measure.noise import run_noise

        with contextlib.redirect_stdout(sys.stderr):  # the model file's prints: stdout is the result's
            result = run_noise(values["model"], options, NoiseProgress(stderr))
    except BsplanError as error:
        fail(error, json_out)
    output: Path | None = values["output"]
    emit(result.to_dict(), lambda console: show_noise(console, result), json_out, output)
    if result.interrupted:
        raise typer.Exit(130)


class NoiseProgress:
    """A line on stderr after the first step and then every 10, so a long measurement shows it moves."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def measured(self, steps: int, noise_scale: float | None, relative_error: float) -> None:
        if steps == 1 or steps % 10 == 0:
            value = "not resolved yet" if noise_scale is None else f"{noise_scale:.4g}"
            error = "" if relative_error == float("inf") else f" ± {relative_error:.0%}"
            self.console.print(f"  step {steps:>5}: noise scale {value}{error}", markup=False)

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def show_noise(console: Console, result: NoiseResult) -> None:
    """The noise scale and its interval first, then how it was measured."""
    from rich.text import Text  # cells as plain text: paths may hold [brackets]

    table = Table(title=f"bsplan noise: {result.model}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    interval = f"{_number(result.noise_scale_low)} .. {_number(result.noise_scale_high)}"
    rows = [
        ("noise scale B_simple", _number(result.noise_scale)),
        (f"{BOOTSTRAP_LEVEL:.0%} interval (bootstrap)", interval if result.steps > 1 else "-"),
        ("standard error", "-" if result.relative_error is None else f"{result.relative_error:.1%} of it"),
        ("|G|² (estimate)", _number(result.gradient_norm_squared)),
        ("tr(Σ) (estimate)", _number(result.trace_sigma)),
        ("batches", f"B_small {result.small_batch}, B_big {result.big_batch}"),
        ("steps", f"{result.steps} of at most {result.max_steps} (stopped: {result.stopped}), {result.seconds:.1f} s"),
        ("data", result.data),
        ("weights", result.checkpoint or "as build_model() makes them"),
        ("device", result.device),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)
