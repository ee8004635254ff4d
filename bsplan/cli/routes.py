"""`bsplan routes`' body and its tables; its options are in app.py, where typer reads them. Kept apart
so app.py stays a list of commands: the options checked, the routes traced with a line per setting on
stderr, then the tables, the JSON or the chosen route's config on stdout."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from bsplan.planning.choices import PlanFormat
from bsplan.planning.errors import BadInput, BsplanError, NoFit
from bsplan.planning.units import format_bytes

if TYPE_CHECKING:
    from bsplan.models.source import ModelSource
    from bsplan.planning.routes import RoutesOptions, RoutesResult


def run_routes_command(values: dict[str, Any], fail: Callable[[BsplanError, bool], NoReturn],
                       emit: Callable[..., None], stderr: Console) -> None:
    """The command, given its options by name and app.py's ways to fail and to emit a result."""
    from bsplan.cli.render import ProbeProgress, warning_text

    fmt = PlanFormat.json if values["json_out"] else PlanFormat(values["output_format"])
    exporting = fmt not in (PlanFormat.table, PlanFormat.json)
    try:
        if values["json_out"] and values["output_format"] not in (PlanFormat.table, PlanFormat.json):
            raise BadInput(f"--json and --format {values['output_format']} ask for two outputs: give one of them")
        source, options = _options(values, exporting)
        from bsplan.measure.routes import run_routes
        from bsplan.planning.route_export import export_route

        with contextlib.redirect_stdout(sys.stderr):  # the model file's prints: stdout is the result's
            result = run_routes(source, options, ProbeProgress(stderr))
        exported = export_route(result, options, fmt) if exporting else None
    except BsplanError as error:
        fail(error, fmt == PlanFormat.json)
    if exported is None:
        emit(result.to_dict(), lambda console: show_routes(console, result), fmt == PlanFormat.json, values["output"])
        if result.recommended is None:
            raise typer.Exit(NoFit.exit_code)
        return
    if values["output"] is not None:
        emit(result.to_dict(), lambda console: None, False, values["output"])  # saves the JSON; stdout is the config's
    config, warnings = exported
    print(config.text)
    for warning in warnings:
        stderr.print(warning_text(warning), markup=False)
    for note in config.notes:
        stderr.print(f"note: {note}", markup=False, soft_wrap=True)


def _options(values: dict[str, Any], exporting: bool) -> tuple[ModelSource, RoutesOptions]:
    """The model source (one length: the matrix is traced at one) and the routes' options."""
    from bsplan.cli.sources import source_from
    from bsplan.planning.routes import RoutesOptions

    source, lengths = source_from(values["model"], {**values, "gradient_checkpointing": False})  # a knob of the matrix
    if lengths is not None:
        raise BadInput(f"--seq-len {values['seq_len']}: routes are traced at one length; give one")
    options = RoutesOptions.from_cli(
        target=values["target"], target_tokens=values["target_tokens"], seq_len=source.seq_len, gpus=values["gpus"],
        nodes=values["nodes"], gpu=values["gpu"], memory=values["memory"], current=values["current"],
        interconnect=values["interconnect"], lora=None if source.lora is None else str(source.lora), route=values["route"],
        exporting=exporting, noise_scale=values["noise_scale"], trace_wrappers=values["trace_wrappers"],
    )
    return source, options


def show_routes(console: Console, result: RoutesResult) -> None:
    """The routes that reach the target, fastest first (the first is recommended), then those that miss it."""
    fits = Table(title=f"bsplan routes: {result.model.file}, global batch {result.target} on {result.world_size} devices of "
                       f"{result.device.name}, fastest first (compute: against the current setup's)", title_justify="left")
    timed = any(route.predicted_step_seconds is not None for route in result.routes)
    for name in ("#", "route", "setup", "strategy", "max micro", "split", "compute", "sent / step", *("step",) * timed):
        fits.add_column(name, justify="left" if name in ("setup", "strategy") else "right", no_wrap=name in ("split", "sent / step"))
    misses = Table(title="routes that do not fit", title_justify="left")
    for name in ("route", "setup", "strategy"):
        misses.add_column(name, justify="right" if name == "route" else "left")
    misses.add_column("misses by", no_wrap=True, overflow="ellipsis", max_width=44)  # a reason in full is in the notes
    for route in result.routes:
        setup = " ".join(filter(None, (route.precision, "ckpt" * route.activation_checkpointing, route.optimizer, "lora" * route.lora)))
        seconds = "" if route.communication_seconds is None else f" {_duration(route.communication_seconds)}"
        if route.fits:
            step = () if not timed else ("-" if route.predicted_step_seconds is None else _duration(route.predicted_step_seconds),)
            fits.add_row(str(route.rank), str(route.route), setup, route.strategy, str(route.max_micro_batch),
                         f"{route.micro_batch} x {route.accumulation_steps}", f"{route.relative_compute:.2f}",
                         f"{format_bytes(route.communication_bytes)}{seconds}", *step)
        else:
            misses.add_row(str(route.route), setup, route.strategy, route.miss)
    console.print(fits)
    if misses.row_count:
        console.print(misses)
    for note in result.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e6:.3g} µs"
