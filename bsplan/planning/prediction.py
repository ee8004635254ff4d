"""`bsplan estimate`'s arithmetic: its options, and the prediction for a device from a measured
memory line (measure/estimate.py measures it on the CPU) or from a parameter count alone. No torch:
`bsplan estimate --params` runs no model.
"""

from __future__ import annotations

from dataclasses import dataclass

from bsplan.planning import checks
from bsplan.planning.catalog import GpuModel, find_gpu
from bsplan.planning.choices import Method, Mode, Optimizer, Precision, Strategy
from bsplan.planning.errors import BadInput
from bsplan.planning.memory_line import DEFAULT_CUDA_CONTEXT_BYTES, MemoryLine, Overheads, cuda_overheads, predict
from bsplan.planning.results import DEFAULT_MAX_BATCH, Breakdown, DeviceInfo, EstimateResult, ModelInfo, StatesEstimate, Trial
from bsplan.planning.strategies import (
    SHARDED_PARAMETERS, SINGLE, ZERO_PAPER, DeviceStates, Layout, ModelStates, per_device, per_device_line,
)
from bsplan.planning.units import format_bytes, parse_size

# Two steps: the first allocates the optimizer state, the second runs with all of it live. Measured
# on the three examples: the same peak bytes as three steps, in two thirds of the time.
ESTIMATE_STEPS = 2


@dataclass(frozen=True)
class EstimateOptions:
    gpu: GpuModel | None = None
    memory_bytes: int | None = None  # alone: a budget counted like `probe --memory-limit`; with gpu: its free memory
    precision: Precision = Precision.fp32
    mode: Mode = Mode.train
    headroom: float = 0.1
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    layout: Layout = SINGLE  # --strategy, --gpus, --bucket-view: the prediction is per device under it
    parameters: int | None = None  # --params: model states from a count alone, no model file
    optimizer: Optimizer = Optimizer.adamw  # with --params
    activation_bytes_per_sample: float | None = None  # with --params
    method: Method = Method.trace  # how a model file's step is measured

    def __post_init__(self) -> None:
        """Each choice made a member and each bad value refused with one sentence."""
        for name, kind, option in (("precision", Precision, "--precision"), ("mode", Mode, "--mode"),
                                   ("optimizer", Optimizer, "--optimizer"), ("method", Method, "--method")):
            object.__setattr__(self, name, kind.parse(getattr(self, name), option))
        checks.headroom(self.headroom)
        checks.at_least("--max-batch", self.max_batch)

    @classmethod
    def from_cli(
        cls, *, model_given: bool, gpu: str | None, memory: str | None, cuda_context: str | None, max_batch: int | None,
        strategy: str = "none", gpus: int = 1, bucket_view: bool = False, params: str | None = None,
        optimizer: str | None = None, activation_bytes_per_sample: str | None = None, **values: object,
    ) -> EstimateOptions:
        """Options from the command line, each bad one refused with one sentence."""
        _check_inputs(model_given, params, optimizer, activation_bytes_per_sample)
        if params is None and gpu is None and memory is None:
            raise BadInput("give --gpu NAME (bsplan gpus --catalog lists them) or --memory SIZE, the memory to plan for")
        if cuda_context is not None and gpu is None:
            raise BadInput("--cuda-context applies to a --gpu: a --memory budget alone counts tensor bytes only")
        return cls(
            gpu=None if gpu is None else find_gpu(gpu),
            memory_bytes=None if memory is None else parse_size(memory),
            cuda_context_bytes=DEFAULT_CUDA_CONTEXT_BYTES if cuda_context is None else parse_size(cuda_context),
            max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch,
            layout=_layout(strategy, gpus, bucket_view),
            parameters=None if params is None else parse_count(params),
            optimizer=optimizer or Optimizer.adamw,
            activation_bytes_per_sample=None if activation_bytes_per_sample is None else parse_size(activation_bytes_per_sample),
            **values,  # type: ignore[arg-type]
        )

    def target(self) -> tuple[DeviceInfo, Overheads]:
        """The device predicted for and what CUDA adds on it (nothing for a plain memory budget)."""
        if self.gpu is None:
            assert self.memory_bytes is not None
            name = f"{format_bytes(self.memory_bytes)} memory budget"
            return DeviceInfo(name, "cpu", self.memory_bytes, "--memory", exact=True), Overheads()
        total, source = self.gpu.memory_bytes, "catalogue"
        if self.memory_bytes is not None:
            total, source = self.memory_bytes, "--memory"
        overheads = cuda_overheads(self.gpu.compute_capability, train=self.mode == "train", context_bytes=self.cuda_context_bytes)
        return DeviceInfo(f"{self.gpu.key} ({self.gpu.name})", "cuda", total, source, exact=False), overheads


