"""The largest micro-batch one device takes: --max-micro, else a saved probe's (or estimate's)
limit, as it ran or recomputed for a --strategy at the plan's world size or for a --gpu."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bsplan.planning.catalog import find_gpu
from bsplan.planning.choices import Strategy
from bsplan.planning.errors import BadInput
from bsplan.planning.memory_line import MemoryLine, cuda_overheads, predict, round_recommended
from bsplan.planning.plan import Limit, PlanOptions
from bsplan.planning.results import LAST_PROBE
from bsplan.planning.saved import SavedProbe, load_probe, read_probe
from bsplan.planning.strategies import SHARDED_PARAMETERS, SINGLE, Layout, per_device_line
from bsplan.planning.units import format_bytes


class NothingFits(BadInput):
    """Not even batch 1 fits one device: under `--strategy auto` that strategy's row, else the error."""


def saved_probe(options: PlanOptions, cwd: Path) -> SavedProbe | None:
    """The probe named by --from; else the last one saved in cwd, read only when no --max-micro gives
    the limit, so a stale probe cannot override it."""
    probe = None if options.probe_file is None else load_probe(options.probe_file, options.seq_len)
    if options.probe_result is not None:  # bsplan.plan(..., probe=result): a result in memory
        probe = read_probe("the given result", options.probe_result, options.seq_len, options.route)
    if probe is None and options.max_micro is None and (cwd / LAST_PROBE).is_file():
        probe = load_probe(cwd / LAST_PROBE, options.seq_len)
    if probe is not None and probe.kind == "routes" and (options.strategy != "none" or options.gpu is not None):
        given = "--gpu" if options.gpu is not None else "--strategy"
        raise BadInput(f"{given} recomputes a probe's limit from its memory line, which {probe.describe()} does not have: plan "
                       f"from it without {given} (its route's strategy and devices), or run `bsplan routes` with that {given}")
    return probe


def resolve_limit(options: PlanOptions, cwd: Path = Path(".")) -> tuple[Limit, list[str]]:
    """--max-micro wins; else the probe named by --from; else the last probe saved in cwd; else none.
    With --strategy the probe's limit is recomputed for that strategy at this world size, and with
    --gpu it is estimated for that GPU from the probe's memory line."""
    probe = saved_probe(options, cwd)
    if options.max_micro is not None:
        return Limit(options.max_micro, "--max-micro", probe), []
    if probe is None and options.gpu is not None:
        raise BadInput("--gpu scales a probe's memory to that GPU: run `bsplan probe MODEL.py` here first, or pass --from FILE")
    if probe is None and options.strategy != "none":
        raise BadInput("--strategy recomputes the limit from a probe's memory breakdown: run `bsplan probe MODEL.py` here "
                       "first, or pass --from FILE (a saved probe or estimate)")
    if probe is None:
        return Limit(None, None, None), []
    if options.strategy != "none":
        return strategy_limit(probe, options, Strategy(options.strategy))
    if probe.kind == "routes":
        return _route_limit(probe, options)
    notes = [] if probe.layout == SINGLE else [
        f"{probe.describe()} ran under {probe.layout.describe()}, and its limit is per device under that: give --strategy "
        f"{probe.layout.strategy} to recompute it for {options.world_size} devices"]
    if options.gpu is not None:
        limit, gpu_notes = _gpu_limit(probe, options.gpu, options, probe.memory)
        return limit, notes + gpu_notes
    if probe.max_batch is None:
        raise BadInput(f"{probe.describe()} found no batch that fits, so it gives no per-device limit: fix the probe or give --max-micro")
    notes.extend(_probe_notes(probe))
    wanted = probe.max_batch if options.use == "max" else probe.recommended_batch
    if wanted is None:
        notes.append("the probe has no recommended_batch, so its max_batch is the limit")
        return Limit(probe.max_batch, "max_batch", probe), notes
    return Limit(wanted, "max_batch" if options.use == "max" else "recommended_batch", probe), notes


def _route_limit(probe: SavedProbe, options: PlanOptions) -> tuple[Limit, list[str]]:
    """A route's max_micro_batch: measured per device under its strategy at its world size, which a
    sharded strategy's limit depends on (each device keeps 1/N of the states)."""
    layout = probe.layout
    if layout.world_size != options.world_size and layout.strategy != Strategy.ddp:  # each of the others keeps 1/N of some states
        raise BadInput(f"{probe.describe()} is per device under {layout.describe()}, not on {options.world_size} devices: plan "
                       f"with --gpus and --nodes making {layout.world_size}, or run `bsplan routes` for {options.world_size}")
    if probe.max_batch is None:
        raise BadInput(f"{probe.describe()} does not fit, so it gives no per-device limit")
    settings = probe.settings
    knobs = ", ".join(part for part in (settings["precision"], "checkpointing" if settings["gradient_checkpointing"] else "",
                                        f"{settings['optimizer']} optimizer", "LoRA" if settings["lora"] else "") if part)
    notes = [f"the per-device limit is {probe.describe()}: {knobs}, {layout.describe()}, with no headroom"]
    if probe.capped_at is not None:
        notes.append(f"the route's limit is capped at a device's share of the routes' target, {probe.capped_at}: the true limit may be higher")
    return Limit(probe.max_batch, "max_micro_batch", probe, strategy=layout.strategy), notes


