"""`bsplan probe`: load the model, choose where the trials run, run the search, assemble the result."""

from __future__ import annotations

import contextlib
import pickle
import signal
import threading
from dataclasses import replace
from typing import Any, Callable, Iterator

from bsplan.backends.device import Device
from bsplan.backends.fake import FakeDevice
from bsplan.backends.host import ADDRESS_SPACE_LIMITS, CGROUP_LIMITS
from bsplan.measure.options import ProbeOptions, Progress
from bsplan.measure.rank import wrap
from bsplan.measure.search import SearchOutcome, find_max_batch
from bsplan.measure.sources import LocalTrials, RebuiltAfterFailure, Static, TrialSource
from bsplan.measure.workload import load_workload
from bsplan.measure.world import World
from bsplan.models.source import SourceLike
from bsplan.planning.errors import BadInput, first_line
from bsplan.planning.memory_line import fit_top, round_recommended
from bsplan.planning.results import SAME_THROUGHPUT, Breakdown, DeviceInfo, ProbeResult, Trial
from bsplan.planning.units import format_bytes

# Under a limit from outside the process the same batch fits in one fresh process and not in the
# next, and its peak moves by as much (docs/probe.md: examples/cnn.py under RLIMIT_DATA fitted 36
# in every fresh process and up to 42 in some; the data the limit counts moved by ~7% at one batch):
# the search settles within 5%.
BAND_TOLERANCE = 0.05
# ...and the heap under such a limit keeps growing over a training process's first steps: plain
# training of examples/transformer.py fitted batch 8 in 3 of 3 processes with 3 steps, in 0 of 3
# with 5 (docs/probe.md). Trials there run at least 5 steps.
BAND_STEPS = 5


def run_probe(model_source: SourceLike, options: ProbeOptions, progress: Progress, backend: Device | None = None) -> ProbeResult:
    """Find the largest batch that fits (on `backend`, where given: a traced device). Ctrl-C returns
    what was measured so far (interrupted)."""
    workload = load_workload(model_source)
    source: TrialSource
    aim = None
    if backend is not None and options.strategy != "none":
        # A traced strategy (measure/trace.py): the fake model wrapped here, on a fake process group.
        def traced_rank() -> LocalTrials:
            return LocalTrials(workload, options, wrap=lambda model, device: wrap(model, device, workload, options, traced=True),
                               backend=backend)

        source = RebuiltAfterFailure(traced_rank)
    elif options.strategy == "none":
        local = LocalTrials(workload, options, backend=backend)
        why = why_restart(local.device_backend.outside_limit)
        if why and not _sendable(model_source):
            why = None
            progress.note("the model's functions are local functions or lambdas, which a fresh process cannot receive: "
                          "the trials run in this process, where a failed trial's address space stays held, so the "
                          "answer may fall below what a fresh training process fits")
        if why:
            options = replace(options, steps=max(options.steps, BAND_STEPS))
        elif backend is None and options.search == "predict":
            aim = traced_answer(model_source, options, local.device.total_bytes, progress)
        source = World(model_source, options, why) if why else local
    else:
        if not _sendable(model_source):
            raise BadInput(f"--nproc {options.nproc} runs the trials in other processes, which cannot receive local functions "
                           "or lambdas: give functions defined at a module's top level")
        source = World(model_source, options)
    with source:
        for note in source.notes:
            progress.note(note)

        def run(batch: int) -> Trial:
            progress.started(batch)
            trial = source(batch)
            progress.finished(trial)
            if interrupts:  # a Ctrl-C that was lost where it was raised
                raise KeyboardInterrupt
            return trial

        interrupted = False
        try:
            with _latched_interrupts() as interrupts:
                outcome = _search(run, options, source.device, source.trials, aim)
        except KeyboardInterrupt:
            interrupted = True
            progress.note("interrupted: reporting the trials measured so far")
            outcome = _outcome_of(source.trials)
        static = source.static()
    return _result(source, static, options, outcome, interrupted)


