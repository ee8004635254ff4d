"""`bsplan estimate`: the largest batch for a device you do not have, from training steps on the CPU.

Two real training steps (forward, backward, optimizer step: the probe's TrialRunner) run on the CPU
at batches 1, 2, 4, ... (x8 while the peak barely grows) with every tensor byte counted
(cpumem.TensorBytesLimit, the host's memory as the limit). The peak is affine in the batch only
once one phase of the step dominates (memory.fit_top), so the batches grow until the last two
slopes agree and the per-sample part of the peak has reached the fixed part, or until the next
batch would pass the target's predicted boundary; the line through the two largest batches is
extrapolated to the target. A CUDA target
adds its overheads (memory.cuda_overheads). docs/estimate.md: method, overheads, accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bsplan.devices import CpuDevice
from bsplan.errors import BadInput
from bsplan.gpus import GpuModel, find_gpu
from bsplan.memory import DEFAULT_CUDA_CONTEXT_BYTES, MemoryLine, Overheads, cuda_overheads, fit_top, predict
from bsplan.probe import DEFAULT_MAX_BATCH, Progress, measure_breakdown
from bsplan.result import Breakdown, DeviceInfo, EstimateResult, ModelInfo, StatesEstimate, Trial
from bsplan.scaling import OPTIMIZERS
from bsplan.strategies import (
    PRECISIONS, SHARDED_PARAMETERS, SINGLE, STRATEGIES, ZERO_PAPER, Layout, ModelStates, gathered_bytes, per_device,
    per_device_line,
)
from bsplan.trial import TrialRunner
from bsplan.units import format_bytes, parse_size
from bsplan.workload import load_workload

# Two steps: the first allocates the optimizer state, the second runs with all of it live. Measured
# on the three examples: the same peak bytes as three steps, in two thirds of the time.
ESTIMATE_STEPS = 2
# Consecutive slopes within 2% count as one affine regime.
SLOPE_TOLERANCE = 0.02
# While doubling the batch grows the peak by less than 5% (the fixed part dominates), the next
# batch is 8 times the last, not 2: examples/mlp.py settles in 7 trials instead of 13.
FAST_GROWTH_BELOW = 0.05
# Soft time budget for the CPU trials: no new batch is started after it (a large model's step is
# slow on a CPU); the result then says how far the measurement went.
MEASURE_SECONDS = 60.0


@dataclass(frozen=True)
class EstimateOptions:
    gpu: GpuModel | None = None
    memory_bytes: int | None = None  # alone: a budget counted like `probe --memory-limit`; with gpu: its free memory
    precision: str = "fp32"
    mode: str = "train"
    headroom: float = 0.1
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    layout: Layout = SINGLE  # --strategy, --gpus, --bucket-view: the prediction is per device under it
    parameters: int | None = None  # --params: model states from a count alone, no model file
    optimizer: str = "adamw"  # with --params
    activation_bytes_per_sample: float | None = None  # with --params

    @classmethod
    def checked(
        cls, *, model_given: bool, gpu: str | None, memory: str | None, cuda_context: str | None, max_batch: int | None,
        strategy: str = "none", gpus: int = 1, bucket_view: bool = False, params: str | None = None,
        optimizer: str | None = None, activation_bytes_per_sample: str | None = None, **values: object,
    ) -> EstimateOptions:
        """Options from the command line, each bad one refused with one sentence."""
        _check_inputs(model_given, params, optimizer, activation_bytes_per_sample, values.get("precision"))
        if params is None and gpu is None and memory is None:
            raise BadInput("give --gpu NAME (bsplan gpus --catalog lists them) or --memory SIZE, the memory to plan for")
        options = cls(
            gpu=None if gpu is None else find_gpu(gpu),
            memory_bytes=None if memory is None else parse_size(memory),
            cuda_context_bytes=DEFAULT_CUDA_CONTEXT_BYTES if cuda_context is None else parse_size(cuda_context),
            max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch,
            layout=_layout(strategy, gpus, bucket_view),
            parameters=None if params is None else parse_count(params),
            optimizer=optimizer or "adamw",
            activation_bytes_per_sample=None if activation_bytes_per_sample is None else parse_size(activation_bytes_per_sample),
            **values,  # type: ignore[arg-type]
        )
        if cuda_context is not None and gpu is None:
            raise BadInput("--cuda-context applies to a --gpu: a --memory budget alone counts tensor bytes only")
        if not 0 <= options.headroom < 1:
            raise BadInput("--headroom must be a fraction from 0 up to (not including) 1, e.g. 0.1")
        if options.max_batch < 1:
            raise BadInput("--max-batch must be at least 1")
        return options

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


def _check_inputs(
    model_given: bool, params: str | None, optimizer: str | None, activations: str | None, precision: object
) -> None:
    """A model file and a parameter count are two ways in, each with its own options."""
    if model_given == (params is not None):
        raise BadInput("give a model file (its states and activations measured on the CPU) or --params COUNT "
                       "(model states from a parameter count alone), one of the two")
    if model_given and (optimizer is not None or activations is not None):
        raise BadInput("--optimizer and --activation-bytes-per-sample go with --params: a model file's are measured")
    if model_given and precision == "mixed":
        raise BadInput("--precision mixed (half-precision weights with fp32 master copies) goes with --params: "
                       "a model file runs as it is, under autocast with bf16 or fp16")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise BadInput(f"unknown --optimizer {optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
    if precision not in PRECISIONS:
        raise BadInput(f"unknown --precision {precision!r}: choose from {', '.join(PRECISIONS)}")


def _layout(strategy: str, gpus: int, bucket_view: bool) -> Layout:
    if strategy not in STRATEGIES:
        raise BadInput(f"unknown --strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
    if gpus < 1:
        raise BadInput(f"--gpus must be at least 1, not {gpus}")
    if strategy == "none" and gpus != 1:
        raise BadInput("--gpus counts the devices a --strategy spreads the model states over: "
                       "give --strategy ddp, zero1, zero2, zero3 or fsdp")
    if bucket_view and strategy != "ddp":
        raise BadInput("--bucket-view is DDP's gradient_as_bucket_view: it goes with --strategy ddp")
    return Layout(strategy, gpus, bucket_view)


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


def run_estimate(model_file: Path, options: EstimateOptions, progress: Progress) -> EstimateResult:
    device, overheads = options.target()
    measurement = measure(model_file, options.precision, options.mode, progress, device.total_bytes - overheads.total_bytes)
    return predict_for(measurement, options)


def measure(model_file: Path, precision: str, mode: str, progress: Progress, budget_bytes: float) -> Measurement:
    """Train at batches 1, 2, 4, ... on the CPU until the line of peak over batch has settled
    (see the module's docstring); budget_bytes is what the target leaves for the step."""
    workload = load_workload(model_file)
    device = CpuDevice(None)  # the host's memory as the limit: an exhausted host ends the doubling
    notes: list[str] = []
    with device.tracking():
        model = workload.build_model()
        model.train(mode == "train")
        runner = TrialRunner(workload, model, device, steps=ESTIMATE_STEPS, precision=precision, mode=mode)
        points: list[tuple[int, int]] = []
        start, batch = time.perf_counter(), 1
        while True:
            progress.started(batch)
            trial = runner(batch)
            progress.finished(trial)
            if not trial.fits:
                notes.append(f"batch {batch} did not fit in this machine's memory ({format_bytes(device.info.total_bytes)}): "
                             "the fit uses the batches below it")
                break
            points.append((batch, trial.peak_bytes))  # type: ignore[arg-type]
            following = batch * _growth_factor(points)
            if _settled(points) or _past_target(points, following, budget_bytes) or following > DEFAULT_MAX_BATCH:
                break
            if time.perf_counter() - start > MEASURE_SECONDS:
                notes.append(f"stopped measuring after {MEASURE_SECONDS:.0f} s at batch {batch}: if the per-sample bytes "
                             "still grew there, max_batch is too high")
                break
            batch = following
        line = fit_top(points)
        if line is None:
            raise BadInput(f"{workload.name} could not be measured here: {len(points)} batch(es) fitted in this machine's "
                           "memory, and a per-sample slope needs two (run bsplan probe on the device instead)")
        breakdown = replace(measure_breakdown(workload, model, runner, mode), activation_bytes_per_sample=line.per_sample_bytes,
                            gathered_bytes=gathered_bytes(model))
        has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    info = ModelInfo(workload.name, sum(p.numel() for p in model.parameters()), has_batchnorm)
    return Measurement(info, breakdown, line, tuple(runner.trials), tuple(notes), workload.shard_policy() is not None)


def _growth_factor(points: list[tuple[int, int]]) -> int:
    if len(points) >= 2 and points[-1][1] < (1 + FAST_GROWTH_BELOW) * points[-2][1]:
        return 8
    return 2


def _settled(points: list[tuple[int, int]]) -> bool:
    """The last two slopes agree, and the per-sample part of the last peak is at least its fixed
    part (so a later phase of the step, growing faster, is not still hidden under the first)."""
    if len(points) < 3:
        return False
    (b0, p0), (b1, p1), (b2, p2) = points[-3:]
    before, last = (p1 - p0) / (b1 - b0), (p2 - p1) / (b2 - b1)
    return last > 0 and abs(last - before) <= SLOPE_TOLERANCE * last and last * b2 >= p2 - last * b2


def _past_target(points: list[tuple[int, int]], next_batch: int, budget_bytes: float) -> bool:
    """The next batch would pass the boundary the last two points predict for the target."""
    if len(points) < 2:
        return False
    (b0, p0), (b1, p1) = points[-2:]
    slope = (p1 - p0) / (b1 - b0)
    return slope > 0 and p1 + slope * (next_batch - b1) > budget_bytes


def predict_for(measurement: Measurement, options: EstimateOptions) -> EstimateResult:
    """The prediction for the options' target from one measurement (arithmetic, no more trials), per
    device under the options' layout: the measured line's fixed part moved by the strategy's states."""
    device, overheads = options.target()
    layout, measured = options.layout, measurement.line
    states = _model_states(measurement.breakdown)
    line = per_device_line(measured, states, layout)
    prediction = predict(line, device.total_bytes, overheads, options.headroom, options.max_batch)
    notes = list(measurement.notes)
    largest = max(t.batch for t in measurement.trials if t.fits)
    notes.append(f"predicted from CPU training steps at batches up to {largest}: {format_bytes(measured.base_bytes)} "
                 f"+ {format_bytes(measured.per_sample_bytes)} per sample")
    if layout != SINGLE:
        notes.append(f"under {layout.describe()} the fixed part is {format_bytes(line.base_bytes)} per device (docs/strategies.md)")
    notes.extend(_strategy_notes(layout))
    if measurement.own_units and layout.strategy in SHARDED_PARAMETERS:
        notes.append("the model file's shard_model(model) chooses its own FSDP units: the gathered units are counted as "
                     "bsplan wraps them by default (each module that holds parameters directly)")
    if prediction.max_batch is None:
        notes.append(f"{_no_fit(line, overheads, device)}. Try --precision bf16 or sharding the model state (FSDP / ZeRO).")
    if device.type == "cuda":
        notes.append("measured on the CPU: CUDA kernels (cuDNN workspaces, fused attention) can peak differently, and "
                     "allocator fragmentation is not modelled; the recommended batch keeps headroom for both")
    return EstimateResult(
        model=measurement.model, device=device, mode=options.mode, precision=options.precision, steps=ESTIMATE_STEPS,
        headroom=options.headroom, max_batch=prediction.max_batch, recommended_batch=prediction.recommended_batch,
        peak_bytes=prediction.peak_bytes, breakdown=measurement.breakdown, fit=line, overheads=overheads,
        gpu=options.gpu, trials=measurement.trials, capped_at=options.max_batch if prediction.capped else None,
        notes=tuple(notes), per_device=per_device(states, layout),
    )


def _no_fit(line: MemoryLine, overheads: Overheads, device: DeviceInfo) -> str:
    return f"no batch fits: batch 1 needs {format_bytes(line.peak(1) + overheads.total_bytes)} of the {format_bytes(device.total_bytes)}"


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
