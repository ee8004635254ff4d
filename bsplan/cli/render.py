"""Rich tables for people; the same dataclasses go to JSON through their to_dict(). No torch here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from rich.console import Console
from rich.status import Status
from rich.table import Table

from bsplan.cli.charts import limit_bar
from bsplan.planning.units import format_bytes

if TYPE_CHECKING:
    from bsplan.planning.results import Breakdown, ModelInfo, ProbeResult, SweepResult, Trial


def _rate(trial: Trial) -> str:
    return "-" if trial.samples_per_second is None else f"{trial.samples_per_second:,.1f}"


class ProbeProgress:
    """Live progress of a probe on stderr: a spinner while a trial runs, a line when it ends."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._status: Status | None = None

    def started(self, batch: int) -> None:
        self._stop()
        if self.console.is_terminal:
            self._status = self.console.status(f"trying batch {batch} ...")
            self._status.start()

    def finished(self, trial: Trial) -> None:
        self._stop()
        if trial.fits:
            self.console.print(
                f"  batch {trial.batch:>7}  fits   peak {format_bytes(trial.peak_bytes):>10}  "
                f"{trial.seconds:6.2f} s  {_rate(trial):>12} samples/s"
            )
        else:
            why = f"  ({trial.oom_evidence})" if trial.oom_evidence else ""
            self.console.print(f"  batch {trial.batch:>7}  out of memory  {trial.seconds:6.2f} s{why}")

    def note(self, text: str) -> None:
        self._stop()
        self.console.print(text, markup=False, soft_wrap=True)

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def show_probe(console: Console, result: ProbeResult) -> None:
    """The summary a person reads after a probe: the answer first, then how it was measured."""
    device = result.device
    summary = Table(title=f"bsplan probe: {result.model.file}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("device", f"{device.name}, {format_bytes(device.total_bytes)} ({device.limit_source})")
    _add_model(summary, result.model)
    summary.add_row("mode / precision", f"{result.mode}, {result.precision}, {result.steps} steps per trial")
    summary.add_row("max batch", "none fits" if result.max_batch is None else str(result.max_batch))
    if result.capped_at is not None:
        summary.add_row("", f"every batch up to the cap {result.capped_at} fitted (raise --max-batch)")
    summary.add_row("first out-of-memory", str(result.first_oom_batch or "-"))
    summary.add_row(
        f"recommended ({result.headroom:.0%} headroom)",
        "-" if result.recommended_batch is None else str(result.recommended_batch),
    )
    summary.add_row("peak at max batch", format_bytes(result.peak_bytes))
    if result.best_throughput_batch is not None:
        summary.add_row(
            "best throughput", f"batch {result.best_throughput_batch}; within 5% from batch {result.efficient_batch}"
        )
    _add_breakdown(summary, result.breakdown)
    console.print(summary)
    console.print(_trials_table("trials", result.trials, device.total_bytes))
    for note in result.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)


def _add_model(summary: Table, model: ModelInfo) -> None:
    """What shapes the model's memory beyond its file: the tokens per sample, the knobs, LoRA's trainable part."""
    if model.seq_len is not None:
        summary.add_row("tokens per sample", f"{model.seq_len:,}")
    if model.settings:
        summary.add_row("settings", ", ".join(f"{key} {value}" if value is not True else key for key, value in model.settings.items()))
    if model.trainable_parameters is not None:
        summary.add_row("trainable parameters", f"{model.trainable_parameters:,} of {model.parameters:,}")


def show_sweep(console: Console, result: SweepResult) -> None:
    """A sweep over sequence lengths: the largest batch and tokens at each, and the safe token budget."""
    if not result.rows:
        console.print("interrupted before any length was measured", markup=False)
        return
    first, model = result.rows[0].result, result.model
    assert model is not None
    title = f"bsplan {result.command}: {model.file} on {first.device.name}, {format_bytes(first.device.total_bytes)}"
    table = Table(title=title, title_justify="left")
    for name in ("seq_len", "max batch", "max tokens", "recommended", "peak", "tokens/s"):
        table.add_column(name, justify="right")
    for row in result.rows:
        rate, found = row.tokens_per_second, row.result.max_batch
        batch = "none fits" if found is None else f"{found:,}" + (" (cap)" if row.result.capped_at is not None else "")
        if found is None and getattr(row.result, "interrupted", False):
            batch = "interrupted"
        table.add_row(
            f"{row.seq_len:,}", batch, "-" if row.max_tokens is None else f"{row.max_tokens:,}",
            "-" if row.result.recommended_batch is None else f"{row.result.recommended_batch:,}",
            format_bytes(row.result.peak_bytes), "-" if rate is None else f"{rate:,.0f}",
        )
    console.print(table)
    described = Table(show_header=False, box=None)
    described.add_column(style="bold")
    described.add_column()
    _add_model(described, model)
    if described.row_count:
        console.print(described)
    budget = result.token_budget
    if budget is not None:
        bound = "at least " if budget.capped else ""
        console.print(f"token budget for length-bucketed batches: {bound}{budget.tokens:,} tokens per micro-batch "
                      f"(set by seq_len {budget.seq_len:,}" + ("; a length reached the --max-batch cap)" if budget.capped else ")"),
                      markup=False, soft_wrap=True)
    elif result.interrupted:
        console.print("interrupted: the lengths after the last row were not measured, so no token budget", markup=False)
    else:
        console.print("no token budget: some length fits no batch", markup=False)
    notes = dict.fromkeys(note for row in result.rows for note in row.result.notes)  # each once, in order
    for note in notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)