def _check_inputs(model_given: bool, params: str | None, optimizer: str | None, activations: str | None) -> None:
    """A model file and a parameter count are two ways in, each with its own options."""
    if model_given == (params is not None):
        raise BadInput("give a model file (its states and activations measured on the CPU) or --params COUNT "
                       "(model states from a parameter count alone), one of the two")
    if model_given and (optimizer is not None or activations is not None):
        raise BadInput("--optimizer and --activation-bytes-per-sample go with --params: a model file's are measured")


def _layout(strategy: str, gpus: int, bucket_view: bool) -> Layout:
    layout = Layout(strategy, gpus, bucket_view)
    checks.at_least("--gpus", gpus)
    if layout.strategy == Strategy.none and gpus != 1:
        raise BadInput("--gpus counts the devices a --strategy spreads the model states over: "
                       "give --strategy ddp, zero1, zero2, zero3 or fsdp")
    checks.bucket_view(bucket_view, layout.strategy)
    return layout


_COUNT_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_count(text: str) -> int:
    """A parameter count: 7.5e9, 7500000000, or with a suffix, 7.5B, 350M."""
    number, scale = text.strip(), 1.0
    if number[-1:].lower() in _COUNT_SUFFIXES:
        number, scale = number[:-1], _COUNT_SUFFIXES[number[-1].lower()]
    try:
        count = round(float(number) * scale)
    except (ValueError, OverflowError):
        raise BadInput(f"cannot read {text!r} as a parameter count (e.g. 7.5e9 or 7.5B)") from None
    if count < 1:
        raise BadInput(f"--params must be at least 1, not {text}")
    return count


@dataclass(frozen=True)
class Measurement:
    """What the CPU trials measured: the model, its static memory, and the line of peak over batch."""

    model: ModelInfo
    breakdown: Breakdown
    line: MemoryLine
    trials: tuple[Trial, ...]
    notes: tuple[str, ...]
    own_units: bool = False  # the model file shards itself (shard_model): its FSDP units are not bsplan's
    traced: bool = False  # the steps were traced with fake tensors (measure/trace.py), not run
    layout: Layout = SINGLE  # what the trials ran under: one whole replica, or a traced strategy's one device


def predict_for(measurement: Measurement, options: EstimateOptions) -> EstimateResult:
    """The prediction for the options' target from one measurement (arithmetic, no more trials), per
    device under the options' layout: the measured line's fixed part moved by the strategy's states."""
    device, overheads = options.target()
    layout, measured = options.layout, measurement.line
    states = _model_states(measurement.breakdown)
    on_device = measurement.layout == layout != SINGLE  # traced under the strategy: the line is one device's already
    line = measured if on_device else per_device_line(measured, states, layout)
    prediction = predict(line, device.total_bytes, overheads, options.headroom, options.max_batch)
    notes = list(measurement.notes)
    largest = max(t.batch for t in measurement.trials if t.fits)
    steps = "traced training steps" if measurement.traced else "CPU training steps"
    notes.append(f"predicted from {steps} at batches up to {largest}: {format_bytes(measured.base_bytes)} "
                 f"+ {format_bytes(measured.per_sample_bytes)} per sample")
    if layout != SINGLE:
        notes.append(f"under {layout.describe()} the fixed part is {format_bytes(line.base_bytes)} per device (docs/strategies.md)")
    notes.extend(_strategy_notes(layout))
    if on_device:
        notes.append(f"{layout.strategy} traced on a fake process group of {layout.world_size} ranks: the trials are one "
                     "device's, its states and the strategy's own allocations included")
    elif layout != SINGLE and measurement.traced:
        notes.append(f"{layout.strategy} is arithmetic on the traced states of one whole replica (docs/strategies.md): its "
                     "collectives, their buffers and its own allocations were not traced")
    if measurement.own_units and layout.strategy in SHARDED_PARAMETERS:
        notes.append("the model file's shard_model(model) chooses its own FSDP units: the gathered units are counted as "
                     "bsplan wraps them by default (the model's repeated blocks, docs/strategies.md)")
    if prediction.max_batch is None:
        notes.append(f"{_no_fit(line, overheads, device)}; {_sharding_that_fits(measured, states, device, overheads)}")
    if device.type == "cuda":
        notes.append("measured on the CPU: CUDA kernels (cuDNN workspaces, fused attention) can peak differently, and "
                     "allocator fragmentation is not modelled; the recommended batch keeps headroom for both")
    return EstimateResult(
        model=measurement.model, device=device, mode=options.mode, precision=options.precision, steps=ESTIMATE_STEPS,
        headroom=options.headroom, max_batch=prediction.max_batch, recommended_batch=prediction.recommended_batch,
        peak_bytes=prediction.peak_bytes, breakdown=measurement.breakdown, fit=line, overheads=overheads,
        gpu=options.gpu, trials=measurement.trials, capped_at=options.max_batch if prediction.capped else None,
        notes=tuple(notes), per_device=_as_measured(measurement.breakdown, layout) if on_device else per_device(states, layout),
    )


