"""The trace engine: a model's training steps on a FakeDevice (backends/fake.py), where tensors have
shapes and no storage, counted byte for byte as the counted CPU limit counts real ones. The probe's
own search runs on it, so `bsplan estimate --memory SIZE` finds the batch `bsplan probe
--memory-limit SIZE` finds, exactly, without the memory or the compute of the steps.

A model whose operators have no fake implementation (or that mixes fake and real tensors itself)
cannot be traced; the estimate then runs real steps instead and says so (measure/estimate.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator

from bsplan.backends.fake import FakeDevice
from bsplan.measure.attribution import compose_peak
from bsplan.measure.options import ProbeOptions, Progress
from bsplan.measure.probe import run_probe
from bsplan.models.source import SourceLike
from bsplan.planning.choices import ProbeStrategy, RunPrecision
from bsplan.planning.errors import BadInput, first_line
from bsplan.planning.memory_line import fit_top
from bsplan.planning.prediction import ESTIMATE_STEPS, EstimateOptions, Measurement
from bsplan.planning.results import PeakComposition, ProbeResult, Trial
from bsplan.planning.strategies import SINGLE, Layout
from bsplan.planning.units import format_bytes


def trace(model_source: SourceLike, options: EstimateOptions, budget_bytes: int, progress: Progress,
          compose: bool = True) -> tuple[Measurement, ProbeResult, PeakComposition | None]:
    """The probe's search traced against a budget: its exact answer, the measurement (the model, its
    breakdown, the line through the traced trials) that the prediction rests on, and what the
    tensors at the peak of its answer are (measure/attribution.py). Where fewer than two batches fit
    the budget (the model states of one whole replica alone fill it, as a large model's do on one
    GPU) the line is traced without a budget at batches 1 and LINE_BATCH: what a strategy's states
    per device, and how many devices would hold them, are computed from (planning/prediction.py).
    Under --strategy ddp or fsdp the real wrapper is traced on a fake process group of --gpus ranks
    in this process, so the trials are one device's, exactly as `probe --nproc N` measures a rank.
    compose=False skips the composition (`bsplan routes` shows none, and saves a trace per setting)."""
    layout = options.layout
    traced_layout = layout if layout.strategy in ProbeStrategy.values() else SINGLE
    probe_options = ProbeOptions(
        device="cpu", memory_limit=budget_bytes, precision=RunPrecision.parse(options.precision, "--precision"),
        mode=options.mode, steps=ESTIMATE_STEPS, max_batch=options.max_batch, headroom=options.headroom,
        strategy=traced_layout.strategy, nproc=traced_layout.world_size, bucket_view=traced_layout.bucket_view,
    )
    with _fake_group(traced_layout.world_size):
        return _trace(model_source, probe_options, budget_bytes, progress, traced_layout, compose)


@contextlib.contextmanager
def _fake_group(world_size: int) -> Iterator[None]:
    """A process group of `world_size` ranks in this process that moves nothing (torch's "fake"
    backend, as PyTorch's own tests of FSDP's memory use it): this process is rank 0."""
    if world_size == 1:
        yield
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _trace(model_source: SourceLike, probe_options: ProbeOptions, budget_bytes: int, progress: Progress,
           layout: Layout, compose: bool) -> tuple[Measurement, ProbeResult, PeakComposition | None]:
    result = run_probe(model_source, probe_options, _Untimed(progress), backend=FakeDevice(budget_bytes, f"{model_source} traced"))
    if result.interrupted:  # Ctrl-C while tracing: no answer, and none to report as one
        raise KeyboardInterrupt
    trials = tuple(_untimed(trial) for trial in result.trials)
    notes = (f"traced with fake tensors: the probe's search found max_batch {result.max_batch} under the counted budget "
             f"of {budget_bytes} bytes",)
    line = fit_top([trial.point for trial in trials if trial.point is not None])
    breakdown = result.breakdown
    if line is None:
        progress.note(f"fewer than two batches fit whole in {format_bytes(budget_bytes)}: tracing batches 1 and {LINE_BATCH} "
                      "without a budget for the line of peak over batch")
        unbounded = replace(probe_options, memory_limit=UNBOUNDED, max_batch=LINE_BATCH)
        free = run_probe(model_source, unbounded, _Untimed(progress), backend=FakeDevice(UNBOUNDED, f"{model_source} traced"))
        line_trials = tuple(_untimed(trial) for trial in free.trials)
        line = fit_top([trial.point for trial in line_trials if trial.point is not None])
        if line is None:
            raise BadInput(f"{model_source} traced no line of peak over batch: batches 1 and {LINE_BATCH} did not both fit")
        trials, breakdown = trials + line_trials, free.breakdown
        notes += (f"batches 1 and {LINE_BATCH} traced without a budget: the line of peak over batch",)
    breakdown = replace(breakdown, activation_bytes_per_sample=line.per_sample_bytes)
    composition = None
    if compose and result.max_batch is not None and layout == SINGLE:
        progress.note(f"tracing batch {result.max_batch} once more to see what the tensors at its peak are")
        try:
            composition = compose_peak(model_source, probe_options, result.max_batch, budget_bytes)
        except Exception as error:  # noqa: BLE001 - the answer stands without its composition
            notes += (f"what the tensors at the peak are could not be traced ({first_line(error)})",)
    return Measurement(result.model, breakdown, line, trials, notes, traced=True, layout=layout), result, composition


# Where the budget holds fewer than two batches, the line is traced at batch 1 and this one, with no
# budget (fake tensors take no memory): far enough apart for the slope, a trace's cost is the same.
LINE_BATCH = 8
UNBOUNDED = 1 << 62


def _untimed(trial: Trial) -> Trial:
    """A traced trial takes no real time: it has no throughput."""
    return replace(trial, samples_per_second=None)


class _Untimed:
    """The progress of traced trials, shown without a throughput."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def started(self, batch: int) -> None:
        self.progress.started(batch)

    def finished(self, trial: Trial) -> None:
        self.progress.finished(_untimed(trial))

    def note(self, text: str) -> None:
        self.progress.note(text)