def _add_breakdown(summary: Table, memory: Breakdown) -> None:
    summary.add_row("parameters", format_bytes(memory.parameter_bytes))
    summary.add_row("gradients", format_bytes(memory.gradient_bytes))
    estimated = "" if memory.optimizer_state_measured else " (estimated)"
    summary.add_row("optimizer state", format_bytes(memory.optimizer_state_bytes) + estimated)
    summary.add_row("activations per sample", format_bytes(memory.activation_bytes_per_sample))


def _trials_table(title: str, trials: Iterable[Trial], limit: int) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("batch", "fits", "peak", f"share of {format_bytes(limit)}", "seconds", "samples/s"):
        table.add_column(name, justify="right")
    for trial in sorted(trials, key=lambda t: t.batch):
        table.add_row(str(trial.batch), "yes" if trial.fits else "OOM", format_bytes(trial.peak_bytes),
                      limit_bar(trial.peak_bytes, limit), f"{trial.seconds:.2f}", _rate(trial))
    return table


# --- bsplan plan -------------------------------------------------------------------------------

if TYPE_CHECKING:
    from bsplan.planning.plan import Limit, Plan, PlanWarning, Split


def show_plan(console: Console, plan: Plan) -> None:
    """The plan a person reads: the split first, then the rate and warmup, then what to watch."""
    from rich.text import Text  # cells as plain text: paths and device names may hold [brackets]

    world = plan.world_size
    summary = Table(
        title=f"bsplan plan: global batch {plan.global_batch} = {plan.micro_batch} x {plan.accumulation_steps} x {world} devices",
        show_header=False, title_justify="left",
    )
    summary.add_column(style="bold")
    summary.add_column()
    rows = [
        ("micro-batch per device", str(plan.micro_batch)),
        ("accumulation steps", str(plan.accumulation_steps)),
        ("devices", f"{world} ({plan.nodes} node{'s' if plan.nodes > 1 else ''} x {plan.gpus_per_node})"),
        *([("strategy", plan.strategy + (" (recommended by --strategy auto)" if plan.strategies else ""))]
          if plan.strategy != "none" else []),
        ("per-device limit", _limit_text(plan.limit)),
        ("chosen by", plan.chosen_by + (f": {_seconds_text(plan.choice)}" if plan.choice.seconds_per_step else "")),
        ("optimizer", plan.optimizer),
        ("learning rate", _learning_rate_text(plan)),
        ("warmup", _warmup_text(plan)),
    ]
    if plan.noise is not None:
        rows.append(("noise scale", plan.noise.describe(plan.global_batch)))
    if plan.schedule is not None:
        rows.append(("steps per epoch", str(plan.schedule.steps_per_epoch)))
        rows.append(("total steps", "-" if plan.schedule.total_steps is None else str(plan.schedule.total_steps)))
    for name, value in rows:
        summary.add_row(name, Text(value))
    console.print(summary)

    if plan.strategies:
        compared = Table(title=f"strategies on {world} devices, simplest first", title_justify="left")
        for name in ("strategy", "largest micro-batch", "micro-batch", "accumulation steps"):
            compared.add_column(name, justify="left" if name == "strategy" else "right")
        for option in plan.strategies:
            cells = (option.max_micro_batch, option.micro_batch, option.accumulation_steps)
            compared.add_row(option.strategy, *("-" if cell is None else str(cell) for cell in cells))
        console.print(compared)
    if plan.alternatives:
        timed = plan.choice.seconds_per_step is not None
        others = Table(title="runners-up", title_justify="left")
        for name in ("micro-batch", "accumulation steps", "predicted time per optimizer step")[: 3 if timed else 2]:
            others.add_column(name, justify="right")
        for split in plan.alternatives:
            timing = [_seconds_text(split)] if timed else []
            others.add_row(str(split.micro_batch), str(split.accumulation_steps), *timing)
        console.print(others)
    for warning in plan.warnings:
        console.print(warning_text(warning), markup=False)
    for note in plan.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)


