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
from bsplan.result import Breakdown, DeviceInfo, EstimateResult, ModelInfo, Trial
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

    @classmethod
    def checked(
        cls, *, gpu: str | None, memory: str | None, cuda_context: str | None, max_batch: int | None, **values: object
    ) -> EstimateOptions:
        """Options from the command line, each bad one refused with one sentence."""
        if gpu is None and memory is None:
            raise BadInput("give --gpu NAME (bsplan gpus --catalog lists them) or --memory SIZE, the memory to plan for")
        options = cls(
            gpu=None if gpu is None else find_gpu(gpu),
            memory_bytes=None if memory is None else parse_size(memory),
            cuda_context_bytes=DEFAULT_CUDA_CONTEXT_BYTES if cuda_context is None else parse_size(cuda_context),
            max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch,
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


@dataclass(frozen=True)
class Measurement:
    """What the CPU trials measured: the model, its static memory, and the line of peak over batch."""

    model: ModelInfo
    breakdown: Breakdown
    line: MemoryLine
    trials: tuple[Trial, ...]
    notes: tuple[str, ...]


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
        breakdown = replace(measure_breakdown(model, runner, mode), activation_bytes_per_sample=line.per_sample_bytes)
        has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    info = ModelInfo(workload.name, sum(p.numel() for p in model.parameters()), has_batchnorm)
    return Measurement(info, breakdown, line, tuple(runner.trials), tuple(notes))


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
    """The prediction for the options' target from one measurement (arithmetic, no more trials)."""
    device, overheads = options.target()
    line = measurement.line
    prediction = predict(line, device.total_bytes, overheads, options.headroom, options.max_batch)
    notes = list(measurement.notes)
    largest = max(t.batch for t in measurement.trials if t.fits)
    notes.append(f"predicted from CPU training steps at batches up to {largest}: {format_bytes(line.base_bytes)} "
                 f"+ {format_bytes(line.per_sample_bytes)} per sample")
    if prediction.max_batch is None:
        notes.append(f"no batch fits: batch 1 needs {format_bytes(line.peak(1) + overheads.total_bytes)} "
                     f"of the {format_bytes(device.total_bytes)}. Try --precision bf16 or sharding the model state (FSDP / ZeRO).")
    if device.type == "cuda":
        notes.append("measured on the CPU: CUDA kernels (cuDNN workspaces, fused attention) can peak differently, and "
                     "allocator fragmentation is not modelled; the recommended batch keeps headroom for both")
    return EstimateResult(
        model=measurement.model, device=device, mode=options.mode, precision=options.precision, steps=ESTIMATE_STEPS,
        headroom=options.headroom, max_batch=prediction.max_batch, recommended_batch=prediction.recommended_batch,
        peak_bytes=prediction.peak_bytes, breakdown=measurement.breakdown, fit=line, overheads=overheads,
        gpu=options.gpu, trials=measurement.trials, capped_at=options.max_batch if prediction.capped else None,
        notes=tuple(notes),
    )