def _no_fit(line: MemoryLine, overheads: Overheads, device: DeviceInfo) -> str:
    return f"no batch fits: batch 1 needs {format_bytes(line.peak(1) + overheads.total_bytes)} of the {format_bytes(device.total_bytes)}"


# The world sizes tried for a strategy under which batch 1 would fit per device.
WORLD_SIZES = tuple(2**k for k in range(1, 11))


def _sharding_that_fits(measured: MemoryLine, states: ModelStates, device: DeviceInfo, overheads: Overheads) -> str:
    """Where batch 1 would fit: the fewest devices of each sharding strategy, from the measured line
    moved by the strategy's states (per_device_line), as an estimate under zero1/2/3 predicts. An
    upper bound for fsdp, whose units this arithmetic counts as all gathered at once."""
    found = []
    for strategy in (Strategy.zero1, Strategy.zero2, Strategy.fsdp):
        world = next((n for n in WORLD_SIZES
                      if per_device_line(measured, states, Layout(strategy, n)).peak(1) + overheads.total_bytes <= device.total_bytes), None)
        if world is not None:
            found.append(f"{strategy} on {world} devices")
    if not found:
        return (f"not even fsdp on {WORLD_SIZES[-1]} devices would hold batch 1: try --precision bf16, activation "
                "checkpointing or a smaller model")
    return (f"by the strategies' arithmetic on this one replica, batch 1 would fit per device under {', '.join(found)} "
            "(estimate again with --strategy and --gpus: ddp and fsdp are then traced, and may fit on fewer)")


def _as_measured(breakdown: Breakdown, layout: Layout) -> DeviceStates:
    """The states one device held where the strategy itself was traced: its shards and buckets."""
    return DeviceStates(layout, breakdown.parameter_bytes, breakdown.gradient_bytes, breakdown.optimizer_state_bytes,
                        breakdown.bucket_bytes, breakdown.gathered_bytes)


def _model_states(breakdown: Breakdown) -> ModelStates:
    """One process's measured states; DDP's buckets would hold one more copy of its gradients."""
    return ModelStates(breakdown.parameter_bytes, breakdown.gradient_bytes, breakdown.optimizer_state_bytes,
                       bucket_bytes=breakdown.gradient_bytes, gathered_bytes=breakdown.gathered_bytes)


def _strategy_notes(layout: Layout) -> list[str]:
    if not layout.strategy.startswith("zero"):
        return []
    return ["ZeRO as DeepSpeed runs it also keeps communication buffers (reduce_bucket_size, allgather_bucket_size, and "
            "stage 3's prefetch and live-parameter limits), which depend on its config and are not counted"]


def estimate_states(options: EstimateOptions) -> StatesEstimate:
    """Model states per device from a parameter count alone: arithmetic, no model and no trials."""
    assert options.parameters is not None
    layout, per_sample = options.layout, options.activation_bytes_per_sample
    states = per_device(ModelStates.count(options.parameters, options.optimizer, options.precision), layout)
    notes = []
    if per_sample is None:
        notes.append("model states only, without activations: give --activation-bytes-per-sample (a probe's or an "
                     "estimate's activation_bytes_per_sample) and a --gpu or --memory for a largest batch")
    if layout.strategy in SHARDED_PARAMETERS:
        notes.append(f"without the units {layout.strategy} gathers whole during forward and backward, which a parameter "
                     f"count cannot know: `bsplan estimate MODEL.py --strategy {layout.strategy}` counts them")
    if layout.strategy == "ddp" and not layout.bucket_view:
        notes.append(f"ddp counts DDP's gradient buckets, a second copy of the gradients; the data-parallel baseline of "
                     f"{ZERO_PAPER}, Figure 1, leaves them out, as --bucket-view does")
    notes.extend(_strategy_notes(layout))
    device, overheads, prediction = None, Overheads(), None
    if options.gpu is not None or options.memory_bytes is not None:
        device, overheads = options.target()
        if per_sample is not None:
            line = MemoryLine(states.static_bytes, per_sample)
            prediction = predict(line, device.total_bytes, overheads, options.headroom, options.max_batch)
            if prediction.max_batch is None:
                notes.append(_no_fit(line, overheads, device))
    return StatesEstimate(
        parameters=options.parameters, optimizer=options.optimizer, precision=options.precision, per_device=states,
        activation_bytes_per_sample=per_sample, device=device, overheads=overheads, headroom=options.headroom,
        max_batch=None if prediction is None else prediction.max_batch,
        recommended_batch=None if prediction is None else prediction.recommended_batch,
        peak_bytes=None if prediction is None else prediction.peak_bytes, notes=tuple(notes),
    )