def _probe_notes(probe: SavedProbe) -> list[str]:
    notes = []
    if probe.capped_at is not None:
        notes.append(f"every batch up to the probe's --max-batch {probe.capped_at} fitted: the true limit may be higher")
    if probe.device_type == "cpu":
        notes.append("the probe ran on the CPU: its limit and timings carry over to a GPU only as far as its memory limit and speed match")
    return notes


def _gpu_limit(probe: SavedProbe, gpu_name: str, options: PlanOptions, line: MemoryLine | None) -> tuple[Limit, list[str]]:
    """The limit on a catalogue GPU, from a line of peak over batch (the probe's, or the one for a
    strategy) plus that GPU's CUDA overheads (memory_line.py; the same arithmetic as `bsplan estimate`)."""
    gpu = find_gpu(gpu_name)
    if line is None:
        raise BadInput(f"{probe.describe()} has fewer than two fitting batches, so no memory per sample to scale to {gpu.key}")
    overheads = cuda_overheads(gpu.compute_capability, train=probe.mode == "train", workspaces_measured=probe.kind == "probe" and probe.device_type == "cuda")
    share = max(1, options.global_batch // options.world_size)  # no micro-batch exceeds a device's share
    prediction = predict(line, gpu.memory_bytes, overheads, probe.headroom, cap=share)
    if prediction.max_batch is None:
        raise NothingFits(f"by {probe.describe()}, not even batch 1 fits on {gpu.key} ({format_bytes(gpu.memory_bytes)}): "
                       "shard the model state or use a larger GPU")
    notes = [f"the per-device limit is estimated for {gpu.key} ({format_bytes(gpu.memory_bytes)}) from {probe.describe()}: "
             f"{format_bytes(line.base_bytes)} + {format_bytes(line.per_sample_bytes)} per sample, plus "
             f"{format_bytes(overheads.total_bytes)} of CUDA overheads (docs/estimate.md)"]
    if probe.device_type == "cpu" and probe.throughput:
        notes.append("the probe's timings are the CPU's: they rank the splits, but not at a GPU's speed")
    if options.use == "max" or prediction.recommended_batch is None:
        return Limit(prediction.max_batch, "max_batch", probe, gpu.key), notes
    return Limit(prediction.recommended_batch, "recommended_batch", probe, gpu.key), notes


def strategy_limit(probe: SavedProbe, options: PlanOptions, strategy: Strategy) -> tuple[Limit, list[str]]:
    """The probe's limit recomputed for a strategy at the plan's world size: the fixed part of its line
    moves by the model states the strategy keeps on a device (strategies.per_device_line). On the
    probe's device its measured max_batch moves as far as the line's prediction moves, and the
    recommended batch is the new line's within the headroom; with --gpu the new line is predicted there."""
    if probe.memory is None or probe.states is None:
        raise BadInput(f"{probe.describe()} has fewer than two fitting batches, so no memory line to recompute for {strategy}")
    layout = Layout(strategy, options.world_size, options.bucket_view and strategy == "ddp")
    line = per_device_line(probe.memory, probe.states, layout, probe.layout)
    notes = [f"the per-device limit is recomputed for {layout.describe()} from {probe.describe()} (run under "
             f"{probe.layout.describe()}): the fixed part of its peak, {format_bytes(probe.memory.base_bytes)}, becomes "
             f"{format_bytes(line.base_bytes)} (docs/strategies.md)"]
    if strategy in SHARDED_PARAMETERS and not probe.states.gathered_bytes and probe.layout.strategy not in SHARDED_PARAMETERS:
        notes.append(f"the probe did not record the units {strategy} gathers whole, so they are not counted")
    if options.gpu is not None:
        limit, gpu_notes = _gpu_limit(probe, options.gpu, options, line)
        return replace(limit, strategy=strategy), notes + gpu_notes
    budget, most, recommended = probe.step_budget_bytes, probe.max_batch, probe.recommended_batch
    if line.per_sample_bytes > 0 and most is not None:  # a flat line moves no limit
        most += line.largest_within(budget) - probe.memory.largest_within(budget)
        recommended = min(most, line.largest_within((1 - probe.headroom) * budget))
    if most is None or most < 1:
        raise NothingFits(f"by {probe.describe()}, not even batch 1 fits on one device under {layout.describe()}")
    notes.extend(_probe_notes(probe))
    if options.use == "max" or recommended is None or recommended < 1:
        return Limit(most, "max_batch", probe, strategy=strategy), notes
    return Limit(round_recommended(recommended), "recommended_batch", probe,
                 strategy=strategy), notes