def warning_text(warning: PlanWarning) -> str:
    """One warning as a paragraph: what to do, why, and the source."""
    source = f" Source: {warning.source}." if warning.source else ""
    return f"warning: {warning.message}. Why: {warning.reason}.{source}"


def _limit_text(limit: Limit) -> str:
    probe = limit.probe
    if limit.micro_batch is None:
        return "none known: no memory bound (see the warning)"
    if probe is None:
        return f"{limit.micro_batch} ({limit.source})"
    if limit.source == "--max-micro":
        return f"{limit.micro_batch} (--max-micro); timings and BatchNorm from {probe.describe()}"
    recomputed = "" if limit.strategy is None or probe.kind == "routes" else f" recomputed for {limit.strategy}"
    if limit.gpu is not None:
        return f"{limit.micro_batch}: {limit.source}{recomputed} estimated for {limit.gpu} from {probe.describe()}"
    if limit.strategy is not None:
        return f"{limit.micro_batch}: {limit.source}{recomputed} from {probe.describe()}"
    other = "" if limit.source == "max_batch" else f"; --use max for its max_batch {probe.max_batch}"
    return f"{limit.micro_batch}: {limit.source} of {probe.describe()}{other}"


def _seconds_text(split: Split) -> str:
    return f"{split.seconds_per_step:.3g} s ({split.timing})"


def _learning_rate_text(plan: Plan) -> str:
    rate = plan.learning_rate
    if rate is None:
        return "- (no reference recipe)"
    return (f"{rate.value:g} = {rate.base_lr:g} x {rate.factor:.4g} ({rate.rule} scaling from batch {rate.base_batch}); "
            f"{rate.source}")


def _warmup_text(plan: Plan) -> str:
    warmup = plan.warmup
    if warmup is None:
        return "-"
    length = [f"{warmup.steps} steps"] if warmup.steps is not None else []
    if warmup.epochs is not None:
        length.append(f"{warmup.epochs:.3g} epochs")
    return f"{' = '.join(length)}, linear from {warmup.start_lr:g}; rule: {warmup.rule}; {warmup.source}"


# --- bsplan gpus, bsplan estimate --------------------------------------------------------------

if TYPE_CHECKING:
    from bsplan.backends.nvml import Gpu, GpuReport
    from bsplan.planning.results import EstimateResult, PeakComposition, StatesEstimate
    from bsplan.planning.strategies import DeviceStates


