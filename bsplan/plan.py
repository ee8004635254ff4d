"""A target global batch as micro-batch x accumulation steps x devices, with its learning rate, warmup
and warnings.

Pure arithmetic over plain data, with no torch and no terminal: `bsplan plan` starts in a fraction
of a second, and a script can plan without the CLI. The relation every framework uses:
global batch = micro-batch per device x accumulation steps x devices (docs/plan.md).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from bsplan.errors import BadInput
from bsplan.gpus import find_gpu
from bsplan.memory import MemoryLine, cuda_overheads, predict, round_recommended
from bsplan.result import LAST_PROBE, SAME_THROUGHPUT
from bsplan.saved import SavedProbe, load_probe
from bsplan.scaling import (
    ADAM_FAMILY, GOYAL, LAMB, LARS, MA_YARATS, OPTIMIZERS, SCALINGS, WU_HE,
    LearningRate, Schedule, Warmup, adam_warmup_steps, choose_warmup, scale_learning_rate,
)
from bsplan.strategies import BY_SIMPLICITY, SHARDED_PARAMETERS, SINGLE, STRATEGIES, Layout, per_device_line
from bsplan.units import format_bytes

PLAN_SCHEMA = "bsplan.plan/1"
MAX_ALTERNATIVES = 4
# Wu & He 2018, Figure 1: BatchNorm's error rises as the batch per device shrinks below 32.
BATCHNORM_MIN_MICRO = 32
# Goyal et al. 2017: linear scaling with warmup matched small-batch accuracy on ImageNet up to 8k.
SGD_PLAIN_SCALING_MAX = 8192


@dataclass(frozen=True)
class PlanOptions:
    """What to plan: the target, the devices, where the per-device limit comes from, the recipe."""

    global_batch: int
    gpus_per_node: int = 1
    nodes: int = 1
    max_micro: int | None = None
    probe_file: Path | None = None
    use: str = "recommended"  # which of a probe's limits: "recommended" (keeps headroom) or "max"
    multiple_of: int = 1
    base_lr: float | None = None
    base_batch: int | None = None
    scaling: str = "auto"
    optimizer: str = "adamw"  # what `bsplan probe` trains with when the model file names none
    beta2: float = 0.999
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    warmup_ratio: float | None = None
    dataset_size: int | None = None
    epochs: float | None = None
    batchnorm: bool | None = None  # None: as the probe found, else False
    gpu: str | None = None  # a catalogue GPU: the limit is estimated for it from the probe's memory line
    strategy: str = "none"  # a data-parallel strategy the limit is recomputed for, "auto" to compare them all
    bucket_view: bool = False  # DDP's gradient_as_bucket_view

    def __post_init__(self) -> None:
        """Each bad option refused with one sentence, before anything is computed."""
        for name, value in (
            ("--target", self.global_batch), ("--gpus", self.gpus_per_node), ("--nodes", self.nodes),
            ("--max-micro", self.max_micro), ("--multiple-of", self.multiple_of), ("--base-batch", self.base_batch),
            ("--dataset-size", self.dataset_size),
        ):
            if value is not None and value < 1:
                raise BadInput(f"{name} must be a whole number of at least 1, not {value}")
        for name, real in (("--base-lr", self.base_lr), ("--epochs", self.epochs)):
            if real is not None and not 0 < real < math.inf:
                raise BadInput(f"{name} must be a finite number more than 0, not {real}")
        if (self.base_lr is None) != (self.base_batch is None):
            raise BadInput("--base-lr and --base-batch go together: a recipe's learning rate and the global batch it was tuned at")
        if self.optimizer not in OPTIMIZERS or self.scaling not in SCALINGS or self.use not in ("recommended", "max"):
            raise BadInput(f"unknown --optimizer, --scaling or --use: choose from {OPTIMIZERS}, {SCALINGS}, ('recommended', 'max')")
        if not 0 < self.beta2 < 1:
            raise BadInput(f"--beta2 must lie between 0 and 1, not {self.beta2}")
        self._check_warmup()
        if self.epochs is not None and self.dataset_size is None:
            raise BadInput("--epochs needs --dataset-size to count the optimizer steps")
        if self.gpu is not None and self.max_micro is not None:
            raise BadInput("--gpu estimates the limit from a probe and --max-micro gives it: give one of them")
        self._check_strategy()

    def _check_strategy(self) -> None:
        if self.strategy not in (*STRATEGIES, "auto"):
            raise BadInput(f"unknown --strategy {self.strategy!r}: choose from {', '.join(STRATEGIES)}, auto")
        if self.strategy != "none" and self.max_micro is not None:
            raise BadInput("--strategy recomputes the limit from a probe's memory breakdown and --max-micro gives it: give one of them")
        if self.bucket_view and self.strategy not in ("ddp", "auto"):
            raise BadInput("--bucket-view is DDP's gradient_as_bucket_view: it goes with --strategy ddp (or auto)")

    def _check_warmup(self) -> None:
        given = [v for v in (self.warmup_steps, self.warmup_epochs, self.warmup_ratio) if v is not None]
        if len(given) > 1:
            raise BadInput("give one of --warmup-steps, --warmup-epochs and --warmup-ratio, not several")
        if given and given[0] < 0:
            raise BadInput(f"a warmup cannot be negative ({given[0]})")
        if self.warmup_ratio is not None and self.warmup_ratio >= 1:
            raise BadInput(f"--warmup-ratio is a fraction of the training below 1, not {self.warmup_ratio}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Split:
    """One exact way to reach the global batch on these devices."""

    micro_batch: int
    accumulation_steps: int
    seconds_per_step: float | None = None  # predicted time per optimizer step, from a probe's trials
    timing: str | None = None  # "measured", "interpolated" or "extrapolated" (flat past the probed batches)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decomposition:
    choice: Split
    alternatives: tuple[Split, ...]  # the runners-up, best first
    chosen_by: str


@dataclass(frozen=True)
class Limit:
    """The largest micro-batch one device takes, and where that number came from."""

    micro_batch: int | None  # None: no limit was known, so the plan has no memory bound
    source: str | None  # "--max-micro", or the probe's "recommended_batch" or "max_batch"
    probe: SavedProbe | None  # the probe read (--from, or the last one saved here): timings and BatchNorm
    gpu: str | None = None  # the catalogue GPU the limit was estimated for (--gpu), from the probe's memory line
    strategy: str | None = None  # the strategy the limit was recomputed for (--strategy); None: as the probe ran

    def to_dict(self) -> dict[str, Any]:
        probe = None if self.probe is None else self.probe.to_dict()
        return {"micro_batch": self.micro_batch, "source": self.source, "probe": probe, "gpu": self.gpu, "strategy": self.strategy}


@dataclass(frozen=True)
class StrategyOption:
    """One strategy under `--strategy auto`: its per-device limit and the split with the fewest steps."""

    strategy: str
    max_micro_batch: int | None  # None: not even batch 1 fits
    micro_batch: int | None  # None: no exact split within the limit
    accumulation_steps: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlanWarning:
    code: str
    message: str  # what to do
    reason: str  # why, for this plan
    source: str | None  # the paper or fact behind it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    global_batch: int
    nodes: int
    gpus_per_node: int
    multiple_of: int
    choice: Split
    alternatives: tuple[Split, ...]
    chosen_by: str
    limit: Limit
    optimizer: str
    learning_rate: LearningRate | None
    warmup: Warmup | None
    schedule: Schedule | None
    warnings: tuple[PlanWarning, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = field(default_factory=tuple)
    strategy: str = "none"  # --strategy, or the one --strategy auto recommends
    strategies: tuple[StrategyOption, ...] = ()  # with --strategy auto: every strategy, simplest first
    bucket_view: bool = False  # the limit assumes DDP's gradient_as_bucket_view (--bucket-view, or the probe ran so)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def micro_batch(self) -> int:
        return self.choice.micro_batch

    @property
    def accumulation_steps(self) -> int:
        return self.choice.accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        """The JSON document; field names are a contract with scripts (docs/plan.md lists them)."""
        return {
            "schema": PLAN_SCHEMA,
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "accumulation_steps": self.accumulation_steps,
            "world_size": self.world_size,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "multiple_of": self.multiple_of,
            "chosen_by": self.chosen_by,
            "seconds_per_step": self.choice.seconds_per_step,
            "limit": self.limit.to_dict(),
            "optimizer": self.optimizer,
            "learning_rate": None if self.learning_rate is None else self.learning_rate.value,
            "scaling": None if self.learning_rate is None else self.learning_rate.to_dict(),
            "warmup_steps": None if self.warmup is None else self.warmup.steps,
            "warmup": None if self.warmup is None else self.warmup.to_dict(),
            "steps_per_epoch": None if self.schedule is None else self.schedule.steps_per_epoch,
            "total_steps": None if self.schedule is None else self.schedule.total_steps,
            "alternatives": [split.to_dict() for split in self.alternatives],
            "strategy": self.strategy,
            "strategies": [option.to_dict() for option in self.strategies],
            "bucket_view": self.bucket_view,
            "warnings": [warning.to_dict() for warning in self.warnings],
            "notes": list(self.notes),
        }


def micro_batches(per_device: int, limit: int | None, multiple_of: int = 1) -> list[int]:
    """Every micro-batch that divides the per-device share exactly, largest first. With no limit
    there is no reason to accumulate, so the only one is the whole share."""
    if limit is None:
        return [per_device] if per_device % multiple_of == 0 else []
    divisors = set()
    for small in range(1, math.isqrt(per_device) + 1):
        if per_device % small == 0:
            divisors.update((small, per_device // small))
    return sorted((d for d in divisors if d <= limit and d % multiple_of == 0), reverse=True)


def decompose(
    global_batch: int,
    world_size: int,
    limit: int | None,
    multiple_of: int = 1,
    throughput: Sequence[tuple[int, float]] = (),
    min_micro: int = 1,
) -> Decomposition:
    """Choose among every exact (micro, accumulation): the fewest accumulation steps, or, with a
    probe's (batch, samples per second), the fastest predicted optimizer step. Timings choose only
    among micro-batches of at least min_micro when one exists (BatchNorm's statistics need them:
    a faster step that trains worse is no gain)."""
    if limit is not None and limit < multiple_of:
        raise BadInput(f"--multiple-of {multiple_of} is above the per-device limit of {limit}, so no micro-batch fits")
    per_device, remainder = divmod(global_batch, world_size)
    micros = [] if remainder else micro_batches(per_device, limit, multiple_of)
    if not micros:
        raise BadInput(_no_split(global_batch, world_size, limit, multiple_of))
    points = _seconds_per_sample_points(throughput)
    splits = [_timed_split(micro, per_device // micro, points) for micro in micros]
    if limit is None:
        return Decomposition(splits[0], (), "no per-device limit: accumulation 1")
    seconds = {split.micro_batch: split.seconds_per_step for split in splits if split.seconds_per_step is not None}
    if not seconds:
        return Decomposition(splits[0], tuple(splits[1 : MAX_ALTERNATIVES + 1]), "fewest accumulation steps")
    allowed = {micro: time for micro, time in seconds.items() if micro >= min_micro} or seconds
    fastest = min(allowed.values())
    choice = next(split for split in splits if allowed.get(split.micro_batch, math.inf) <= fastest * SAME_THROUGHPUT)
    rest = sorted(  # timed ones fastest first, then the untimed (below the probed batches) by accumulation
        (s for s in splits if s is not choice), key=lambda s: (seconds.get(s.micro_batch, math.inf), s.accumulation_steps)
    )
    why = "fastest predicted optimizer step (probe timings)"
    if len(allowed) < len(seconds):
        why = f"fastest predicted optimizer step at micro-batch {min_micro} or more (probe timings; BatchNorm)"
    return Decomposition(choice, tuple(rest[:MAX_ALTERNATIVES]), why)


def nearest_achievable(global_batch: int, world_size: int, multiple_of: int = 1) -> tuple[int | None, int]:
    """The global batches nearest below (None if none) and above that split exactly. With a limit of
    at least multiple_of they are the multiples of devices x multiple_of: micro multiple_of always fits."""
    step = world_size * multiple_of
    below = global_batch // step * step
    return (below or None), below + step


def _no_split(global_batch: int, world_size: int, limit: int | None, multiple_of: int) -> str:
    """One sentence: why the target does not split, and the nearest global batches that do."""
    if global_batch % world_size:
        why = f"{global_batch} is not a multiple of the {world_size} devices"
    else:
        why = f"its {global_batch // world_size} per device is not a multiple of --multiple-of {multiple_of}"
    nearest = [
        f"{g} (micro-batch {micro} x {accumulation} accumulation step{'s' if accumulation > 1 else ''})"
        for g in nearest_achievable(global_batch, world_size, multiple_of) if g is not None
        for micro, accumulation in [_best(g // world_size, limit, multiple_of)]
    ]
    named = f"batch is {nearest[0]}" if len(nearest) == 1 else f"batches are {nearest[0]} and {nearest[1]}"
    return f"cannot split global batch {global_batch} exactly: {why}; the nearest achievable global {named}"


def _best(per_device: int, limit: int | None, multiple_of: int) -> tuple[int, int]:
    micro = micro_batches(per_device, limit, multiple_of)[0]
    return micro, per_device // micro


def _seconds_per_sample_points(throughput: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """(batch, seconds per sample), one per batch (repeated trials averaged), sorted by batch."""
    by_batch: dict[int, list[float]] = {}
    for batch, samples_per_second in throughput:
        by_batch.setdefault(batch, []).append(1 / samples_per_second)
    return [(batch, sum(times) / len(times)) for batch, times in sorted(by_batch.items())]


def _timed_split(micro: int, accumulation: int, points: list[tuple[int, float]]) -> Split:
    """Predicted time per optimizer step = accumulation x micro x seconds per sample at that micro:
    linear between measured batches, flat past the largest (larger batches rarely run slower per
    sample, so the tie rule decides there), and none below the smallest, where flat would flatter."""
    if not points or micro < points[0][0]:
        return Split(micro, accumulation)
    index = bisect_left(points, micro, key=lambda point: point[0])
    if index < len(points) and points[index][0] == micro:
        per_sample, timing = points[index][1], "measured"
    elif index == len(points):
        per_sample, timing = points[-1][1], "extrapolated"
    else:
        (b0, t0), (b1, t1) = points[index - 1], points[index]
        per_sample, timing = t0 + (t1 - t0) * (micro - b0) / (b1 - b0), "interpolated"
    return Split(micro, accumulation, accumulation * micro * per_sample, timing)


class _NothingFits(BadInput):
    """Not even batch 1 fits one device: under `--strategy auto` that strategy's row, else the error."""


