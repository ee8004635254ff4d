"""The `bsplan` command: parses options, calls the core, renders. No logic of its own.

Only light modules are imported at the top: torch is imported inside the commands that run a
model, so `bsplan --help` and `bsplan plan` start fast.
"""

from __future__ import annotations

import json
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
from rich.console import Console

from bsplan.errors import BadInput, BsplanError, UserCodeError

# torch warns at import when NumPy is missing; bsplan never hands torch a NumPy array.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Find the exact largest batch your PyTorch training step fits, and plan global batches from it.",
)
stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)

EXIT_NO_FIT = 3


@app.callback()
def _commands() -> None:
    """Keeps `bsplan COMMAND` a group of commands even while it has one."""


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Mode(str, Enum):
    train = "train"
    infer = "infer"


def _fail(error: BsplanError, json_out: bool) -> NoReturn:
    """One sentence on stderr (or a JSON object on stdout), the user's traceback where they raised."""
    if json_out:
        print(json.dumps(error.to_dict(), indent=2))
    if isinstance(error, UserCodeError):
        stderr.print(error.traceback_text, end="", markup=False)
    if not json_out:
        stderr.print(f"error: {error}", markup=False)
    raise typer.Exit(error.exit_code)


def _emit(data: dict[str, Any], show: Callable[[Console], None], json_out: bool, output: Path | None) -> None:
    """The result: one JSON document on stdout with --json, else a table; --output also saves the JSON."""
    text = json.dumps(data, indent=2)
    if output is not None:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text + "\n")
        except OSError as error:
            stderr.print(f"warning: could not write {output}: {error.strerror}", markup=False)
    if json_out:
        print(text)
    else:
        show(stdout)


@app.command()
def probe(
    model_file: Path = typer.Argument(..., help="Python file defining build_model() and make_batch(batch_size) (docs/model-file.md)."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:N or cpu. Default: cuda:0 when CUDA is available, else cpu."),
    memory_limit: Optional[str] = typer.Option(
        None, help="Memory a batch may use, e.g. 300MiB, 2GiB, 2GB or bytes. On the CPU it counts tensor bytes exactly, like a GPU's allocator."
    ),
    precision: Precision = typer.Option(Precision.fp32, help="fp32, or autocast to bf16 / fp16 (fp16 with a GradScaler)."),
    mode: Mode = typer.Option(Mode.train, help="train: forward, backward and optimizer step. infer: forward under inference_mode."),
    steps: int = typer.Option(3, help="Training steps per trial (>= 2: the first allocates the optimizer state and warms up)."),
    min_batch: int = typer.Option(1, help="Smallest batch to try."),
    max_batch: Optional[int] = typer.Option(None, help="Largest batch to try (default 65536). Equal to --min-batch: check exactly that batch."),
    multiple_of: int = typer.Option(1, help="Search only batches that are multiples of N (1: exact to one sample)."),
    headroom: float = typer.Option(0.1, help="Fraction of device memory kept free in recommended_batch."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables."),
    output: Optional[Path] = typer.Option(None, help="Also write the JSON result to this file."),
) -> None:
    """Run real training steps at growing batch sizes and find the exact largest batch that fits."""
    from bsplan.render import ProbeProgress, show_probe

    try:
        from bsplan.probe import ProbeOptions, run_probe

        options = ProbeOptions.checked(
            device=device, memory_limit=memory_limit, precision=precision.value, mode=mode.value, steps=steps,
            min_batch=min_batch, max_batch=max_batch, multiple_of=multiple_of, headroom=headroom,
        )
        result = run_probe(model_file, options, ProbeProgress(stderr))
    except BsplanError as error:
        _fail(error, json_out)
    _emit(result.to_dict(), lambda console: show_probe(console, result), json_out, output)
    if result.interrupted:
        raise typer.Exit(130)
    if result.max_batch is None:
        raise typer.Exit(EXIT_NO_FIT)


def main() -> None:
    """Console entry point: typer's own usage errors also become one sentence (JSON with --json)."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        code = 130
    except typer.TyperException as error:
        if "--json" in sys.argv:
            print(json.dumps({"error": error.format_message(), "kind": "BadInput"}, indent=2))
        else:
            error.show()  # type: ignore[attr-defined]
        code = BadInput.exit_code
    sys.exit(code if isinstance(code, int) else 0)

if __name__ == "__main__":
    main()