def show_gpus(console: Console, report: GpuReport) -> None:
    """The GPUs NVML (and AMD SMI) see, a table per vendor, with what is free on each and who holds the rest."""
    from bsplan.planning.catalog import match_nvml_name

    for vendor, driver, lister in (("NVIDIA", report.driver_version, "nvml"), ("AMD", report.amd_driver_version, "amd-smi")):
        gpus = [gpu for gpu in report.gpus if gpu.vendor == vendor]
        if not gpus:
            continue
        table = Table(title=f"bsplan gpus: {vendor} driver {driver}", title_justify="left")
        for name, justify in ((lister, "right"), ("cuda", "right"), ("name", "left"), ("uuid", "left"), ("used / total", "right"),
                              ("free", "right"), ("processes (pid: memory)", "left"), ("--gpu", "left")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for gpu in gpus:
            cuda = "-" if gpu.cuda_index is None else f"{gpu.cuda_index}{'' if gpu.cuda_index_certain else '?'}"
            known = match_nvml_name(gpu.name)
            table.add_row(
                str(gpu.index), cuda, gpu.name, gpu.uuid, f"{format_bytes(gpu.used_bytes)} / {format_bytes(gpu.total_bytes)}",
                format_bytes(gpu.free_bytes), _processes_text(gpu), "-" if known is None else known.key,
            )
        console.print(table)
        order = report.cuda_order if vendor == "NVIDIA" else "not known for AMD GPUs (HIP's order, after HIP_VISIBLE_DEVICES)"
        console.print(f"CUDA indices: {order}", markup=False, soft_wrap=True)


def _processes_text(gpu: Gpu) -> str:
    if gpu.processes is None:
        return "not available"
    return ", ".join(f"{p.pid}: {format_bytes(p.used_bytes)}" for p in gpu.processes) or "none"


def show_catalog(console: Console) -> None:
    from bsplan.planning.catalog import CATALOG

    table = Table(title="GPU catalogue (sources: docs/gpus.md)", title_justify="left")
    for name, justify in (("--gpu", "left"), ("NVML name", "left"), ("memory", "right"), ("bf16 TFLOP/s (dense)", "right"),
                          ("bandwidth GB/s", "right"), ("note", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for gpu in CATALOG:
        tflops = "-" if gpu.bf16_tflops is None else f"{gpu.bf16_tflops:g}"
        table.add_row(gpu.key, gpu.name, format_bytes(gpu.memory_bytes), tflops, f"{gpu.bandwidth_gb_per_s:g}", gpu.note)
    console.print(table)


def show_estimate(console: Console, result: EstimateResult) -> None:
    """The prediction first, then what it rests on: the breakdown, the overheads, the CPU trials."""
    from rich.text import Text

    device, overheads = result.device, result.overheads
    summary = Table(title=f"bsplan estimate: {result.model.file}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("device", Text(f"{device.name}, {format_bytes(device.total_bytes)} ({device.limit_source})"))
    _add_model(summary, result.model)
    summary.add_row("mode / precision", f"{result.mode}, {result.precision}")
    if result.per_device is not None and result.per_device.layout.strategy != "none":
        summary.add_row("strategy", f"{result.per_device.layout.describe()}: every number is per device")
    summary.add_row("max batch (estimated)", "none fits" if result.max_batch is None else str(result.max_batch))
    if result.capped_at is not None:
        summary.add_row("", f"the prediction reaches the cap {result.capped_at} (raise --max-batch)")
    summary.add_row(f"recommended ({result.headroom:.0%} headroom)", str(result.recommended_batch or "-"))
    summary.add_row("predicted peak at max batch", format_bytes(result.peak_bytes))
    _add_breakdown(summary, result.breakdown)
    if result.per_device is not None and result.per_device.layout.strategy != "none":
        summary.add_row("model states per device", _states_text(result.per_device))
    summary.add_row("fixed part of the peak", format_bytes(result.fit.base_bytes))
    if overheads.total_bytes:
        summary.add_row("CUDA context and driver", format_bytes(overheads.cuda_context_bytes))
        summary.add_row("cuBLAS workspaces", format_bytes(overheads.cublas_workspace_bytes))
        summary.add_row("allocator segments", format_bytes(overheads.allocator_reserve_bytes))
    else:
        summary.add_row("CUDA overheads", "none: a --memory budget counts tensor bytes, like probe --memory-limit")
    console.print(summary)
    if result.at_peak is not None:
        console.print(_composition_table(result.at_peak))
    console.print(_trials_table("traced" if result.method == "trace" else "measured on the CPU", result.trials, device.total_bytes))
    for note in result.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)


def _composition_table(peak: PeakComposition) -> Table:
    """The tensors live at the traced peak by kind, then the modules that saved the most activations."""
    table = Table(title=f"at the peak of batch {peak.batch}: {format_bytes(peak.peak_bytes)}", title_justify="left")
    table.add_column("tensors")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    kinds = [("parameters and buffers", peak.parameter_bytes), ("gradients", peak.gradient_bytes),
             ("optimizer state", peak.optimizer_state_bytes), ("activations saved for backward", peak.activation_bytes),
             ("temporaries", peak.temporary_bytes)]
    kinds += [(f"  saved by {module.name}", module.activation_bytes) for module in peak.top_modules]
    for name, size in kinds:
        table.add_row(name, format_bytes(size), f"{size / max(peak.peak_bytes, 1):.0%}")
    return table


def _states_text(states: DeviceStates) -> str:
    parts = [(states.parameter_bytes, "parameters"), (states.gradient_bytes, "gradients"),
             (states.optimizer_state_bytes, "optimizer state"), (states.bucket_bytes, "DDP buckets"),
             (states.gathered_bytes, "gathered units")]
    shown = " + ".join(f"{format_bytes(size)} {name}" for size, name in parts if size)
    decimal = f" ({states.static_bytes / 1e9:.3g} GB)" if states.static_bytes >= 1e9 else ""  # as the ZeRO paper counts
    return f"{format_bytes(states.static_bytes)}{decimal} = {shown or 'nothing'}"


def show_states(console: Console, result: StatesEstimate) -> None:
    """Model states per device from a parameter count: the total first, then its parts and any batch."""
    layout = result.per_device.layout
    summary = Table(title=f"bsplan estimate: {result.parameters:,} parameters", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("optimizer / precision", f"{result.optimizer}, {result.precision}")
    summary.add_row("strategy", layout.describe())
    summary.add_row("model states per device", _states_text(result.per_device))
    per_sample = result.activation_bytes_per_sample
    summary.add_row("activations per sample", "not included" if per_sample is None else format_bytes(per_sample))
    if result.device is not None:
        device = result.device
        summary.add_row("device", f"{device.name}, {format_bytes(device.total_bytes)} ({device.limit_source})")
        summary.add_row("CUDA overheads", format_bytes(result.overheads.total_bytes))
    if per_sample is not None and result.device is not None:
        summary.add_row("max batch (estimated)", "none fits" if result.max_batch is None else str(result.max_batch))
        summary.add_row(f"recommended ({result.headroom:.0%} headroom)", str(result.recommended_batch or "-"))
    console.print(summary)
    for note in result.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)