def _saved_probe(options: PlanOptions, cwd: Path) -> SavedProbe | None:
    """The probe named by --from; else the last one saved in cwd, read only when no --max-micro gives
    the limit, so a stale probe cannot override it."""
    probe = None if options.probe_file is None else load_probe(options.probe_file)
    if probe is None and options.max_micro is None and (cwd / LAST_PROBE).is_file():
        probe = load_probe(cwd / LAST_PROBE)
    return probe


def resolve_limit(options: PlanOptions, cwd: Path = Path(".")) -> tuple[Limit, list[str]]:
    """--max-micro wins; else the probe named by --from; else the last probe saved in cwd; else none.
    With --strategy the probe's limit is recomputed for that strategy at this world size, and with
    --gpu it is estimated for that GPU from the probe's memory line."""
    probe = _saved_probe(options, cwd)
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
        return strategy_limit(probe, options, options.strategy)
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


def _probe_notes(probe: SavedProbe) -> list[str]:
    notes = []
    if probe.capped_at is not None:
        notes.append(f"every batch up to the probe's --max-batch {probe.capped_at} fitted: the true limit may be higher")
    if probe.device_type == "cpu":
        notes.append("the probe ran on the CPU: its limit and timings carry over to a GPU only as far as its memory limit and speed match")
    return notes


