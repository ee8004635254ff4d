"""`bsplan estimate`: the largest batch for a device you do not have.

By default the step is traced (measure/trace.py): the probe's own search on fake tensors against
the target's budget, exact under the counted rules. Where a step cannot be traced, or with
--method run, two real training steps (the probe's TrialRunner) run on the CPU at batches 1, 2,
4, ... (x8 while the peak barely grows) with every tensor byte counted (backends/cpu.py, the host's
memory as the limit). The peak is affine in the batch only once one phase of the step dominates
(memory_line.fit_top), so the batches grow until the last two slopes agree and the per-sample part
of the peak has reached the fixed part, or until the next batch would pass the target's predicted
boundary; the line through the largest batches is extrapolated to the target
(planning/prediction.py), where a CUDA target adds its overheads (memory_line.cuda_overheads).
docs/estimate.md: method, overheads, accuracy.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

from bsplan.backends.cpu import CpuDevice
from bsplan.measure.oom import Failure, classify
from bsplan.measure.options import Progress
from bsplan.measure.sources import measure_static
from bsplan.measure.trace import trace
from bsplan.measure.trial import TrialRunner
from bsplan.measure.workload import load_workload
from bsplan.models.source import SourceLike
from bsplan.planning.choices import Method
from bsplan.planning.errors import BadInput, NoFit, first_line
from bsplan.planning.memory_line import MemoryLine, fit_top
from bsplan.planning.prediction import ESTIMATE_STEPS, EstimateOptions, Measurement, predict_for
from bsplan.planning.results import DEFAULT_MAX_BATCH, EstimateResult, PeakComposition, ProbeResult
from bsplan.planning.units import format_bytes

# Consecutive slopes within 2% count as one affine regime.
SLOPE_TOLERANCE = 0.02
# While doubling the batch grows the peak by less than 5% (the fixed part dominates), the next
# batch is 8 times the last, not 2: examples/mlp.py settles in 7 trials instead of 13.
FAST_GROWTH_BELOW = 0.05
# Soft time budget for the CPU trials: no new batch is started after it (a large model's step is
# slow on a CPU); the result then says how far the measurement went.
MEASURE_SECONDS = 60.0


def run_estimate(model_source: SourceLike, options: EstimateOptions, progress: Progress) -> EstimateResult:
    """Traced by default; by real CPU steps with --method run, or where the model cannot be traced."""
    measurement, traced, composition = measure_step(model_source, options, progress)
    return predict_measured(measurement, traced, options, composition)


def predict_measured(measurement: Measurement, traced: ProbeResult | None, options: EstimateOptions,
                     composition: PeakComposition | None = None) -> EstimateResult:
    """The estimate for the options' target from one measured step: the line's prediction, made exact
    by the traced search's answer where the step was traced (`bsplan routes` predicts each strategy so)."""
    result = predict_for(measurement, options)
    if traced is None:
        return result
    return _exact(result, measurement, traced, composition, options)


def measure_step(model_source: SourceLike, options: EstimateOptions, progress: Progress, compose: bool = True,
                 fallback_to_run: bool = True) -> tuple[Measurement, ProbeResult | None, PeakComposition | None]:
    """The step measured once for the options' target, which `bsplan routes` then predicts for under
    each strategy: traced (with the traced search, and its peak's composition unless compose=False),
    else real CPU steps (else, with fallback_to_run=False, TraceFailed)."""
    device, overheads = options.target()
    budget = device.total_bytes - overheads.total_bytes
    fallback: tuple[str, ...] = ()
    if options.method == Method.trace:
        try:
            return trace(model_source, options, budget, progress, compose)
        except (BadInput, NoFit):
            raise
        except Exception as error:  # noqa: BLE001 - an operator with no fake implementation, or the model's own error
            why = re.sub(r"\S*=?<[^<>]* at 0x[0-9a-f]+>", "", first_line(error)).strip()
            if not fallback_to_run:
                raise TraceFailed(why) from None
            fallback = (f"the step could not be traced ({why}): measured with real steps on the CPU instead (--method run)",)
            progress.note(fallback[0])
    measurement = measure(model_source, options.precision, options.mode, progress, budget)
    return replace(measurement, notes=fallback + measurement.notes), None, None


class TraceFailed(Exception):
    """A step that could not be traced, where real steps are not wanted instead: the reason, in one line."""


def _exact(result: EstimateResult, measurement: Measurement, traced: ProbeResult, composition: PeakComposition | None,
           options: EstimateOptions) -> EstimateResult:
    """Where the trace ran as the target runs (one device, or ddp / fsdp on a fake process group) the
    traced search's answer is exact under the counted budget, where the line only predicts it; under
    a strategy done as arithmetic (zero1/2/3) that answer moves as far as the strategy's states move
    the line's (_moved)."""
    if result.per_device is not None and result.per_device.layout.strategy != traced.strategy:
        return replace(_moved(result, measurement.line, traced, options.max_batch), method=Method.trace)
    most = traced.max_batch
    peak = None if traced.peak_bytes is None else traced.peak_bytes + result.overheads.cublas_workspace_bytes
    recommended = None if most is None or result.recommended_batch is None else min(result.recommended_batch, most)
    return replace(result, max_batch=most, recommended_batch=recommended, peak_bytes=peak, capped_at=traced.capped_at,
                   method=Method.trace, at_peak=composition)


def _moved(result: EstimateResult, measured: MemoryLine, traced: ProbeResult, cap: int) -> EstimateResult:
    """A strategy done as arithmetic on one whole replica's trace: the traced search's max_batch moved by
    as many samples as the strategy's states move the line's largest batch within the budget (as `plan
    --strategy` moves a probe's). Exact where the states are the only change, as at one device, where
    the line alone can miss a peak that does not grow with the batch (an optimizer step's). Where the
    search stopped at its cap, or no batch of a whole replica fitted, the line's prediction stands."""
    line = result.fit
    if traced.max_batch is None or traced.capped_at is not None or line.per_sample_bytes <= 0:
        return result
    budget = result.device.total_bytes - result.overheads.total_bytes
    most = min(cap, traced.max_batch + line.largest_within(budget) - measured.largest_within(budget))
    if most < 1:
        return replace(result, max_batch=None, recommended_batch=None, peak_bytes=None, capped_at=None)
    recommended = None if result.recommended_batch is None else min(result.recommended_batch, most)
    return replace(result, max_batch=most, recommended_batch=recommended, capped_at=cap if most == cap else None,
                   peak_bytes=round(line.peak(most) + result.overheads.cublas_workspace_bytes))


def measure(model_source: SourceLike, precision: str, mode: str, progress: Progress, budget_bytes: float) -> Measurement:
    """Train at batches 1, 2, 4, ... on the CPU until the line of peak over batch has settled
    (see the module's docstring); budget_bytes is what the target leaves for the step."""
    workload = load_workload(model_source)
    device = CpuDevice(None)  # the host's memory as the limit: an exhausted host ends the doubling
    notes: list[str] = []
    with device.tracking():
        try:
            model = workload.build_model()
        except Exception as error:
            if classify(error) is Failure.OTHER:
                raise
            raise NoFit(f"{workload.name} could not be measured with real steps here: building it ran out of this machine's "
                        f"memory ({format_bytes(device.info.total_bytes)}); trace it instead (--method trace)") from None
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
        static = measure_static(workload, model, runner, mode)
        breakdown = replace(static.breakdown(runner.trials), activation_bytes_per_sample=line.per_sample_bytes)
    return Measurement(static.model, breakdown, line, tuple(runner.trials), tuple(notes), workload.shard_policy() is not None)


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


