"""The result drawn: `--plot FILE` as a PNG or SVG chart a reader understands without the table, and
the small bar of a trial's peak against the limit in the terminal's trials table.

matplotlib is an optional extra (`pip install 'bsplan[plot]'`), imported only inside the functions
that draw, so `bsplan --help` and `bsplan plan` never load it. Figures are made without pyplot, on
the Agg canvas: no window, no global state.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

from bsplan.planning.errors import BadInput
from bsplan.planning.memory_line import GIB, MIB, MemoryLine, fit_top
from bsplan.planning.results import EstimateResult, ProbeResult, SweepResult
from bsplan.planning.units import format_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from rich.console import Console

Result = Union[ProbeResult, EstimateResult]
SUFFIXES = (".png", ".svg")
BLOCKS = " ▏▎▍▌▋▊▉█"  # eighths of a cell, so a 10-cell bar resolves 1/80 of the limit
FITS, OOM, LIMIT, MAX, RECOMMENDED = "tab:blue", "tab:red", "black", "tab:green", "tab:orange"


def limit_bar(peak: int | None, limit: int, cells: int = 10) -> str:
    """A trial's peak as a bar of `cells` block characters against the limit, and its percentage."""
    if peak is None or limit <= 0:
        return "-"
    share = peak / limit
    eighths = round(min(share, 1.0) * cells * 8)
    bar = BLOCKS[8] * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")
    return f"{bar.ljust(cells, '░')} {share:4.0%}"