def _gpu_limit(probe: SavedProbe, gpu_name: str, options: PlanOptions, line: MemoryLine | None) -> tuple[Limit, list[str]]:
    """The limit on a catalogue GPU, from a line of peak over batch (the probe's, or the one for a
    strategy) plus that GPU's CUDA overheads (memory.py; the same arithmetic as `bsplan estimate`)."""
    gpu = find_gpu(gpu_name)
    if line is None:
        raise BadInput(f"{probe.describe()} has fewer than two fitting batches, so no memory per sample to scale to {gpu.key}")
    overheads = cuda_overheads(gpu.compute_capability, train=probe.mode == "train", workspaces_measured=probe.kind == "probe" and probe.device_type == "cuda")
    share = max(1, options.global_batch // options.world_size)  # no micro-batch exceeds a device's share
    prediction = predict(line, gpu.memory_bytes, overheads, probe.headroom, cap=share)
    if prediction.max_batch is None:
        raise _NothingFits(f"by {probe.describe()}, not even batch 1 fits on {gpu.key} ({format_bytes(gpu.memory_bytes)}): "
                       "shard the model state or use a larger GPU")
    notes = [f"the per-device limit is estimated for {gpu.key} ({format_bytes(gpu.memory_bytes)}) from {probe.describe()}: "
             f"{format_bytes(line.base_bytes)} + {format_bytes(line.per_sample_bytes)} per sample, plus "
             f"{format_bytes(overheads.total_bytes)} of CUDA overheads (docs/estimate.md)"]
    if probe.device_type == "cpu" and probe.throughput:
        notes.append("the probe's timings are the CPU's: they rank the splits, but not at a GPU's speed")
    if options.use == "max" or prediction.recommended_batch is None:
        return Limit(prediction.max_batch, "max_batch", probe, gpu.key), notes
    return Limit(prediction.recommended_batch, "recommended_batch", probe, gpu.key), notes


def strategy_limit(probe: SavedProbe, options: PlanOptions, strategy: str) -> tuple[Limit, list[str]]:
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
        most += _within(line, budget) - _within(probe.memory, budget)
        recommended = min(most, _within(line, (1 - probe.headroom) * budget))
    if most is None or most < 1:
        raise _NothingFits(f"by {probe.describe()}, not even batch 1 fits on one device under {layout.describe()}")
    notes.extend(_probe_notes(probe))
    if options.use == "max" or recommended is None or recommended < 1:
        return Limit(most, "max_batch", probe, strategy=strategy), notes
    return Limit(round_recommended(recommended), "recommended_batch", probe,
                 strategy=strategy), notes


def _within(line: MemoryLine, budget_bytes: float) -> int:
    """The largest batch a rising line keeps within a budget (below 1 where none does)."""
    return math.floor((budget_bytes - line.base_bytes) / line.per_sample_bytes)


def choose_strategy(options: PlanOptions, cwd: Path) -> tuple[Limit, list[str], tuple[StrategyOption, ...]]:
    """`--strategy auto`: each strategy's limit at this world size and its split with the fewest
    accumulation steps; the recommendation is the simplest (BY_SIMPLICITY) of those needing the fewest."""
    probe = _saved_probe(options, cwd)
    if probe is None:
        raise BadInput("--strategy auto compares strategies from a probe's memory breakdown: run `bsplan probe MODEL.py` "
                       "here first, or pass --from FILE (a saved probe or estimate)")
    per_device, remainder = divmod(options.global_batch, options.world_size)
    limits: dict[str, tuple[Limit, list[str]]] = {}
    rows = []
    for strategy in BY_SIMPLICITY:
        try:
            limits[strategy] = strategy_limit(probe, options, strategy)
        except _NothingFits:
            rows.append(StrategyOption(strategy, None, None, None))
            continue
        most = limits[strategy][0].micro_batch
        micros = [] if remainder else micro_batches(per_device, most, options.multiple_of)
        rows.append(StrategyOption(strategy, most, *((micros[0], per_device // micros[0]) if micros else (None, None))))
    if not limits:
        raise BadInput(f"by {probe.describe()}, not even batch 1 fits on one device under any strategy at {options.world_size} devices")
    split = [row for row in rows if row.accumulation_steps is not None]
    fewest = min((row.accumulation_steps for row in split), default=None)
    # With no exact split anywhere, the roomiest strategy's decomposition explains why, naming the nearest targets.
    chosen = next((row.strategy for row in split if row.accumulation_steps == fewest),
                  max(limits, key=lambda name: limits[name][0].micro_batch or 0))
    limit, notes = limits[chosen]
    notes = [f"--strategy auto recommends {chosen}: the simplest of the strategies that need the fewest accumulation "
             f"steps ({fewest}); simplest first: {', '.join(BY_SIMPLICITY)}", *notes]
    return limit, notes, tuple(rows)


def make_plan(options: PlanOptions, cwd: Path = Path(".")) -> Plan:
    """The whole plan: split, learning rate, warmup, schedule, warnings."""
    strategies: tuple[StrategyOption, ...] = ()
    if options.strategy == "auto":
        limit, notes, strategies = choose_strategy(options, cwd)
    else:
        limit, notes = resolve_limit(options, cwd)
    probe = limit.probe
    world = options.world_size
    decomposition = decompose(
        options.global_batch, world, limit.micro_batch, options.multiple_of, () if probe is None else probe.throughput,
        BATCHNORM_MIN_MICRO if _batchnorm_source(options, probe) else 1,
    )
    learning_rate = None
    if options.base_lr is not None and options.base_batch is not None:
        learning_rate = scale_learning_rate(
            options.base_lr, options.base_batch, options.global_batch, options.scaling, options.optimizer
        )
    else:
        notes.append("no learning rate: give --base-lr and --base-batch (a recipe's rate and the global batch it was tuned at) to scale one")
    schedule = None if options.dataset_size is None else Schedule.of(options.dataset_size, options.epochs, options.global_batch)
    warmup = choose_warmup(
        warmup_steps=options.warmup_steps, warmup_epochs=options.warmup_epochs, warmup_ratio=options.warmup_ratio,
        optimizer=options.optimizer, beta2=options.beta2, learning_rate=learning_rate, schedule=schedule,
    )
    if warmup is None:
        notes.append(f"no warmup: {options.optimizer}'s rule depends on whether the rate grows, so give --base-lr and --base-batch, or --warmup-*")
    elif warmup.steps is None:
        notes.append("warmup is known in epochs only: give --dataset-size to count it in optimizer steps")
    plan = Plan(
        global_batch=options.global_batch, nodes=options.nodes, gpus_per_node=options.gpus_per_node,
        multiple_of=options.multiple_of, choice=decomposition.choice, alternatives=decomposition.alternatives,
        chosen_by=decomposition.chosen_by, limit=limit, optimizer=options.optimizer, learning_rate=learning_rate,
        warmup=warmup, schedule=schedule, notes=tuple(notes), strategy=limit.strategy or options.strategy,
        strategies=strategies, bucket_view=_bucket_view(limit, options),
    )
    return replace(plan, warnings=tuple(plan_warnings(plan, options)))


def _bucket_view(limit: Limit, options: PlanOptions) -> bool:
    """Whether the limit counts DDP's gradients once (in its buckets): recomputed for ddp with
    --bucket-view, or taken as it is from a probe that ran so."""
    if limit.strategy is not None:
        return limit.strategy == "ddp" and options.bucket_view
    return limit.source != "--max-micro" and limit.probe is not None and limit.probe.layout.bucket_view


def plan_warnings(plan: Plan, options: PlanOptions) -> list[PlanWarning]:
    """What could make this plan train worse than its numbers suggest, each with its reason and source."""
    warnings = _limit_warnings(plan.limit)
    probe = plan.limit.probe
    micro, world = plan.micro_batch, plan.world_size
    recomputed = plan.limit.gpu is not None or plan.limit.strategy is not None
    if probe is not None and not recomputed and probe.max_batch is not None and micro > probe.max_batch:
        warnings.append(PlanWarning(
            "above-probed-max", f"lower --max-micro to at most {probe.max_batch}",
            f"micro-batch {micro} is above the largest batch that fitted in {probe.describe()} ({probe.max_batch})", None,
        ))
    batchnorm = _batchnorm_source(options, probe)
    if batchnorm is not None and micro < BATCHNORM_MIN_MICRO:
        synced = micro * world
        advice = (f"use SyncBatchNorm (it normalises over the {synced} samples of all {world} devices) or GroupNorm"
                  if synced >= BATCHNORM_MIN_MICRO else
                  f"use GroupNorm (SyncBatchNorm would still see only {synced} samples across the {world} devices)")
        warnings.append(PlanWarning(
            "batchnorm-small-micro", advice,
            f"the model has BatchNorm ({batchnorm}) and {micro} samples per device is below {BATCHNORM_MIN_MICRO}: "
            "its statistics see only the micro-batch, which accumulation does not enlarge",
            f"{WU_HE}, Figure 1",
        ))
    if options.optimizer == "sgd" and plan.global_batch > SGD_PLAIN_SCALING_MAX:
        warnings.append(PlanWarning(
            "large-batch-sgd", "consider LARS (--optimizer lars) or LAMB (--optimizer lamb)",
            f"global batch {plan.global_batch} is beyond 8k, where plain SGD with linear scaling and warmup "
            "stopped matching small-batch accuracy on ImageNet",
            f"{GOYAL}; {LARS}; {LAMB}",
        ))
    if plan.accumulation_steps > 1:
        steps = plan.accumulation_steps
        warnings.append(PlanWarning(
            "accumulation-loss",
            f"normalise the loss over the whole global batch: sum the per-sample (or per-token) losses of all {steps} "
            "micro-batches and divide by the global count, rather than averaging each micro-batch on its own",
            f"with {steps} accumulation steps each backward pass adds to the gradient; per-micro-batch means weigh "
            f"micro-batches of unequal sample or token counts equally and, unless divided by {steps}, make the gradient {steps} times too large",
            f"{GOYAL}, Remark 3 (normalise by the total minibatch size)",
        ))
    warnings.extend(_warmup_warnings(plan, options))
    return warnings


def _limit_warnings(limit: Limit) -> list[PlanWarning]:
    if limit.micro_batch is None:
        return [PlanWarning(
            "no-limit", "give --max-micro B, or run `bsplan probe MODEL.py` here first (or pass --from PROBE.json)",
            "no per-device limit was known (no --max-micro, no --from, no saved probe in .bsplan/), "
            "so this plan assumes the whole per-device share fits in memory with accumulation 1",
            None,
        )]
    probe = limit.probe
    warnings = []
    if probe is not None and probe.mode != "train":
        warnings.append(PlanWarning(
            "probe-not-training", "probe again without --mode infer",
            f"{probe.describe()} measured {probe.mode}, which needs less memory than a training step", None,
        ))
    if probe is not None and probe.interrupted:
        warnings.append(PlanWarning(
            "probe-interrupted", "run the probe to the end",
            f"{probe.describe()} was interrupted, so its limits are what it had confirmed so far", None,
        ))
    return warnings


def _batchnorm_source(options: PlanOptions, probe: SavedProbe | None) -> str | None:
    if options.batchnorm is not None:
        return "--batchnorm" if options.batchnorm else None
    return f"found by the probe of {probe.model_file}" if probe is not None and probe.has_batchnorm else None


def _warmup_warnings(plan: Plan, options: PlanOptions) -> list[PlanWarning]:
    warmup, warnings = plan.warmup, []
    if warmup is None or warmup.steps is None:
        return warnings
    floor = adam_warmup_steps(options.beta2)
    if options.optimizer in ADAM_FAMILY and warmup.source == "given" and warmup.steps < floor:
        warnings.append(PlanWarning(
            "short-adam-warmup", f"warm up for at least {floor} steps",
            f"{warmup.steps} warmup steps is less than 2 / (1 - beta2) = {floor}, the time {options.optimizer}'s "
            "second-moment estimate needs to settle", MA_YARATS,
        ))
    total = None if plan.schedule is None else plan.schedule.total_steps
    if total is not None and warmup.steps > total:
        warnings.append(PlanWarning(
            "warmup-longer-than-training", "shorten the warmup or train for more epochs",
            f"the warmup of {warmup.steps} steps is longer than the {total} optimizer steps of the whole training", None,
        ))
    return warnings