@contextlib.contextmanager
def _latched_interrupts() -> Iterator[list[int]]:
    """Ctrl-C that cannot be lost. Python raises KeyboardInterrupt wherever the interpreter is, and
    in a weakref callback (the counted CPU limit uncounts each freed tensor in one, thousands a step)
    an exception is printed and dropped: the probe ran on to the end. The latch remembers it for the
    search to stop after the trial. Where Ctrl-C is ignored (a background job) it stays ignored."""
    interrupts: list[int] = []

    def interrupt(signum: int, _frame: Any) -> None:
        interrupts.append(signum)
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield interrupts
        return
    signal.signal(signal.SIGINT, interrupt)
    try:
        yield interrupts
    finally:
        signal.signal(signal.SIGINT, previous)


def why_restart(outside_limit: str | None) -> str | None:
    """Why the trials must run in a child process restarted after each failed trial, under the limit
    from outside the process that sets the edge; None where one process serves."""
    if outside_limit in ADDRESS_SPACE_LIMITS:  # measured in docs/probe.md
        return (f"a limit on address space from outside the process ({outside_limit}) sets the edge, and a failed "
                "trial leaves address space held in its process")
    if outside_limit in CGROUP_LIMITS:
        return (f"a limit from outside the process ({outside_limit}) sets the edge, and the kernel's out-of-memory "
                "killer ends the process that passes it")
    return None


def traced_answer(model_source: SourceLike, options: ProbeOptions, limit_bytes: int, progress: Progress) -> int | None:
    """The largest batch the probe's search finds on the step traced with fake tensors under the same
    limit (backends/fake.py): on the counted CPU the real answer to the byte, on a GPU a first guess
    (the trace knows no cuDNN workspaces or fragmentation). None where the step cannot be traced."""
    device = FakeDevice(limit_bytes, "traced")
    try:
        traced = run_probe(model_source, replace(options, device="cpu", memory_limit=limit_bytes), _Quiet(), backend=device)
    except BadInput:
        raise  # the source itself is wrong (a --lora target, no blocks to checkpoint): the real probe would say the same
    except Exception as error:  # noqa: BLE001 - an operator with no fake implementation: the real search alone
        progress.note(f"the step could not be traced ({first_line(error)}): the search starts from batch {options.min_batch}")
        return None
    if traced.interrupted:  # Ctrl-C while tracing: nothing real was measured
        raise KeyboardInterrupt
    if traced.max_batch is not None:
        progress.note(f"traced with fake tensors first: batch {traced.max_batch} predicted, checked with real trials")
    return traced.max_batch


class _Quiet:
    """The traced search's progress: only its answer is shown."""

    def started(self, batch: int) -> None: ...
    def finished(self, trial: Trial) -> None: ...
    def note(self, text: str) -> None: ...