def check_plot(path: Path | None, has_trials: bool = True) -> None:
    """Refuse a --plot that cannot be drawn before any trial runs: a suffix matplotlib is not asked
    for here, --params (no trials to draw), or matplotlib not installed."""
    if path is None:
        return
    if path.suffix.lower() not in SUFFIXES:
        raise BadInput(f"--plot {path} must name a .png or .svg file")
    if not has_trials:
        raise BadInput("--plot draws a model's trials and --params has none: give MODEL instead")
    if path.is_dir():
        raise BadInput(f"--plot {path} is a directory: name a file in it, such as {path / 'probe.png'}")
    folder = next((parent for parent in path.parents if parent.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise BadInput(f"--plot {path} cannot be written: {folder} is not a folder this process may write in")
    if importlib.util.find_spec("matplotlib") is None:
        raise BadInput("--plot needs matplotlib, which is not installed: pip install 'bsplan[plot]'")


def save_chart(result: Result | SweepResult, path: Path | None, console: Console) -> None:
    """Draw the result into --plot's file, if one was given. The result is already out, so a file
    that cannot be written is a warning on the console, never a lost result."""
    if path is None:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5.2), layout="constrained")
    FigureCanvasAgg(figure)
    memory, speed = figure.subplots(1, 2)
    if isinstance(result, SweepResult):
        _sweep(figure, memory, speed, result)
    else:
        figure.suptitle(_title(result), fontsize=11)
        _memory(memory, result)
        _throughput(speed, result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    except OSError as error:
        console.print(f"warning: could not write {path}: {error.strerror}", markup=False)


def _title(result: Result) -> str:
    device, what = result.device, "probe" if isinstance(result, ProbeResult) else "estimate"
    tokens = "" if result.model.seq_len is None else f", {result.model.seq_len:,} tokens per sample"
    answer = "no batch fits" if result.max_batch is None else f"max batch {result.max_batch:,}, recommended {result.recommended_batch or 0:,}"
    how = "measured" if what == "probe" else "predicted from traced or CPU steps"
    return (f"bsplan {what}: {result.model.file} on {device.name}, limit {format_bytes(device.total_bytes)} "
            f"({device.limit_source})\n{result.mode}, {result.precision}{tokens}: {answer} ({how})")


def _unit(limit: int) -> tuple[int, str]:
    return (GIB, "GiB") if limit >= 4 * GIB else (MIB, "MiB")


def _line(result: Result) -> MemoryLine | None:
    """An estimate's fitted line; for a probe, the line through its largest fitting trials."""
    if isinstance(result, EstimateResult):
        return result.fit
    return fit_top([point for trial in result.trials if (point := trial.point) is not None])


def _memory(axes: Axes, result: Result) -> None:
    """Peak per batch: the trials, the line through them, the limit, and the batches it gives."""
    limit = result.device.total_bytes
    scale, unit = _unit(limit)
    fits = [point for trial in result.trials if (point := trial.point) is not None]
    failed = [t for t in result.trials if not t.fits]
    right = max([t.batch for t in result.trials] + [result.max_batch or 0, 1]) * 1.08
    line = _line(result)
    if line is not None and line.per_sample_bytes > 0:
        axes.plot([0, right], [line.base_bytes / scale, line.peak(round(right)) / scale], color=FITS, alpha=0.4,
                  label=f"memory line: {format_bytes(line.base_bytes)} + {format_bytes(line.per_sample_bytes)} per sample")
    axes.scatter([b for b, _ in fits], [p / scale for _, p in fits], color=FITS, zorder=3, label="trial that fits (its peak)")
    if failed:
        axes.scatter([t.batch for t in failed], [(t.peak_bytes or limit) / scale for t in failed], marker="x", s=60,
                     color=OOM, zorder=3, label="trial out of memory (drawn at the limit)")
    named = -right
    for batch, peak in sorted(fits):  # each trial's batch, where it stands clear of the last one named
        if batch - named >= 0.05 * right:
            axes.annotate(f"{batch:,}", (batch, peak / scale), xytext=(-4, 6), textcoords="offset points", ha="right", fontsize=8)
            named = batch
    if failed:  # the first batch that ran out of memory
        first = min(failed, key=lambda t: t.batch)
        axes.annotate(f"{first.batch:,}: out of memory", (first.batch, (first.peak_bytes or limit) / scale), xytext=(4, 6),
                      textcoords="offset points", fontsize=8, color=OOM)
    axes.axhline(limit / scale, color=LIMIT, linestyle="--", label=f"limit {format_bytes(limit)}")
    axes.axhline((1 - result.headroom) * limit / scale, color=RECOMMENDED, linestyle=":", linewidth=1,
                 label=f"limit less {result.headroom:.0%} headroom")
    overheads = result.overheads.total_bytes if isinstance(result, EstimateResult) else 0
    if overheads:
        axes.axhline((limit - overheads) / scale, color=LIMIT, linestyle=":", linewidth=1,
                     label=f"room for tensors: limit less CUDA context and workspaces ({format_bytes(overheads)})")
    _mark(axes, result.max_batch, MAX, "max batch")
    eight = ", a multiple of 8" if (result.recommended_batch or 0) >= 8 else ""
    _mark(axes, result.recommended_batch, RECOMMENDED, f"recommended batch ({result.headroom:.0%} headroom{eight})")
    axes.set(title="Peak memory of a training step" if result.mode == "train" else "Peak memory of a forward pass",
             xlabel="batch size (samples per device)", ylabel=f"peak memory ({unit})", xlim=(0, right), ylim=(0, max([limit] + [p for _, p in fits]) / scale * 1.12))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left")


def _mark(axes: Axes, batch: int | None, color: str, name: str) -> None:
    if batch is not None:
        axes.axvline(batch, color=color, linewidth=1.5, label=f"{name}: {batch:,}")


def _throughput(axes: Axes, result: Result) -> None:
    """Samples per second per batch (tokens per second on the right where a sample has a length)."""
    timed = sorted((t.batch, t.samples_per_second) for t in result.trials if t.fits and t.samples_per_second)
    axes.set(title="Training throughput" if result.mode == "train" else "Inference throughput", xlabel="batch size (samples per device)")
    if isinstance(result, EstimateResult) or not timed:
        why = ("an estimate times nothing on the target device:\nno throughput to show (bsplan probe measures it)"
               if isinstance(result, EstimateResult) else "no trial fitted: no throughput to show")
        axes.text(0.5, 0.5, why, ha="center", va="center", transform=axes.transAxes, color="gray")
        axes.set(xticks=[], yticks=[])
        return
    axes.plot([b for b, _ in timed], [r for _, r in timed], marker="o", color=FITS, label="trial that fits")
    best, efficient = result.best_throughput_batch, result.efficient_batch
    if best is not None:
        rate = dict(timed)[best]
        axes.scatter([best], [rate], marker="*", s=220, color=MAX, zorder=3, label=f"best throughput: batch {best:,}, {rate:,.1f} samples/s")
    if efficient is not None:
        axes.axvline(efficient, color=RECOMMENDED, linestyle=":", label=f"efficient: batch {efficient:,} (within 5% of the best)")
    seq_len = result.model.seq_len
    if seq_len:
        axes.secondary_yaxis("right", functions=(lambda s: s * seq_len, lambda t: t / seq_len)).set_ylabel("tokens/s")
    axes.set(ylabel="samples/s (timed after the warm-up step)", ylim=(0, max(r for _, r in timed) * 1.15), xlim=(0, max(b for b, _ in timed) * 1.08))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")


def _sweep(figure: Figure, batches: Axes, tokens: Axes, result: SweepResult) -> None:
    """Per sequence length: the largest and recommended batch, and the tokens the largest holds."""
    first = result.rows[0].result
    figure.suptitle(f"bsplan {result.command} over sequence lengths: {result.model.file} on {first.device.name}, "
                    f"limit {format_bytes(first.device.total_bytes)} ({first.device.limit_source})", fontsize=11)
    where = range(len(result.rows))
    labels = [f"{row.seq_len:,}" for row in result.rows]
    most = [row.result.max_batch or 0 for row in result.rows]
    batches.bar([x - 0.2 for x in where], most, width=0.4, color=MAX, label="max batch")
    batches.bar([x + 0.2 for x in where], [row.result.recommended_batch or 0 for row in result.rows], width=0.4,
                color=RECOMMENDED, label=f"recommended ({first.headroom:.0%} headroom)")
    for x, value in zip(where, most):
        batches.annotate(f"{value:,}" if value else "none fits", (x - 0.2, value), ha="center", va="bottom", fontsize=8)
    batches.set(title="Largest batch per sequence length", xlabel="sequence length (tokens per sample)",
                ylabel="batch size (samples per device)", xticks=list(where), xticklabels=labels)
    tokens.bar(list(where), [row.max_tokens or 0 for row in result.rows], color=FITS, label="max tokens = max batch x length")
    budget = result.token_budget
    if budget is not None:
        tokens.axhline(budget.tokens, color=LIMIT, linestyle="--",
                       label=f"token budget {budget.tokens:,} (set by length {budget.seq_len:,})")
    else:
        tokens.text(0.5, 0.5, "no token budget: some length fits no batch", ha="center", transform=tokens.transAxes, color="gray")
    tokens.set(title="Tokens per micro-batch at the largest batch", xlabel="sequence length (tokens per sample)",
               ylabel="tokens per micro-batch", xticks=list(where), xticklabels=labels)
    for axes in (batches, tokens):
        axes.set_ylim(0, axes.get_ylim()[1] * 1.3)  # room above the bars for the legend
        axes.grid(alpha=0.3, axis="y")
        axes.legend(fontsize=8, loc="upper right")
