"""`bsplan routes`' measurement: the training step of each setting of the knobs (precision, activation
checkpointing, optimizer, LoRA) traced once on one replica against the budget, and each strategy's
per-device limit predicted from that one trace as `bsplan estimate --strategy S --gpus N` predicts it
(planning/prediction.py); and the step's FLOPs per sample, counted once for each setting of the knobs
that change them (checkpointing, LoRA). Ranking and cost are planning/routes.py's.
"""

from __future__ import annotations

from dataclasses import replace

from bsplan.measure.estimate import TraceFailed, measure_step, predict_measured
from bsplan.measure.flops import flops_per_sample
from bsplan.measure.options import Progress
from bsplan.models.source import ModelSource
from bsplan.planning.choices import Method, Strategy
from bsplan.planning.errors import BsplanError, first_line
from bsplan.planning.results import EstimateResult, Trial
from bsplan.planning.routes import STRATEGIES, TRACED_WRAPPERS, Knobs, Measured, RoutesOptions, RoutesResult, make_routes, matrix
from bsplan.planning.strategies import Layout


def run_routes(source: ModelSource, options: RoutesOptions, progress: Progress) -> RoutesResult:
    """Every route. The model's own setup is traced first: where it fails the model does, and that
    error is the command's; a later setting that fails (a model with no blocks to checkpoint, LoRA
    without peft) leaves its routes unmeasured, with the reason."""
    variants = matrix(options.lora is not None)
    measured: list[Measured] = []
    flops: dict[tuple[bool, bool], float | None] = {}  # per sample, by (checkpointing, LoRA): the rest do not change them
    for index, knobs in enumerate(variants, 1):
        progress.note(f"route {index}/{len(variants)}: {knobs.label()} ...")
        try:
            estimates = _estimates(_variant(source, knobs), knobs, options, progress)
        except BsplanError as error:
            if index == 1:
                raise
            progress.note(f"  not measured: {error}")
            measured.append((knobs, f"not measured: {error}", None))
            continue
        key = (knobs.activation_checkpointing, knobs.lora)
        if key not in flops:
            flops[key] = _flops(_variant(source, knobs), progress)
        measured.append((knobs, estimates, flops[key]))
    return make_routes(options, measured)


def _flops(source: ModelSource, progress: Progress) -> float | None:
    """FLOPs per sample, or None where the step cannot be counted (it could not be traced): its routes
    then have no step time, and compute is compared by the published ratios."""
    try:
        return flops_per_sample(source)
    except Exception as error:  # noqa: BLE001 - the memory measured stands without the count
        progress.note(f"  FLOPs not counted: {first_line(error)}")
        return None


def _variant(source: ModelSource, knobs: Knobs) -> ModelSource:
    return replace(source, gradient_checkpointing=knobs.activation_checkpointing, lora=source.lora if knobs.lora else None,
                   optimizer=None if knobs.optimizer == "own" else knobs.optimizer)


def _estimates(source: ModelSource, knobs: Knobs, options: RoutesOptions, progress: Progress) -> dict[Strategy, EstimateResult]:
    """One measurement of the step, and the prediction under each strategy at the world size from it;
    with --trace-wrappers, DDP and FSDP traced themselves on a fake process group of that size, as
    `bsplan estimate --strategy ddp|fsdp` traces them (a trace each more)."""
    estimate, world = replace(options.estimate, precision=knobs.precision), options.plan.world_size
    measurement, traced, _ = measure_step(source, estimate, _Quiet(), compose=False)
    if not measurement.traced:
        progress.note(f"  {measurement.notes[0]}")
    method = Method.trace if measurement.traced else Method.run
    results = {strategy: replace(predict_measured(measurement, traced, replace(estimate, layout=Layout(strategy, world))), method=method)
               for strategy in STRATEGIES}
    for strategy in TRACED_WRAPPERS if options.trace_wrappers and world > 1 and measurement.traced else ():
        wrapped = replace(estimate, layout=Layout(strategy, world))
        try:  # never real steps instead: a whole replica's CPU steps are what the trace is there to avoid
            on_group, traced, _ = measure_step(source, wrapped, _Quiet(), compose=False, fallback_to_run=False)
        except TraceFailed as error:
            why = f"the step could not be traced under {strategy} ({error}): its routes keep the arithmetic on one replica"
            progress.note(f"  {why}")
            results[strategy] = replace(results[strategy], notes=results[strategy].notes + (why,))
            continue
        results[strategy] = replace(predict_measured(on_group, traced, wrapped), method=Method.trace)
    return results


class _Quiet:
    """A trace's own progress, left out: the routes report one line per setting instead."""

    def started(self, batch: int) -> None:
        pass

    def finished(self, trial: Trial) -> None:
        pass

    def note(self, text: str) -> None:
        pass