def _search(run: Callable[[int], Trial], options: ProbeOptions, device: DeviceInfo, trials: list[Trial],
            aim: int | None = None) -> SearchOutcome:
    """The search, from the traced answer where there is one (that batch, and the next above it,
    settle an exact limit in two trials, and one at half of it draws the memory line that the
    recommended batch and `bsplan plan` read); under a limit from outside the process it settles within
    the band's width, the largest fit is checked again, and the search goes on below it, from the
    trials it has, while the re-check fails (the edge is a band)."""
    limit = device.total_bytes if options.search == "predict" else None
    tolerance = 0.0 if device.exact else BAND_TOLERANCE
    if aim is not None and run(aim).fits and aim + options.multiple_of <= options.max_batch:
        run(aim + options.multiple_of)
    outcome = find_max_batch(run, options.min_batch, options.max_batch, options.multiple_of, limit, tolerance, trials)
    while not device.exact and outcome.max_fit is not None and not run(outcome.max_fit).fits:
        failed = outcome.max_fit
        below = failed - options.multiple_of
        if below < options.min_batch:
            return SearchOutcome(None, failed, capped=False)
        known = [trial for trial in trials if trial.batch < failed]
        outcome = find_max_batch(run, options.min_batch, below, options.multiple_of, limit, tolerance, known)
        outcome = SearchOutcome(outcome.max_fit, min(outcome.first_fail or failed, failed), capped=False)
    if aim is not None and outcome.max_fit is not None and sum(trial.point is not None for trial in trials) < 2:
        half = -(-outcome.max_fit // (2 * options.multiple_of)) * options.multiple_of
        if options.min_batch <= half < outcome.max_fit:
            run(half)
    return outcome


def _outcome_of(trials: list[Trial]) -> SearchOutcome:
    fitted = [trial.batch for trial in trials if trial.fits]
    failed = [trial.batch for trial in trials if not trial.fits]
    return SearchOutcome(max(fitted, default=None), min(failed, default=None), capped=False)


def recommended_batch(trials: list[Trial], max_batch: int | None, budget: float) -> int | None:
    """Largest batch whose peak stays within the budget: measured where a trial shows it, else
    predicted on the line of peak over batch (memory_line.fit_top, the rule plan and estimate use,
    so a probe's recommended_batch is the one plan recomputes); rounded down to a multiple of 8."""
    if max_batch is None:
        return None
    points = [trial.point for trial in trials if trial.point is not None]
    best = max((batch for batch, peak in points if peak <= budget), default=0)
    line = fit_top(points)
    if line is not None and line.per_sample_bytes > 0:
        best = max(best, min(max_batch, line.largest_within(budget)))
    return round_recommended(best) or None


def _result(source: TrialSource, static: Static, options: ProbeOptions, outcome: SearchOutcome, interrupted: bool) -> ProbeResult:
    trials, device = source.trials, source.device
    breakdown = static.breakdown(trials)
    peak = next((t.peak_bytes for t in reversed(trials) if t.fits and t.batch == outcome.max_fit), None)
    notes = list(source.notes)
    if static.leaked_bytes > 0:
        notes.append(f"a failed trial left {format_bytes(static.leaked_bytes)} allocated: later trials had less memory")
    if outcome.max_fit is None and not interrupted:
        notes.append(_no_fit_message(outcome.first_fail, breakdown, device.total_bytes))
    return ProbeResult(
        model=static.model,
        device=device,
        mode=options.mode,
        precision=options.precision,
        steps=options.steps,
        multiple_of=options.multiple_of,
        headroom=options.headroom,
        max_batch=outcome.max_fit,
        first_oom_batch=outcome.first_fail,
        recommended_batch=recommended_batch(trials, outcome.max_fit, (1 - options.headroom) * device.total_bytes),
        peak_bytes=peak,
        breakdown=breakdown,
        trials=tuple(trials),
        **_throughput(trials),
        capped_at=options.max_batch if outcome.capped else None,
        interrupted=interrupted,
        notes=tuple(notes),
        world_size=options.nproc,
        strategy=options.strategy,
        bucket_view=options.bucket_view,
    )


def _throughput(trials: list[Trial]) -> dict[str, int | None]:
    """The fastest batch measured, and the smallest within SAME_THROUGHPUT of it: a bigger batch is
    not always faster, and a smaller one leaves memory free."""
    rates = {t.batch: t.samples_per_second for t in trials if t.fits and t.samples_per_second is not None}
    if not rates:
        return {"best_throughput_batch": None, "efficient_batch": None}
    best = max(rates, key=lambda batch: rates[batch])
    efficient = min(batch for batch, rate in rates.items() if rate >= rates[best] / SAME_THROUGHPUT)
    return {"best_throughput_batch": best, "efficient_batch": efficient}


def _no_fit_message(first_fail: int | None, breakdown: Breakdown, total: int) -> str:
    static = breakdown.static_bytes
    verdict = "more than" if static > total else "within"
    return (
        f"no batch fits: batch {first_fail} ran out of memory. The static memory alone needs {format_bytes(static)} "
        f"(parameters {format_bytes(breakdown.parameter_bytes)}, gradients {format_bytes(breakdown.gradient_bytes)}, "
        f"optimizer state {format_bytes(breakdown.optimizer_state_bytes)}), {verdict} the {format_bytes(total)} available. "
        "Try --precision bf16, a smaller model, or sharding the model state (FSDP / ZeRO)."
    )


def _sendable(model_source: SourceLike) -> bool:
    """Whether another process can receive the model: a file or a config always; Python functions
    (bsplan.probe, the integrations) only by reference, which local functions and lambdas have not."""
    callables = getattr(model_source, "callables", None)
    if callables is None:
        return True
    try:
        pickle.dumps(callables)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True
