"""`bsplan probe`: load the model, run the search with real trials, and assemble the result."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from bsplan.cpumem import ADDRESS_SPACE_LIMITS, CGROUP_LIMITS
from bsplan.devices import open_device
from bsplan.errors import BadInput, NoFit
from bsplan.oom import Failure, classify, first_line
from bsplan.memory import fit_top, round_recommended
from bsplan.result import SAME_THROUGHPUT, Breakdown, DeviceInfo, ModelInfo, ProbeResult, Trial
from bsplan.search import SearchOutcome, find_max_batch
from bsplan.strategies import OPTIMIZER_STATES, gathered_bytes
from bsplan.trial import TrialRunner
from bsplan.units import format_bytes, parse_size
from bsplan.workload import Workload, load_workload

DEFAULT_MAX_BATCH = 65536
PROBE_STRATEGIES = ("none", "ddp", "fsdp")  # what a probe can run; strategies.STRATEGIES is what the memory model knows


class Progress(Protocol):
    def started(self, batch: int) -> None: ...
    def finished(self, trial: Trial) -> None: ...
    def note(self, text: str) -> None: ...


@dataclass(frozen=True)
class ProbeOptions:
    device: str | None = None
    memory_limit: int | None = None
    precision: str = "fp32"
    mode: str = "train"
    steps: int = 3
    min_batch: int = 1
    max_batch: int = DEFAULT_MAX_BATCH
    multiple_of: int = 1
    headroom: float = 0.1
    search: str = "predict"  # "predict": aim at the boundary from the trials' peaks; "bisect": double, then bisect
    nproc: int = 1  # local processes, one per device (bsplan/distributed.py)
    strategy: str = "none"  # "none" (one plain process), "ddp" or "fsdp"
    bucket_view: bool = False  # DDP's gradient_as_bucket_view
    timeout: float = 300.0  # seconds a rank may take for one trial (or to start) before the probe stops

    @classmethod
    def checked(cls, *, memory_limit: str | None, max_batch: int | None, **values: object) -> ProbeOptions:
        """Options from the command line, each bad one refused with one sentence."""
        options = cls(
            memory_limit=None if memory_limit is None else parse_size(memory_limit),
            max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch,
            **values,  # type: ignore[arg-type]
        )
        if options.steps < 2:
            raise BadInput("--steps must be at least 2: the first step allocates the optimizer state and warms up")
        if options.min_batch < 1 or options.multiple_of < 1:
            raise BadInput("--min-batch and --multiple-of must be at least 1")
        if options.max_batch < options.min_batch:
            raise BadInput(f"--max-batch {options.max_batch} is below --min-batch {options.min_batch}")
        if -(-options.min_batch // options.multiple_of) * options.multiple_of > options.max_batch:
            raise BadInput(f"no multiple of {options.multiple_of} lies between --min-batch and --max-batch")
        if not 0 <= options.headroom < 1:
            raise BadInput("--headroom must be a fraction from 0 up to (not including) 1, e.g. 0.1")
        if options.nproc < 1:
            raise BadInput("--nproc must be at least 1")
        if options.strategy not in PROBE_STRATEGIES:
            raise BadInput(f"unknown --strategy {options.strategy!r}: use one of {', '.join(PROBE_STRATEGIES)}")
        if options.nproc > 1 and options.strategy == "none":
            raise BadInput("--nproc above 1 needs a --strategy (ddp or fsdp): processes without one share nothing")
        if options.mode == "infer" and options.strategy != "none":
            raise BadInput("--strategy and --nproc probe training (gradients, optimizer state, their sync): "
                           "with --mode infer probe one process")
        if options.bucket_view and options.strategy != "ddp":
            raise BadInput("--bucket-view is DDP's gradient_as_bucket_view: it goes with --strategy ddp")
        if options.timeout <= 0:
            raise BadInput("--timeout must be more than 0 seconds")
        return options


class TrialSource(Protocol):
    """Where trials run: this process (LocalTrials) or N processes under a strategy (World)."""

    device: DeviceInfo
    notes: list[str]
    trials: list[Trial]

    def __call__(self, batch: int) -> Trial: ...
    def static(self) -> Static: ...


@dataclass(frozen=True)
class Static:
    """What a trial source knows of its model on one device, beyond the trials."""

    model: ModelInfo
    parameter_bytes: int  # this device's (its shard under FSDP)
    gradient_bytes: int
    optimizer_state_bytes: int
    optimizer_state_measured: bool  # False: estimated from the optimizer type (no step completed)
    bucket_bytes: int = 0  # what wrapping the model allocated: DDP's gradient buckets
    leaked_bytes: int = 0  # what a failed trial left behind (should stay 0)
    gathered_bytes: int = 0  # what FSDP would hold unsharded at once (strategies.gathered_bytes)


class LocalTrials:
    """Trials in this process: the model built once on the device, every tensor counted on the CPU.
    `wrap` applies a data-parallel strategy (bsplan/distributed.py) after the model is built."""

    def __init__(self, workload: Workload, options: ProbeOptions, device_spec: str | None = None,
                 wrap: Callable[[torch.nn.Module, torch.device], torch.nn.Module] | None = None) -> None:
        self.workload, self.options, self.wrap = workload, options, wrap
        self.device_backend = open_device(options.device if device_spec is None else device_spec, options.memory_limit)
        self.device = self.device_backend.info
        self.notes = list(self.device_backend.notes)
        self.trials: list[Trial] = []

    def __enter__(self) -> LocalTrials:
        backend, options = self.device_backend, self.options
        self._tracking = backend.tracking()
        self._tracking.__enter__()
        try:
            model = self.workload.build_model().to(backend.torch_device)
            model.train(options.mode == "train")
            self._plain = model
            before = backend.current_bytes()
            if self.wrap is not None:
                model = self.wrap(model, backend.torch_device)
        except Exception as error:
            if classify(error) is Failure.OTHER:
                raise
            self._tracking.__exit__(None, None, None)
            raise NoFit(
                f"the model alone does not fit: building it on {self.device.name} ran out of memory within "
                f"{format_bytes(self.device.total_bytes)} ({first_line(error)}). Try --precision bf16, a smaller "
                "model, or sharding the model state (--strategy fsdp)"
            ) from None
        self.bucket_bytes = max(0, backend.current_bytes() - before)  # what the wrapper allocated
        self.runner = TrialRunner(self.workload, model, backend, steps=options.steps, precision=options.precision, mode=options.mode)
        self.trials = self.runner.trials
        return self

    def __exit__(self, *exc: object) -> None:
        self._tracking.__exit__(*exc)

    def __call__(self, batch: int) -> Trial:
        return self.runner(batch)

    def static(self) -> Static:
        static = measure_static(self.workload, self._plain, self.runner, self.options.mode, self.bucket_bytes)
        if self.options.bucket_view:  # the gradients live in DDP's buckets: no second copy
            static = replace(static, bucket_bytes=max(0, static.bucket_bytes - static.gradient_bytes))
        return static


def run_probe(model_file: Path, options: ProbeOptions, progress: Progress) -> ProbeResult:
    """Find the largest batch that fits. Ctrl-C returns what was measured so far (interrupted)."""
    workload = load_workload(model_file)
    if options.strategy == "none":
        local = LocalTrials(workload, options)
        why = _why_restart(local.device_backend.outside_limit)
        source: TrialSource = _world(model_file, options, why) if why else local
    else:
        source = _world(model_file, options)
    with source:  # type: ignore[attr-defined]
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
                outcome = _search(run, options, source.device)
        except KeyboardInterrupt:
            interrupted = True
            progress.note("interrupted: reporting the trials measured so far")
            outcome = _outcome_of(source.trials)
        static = source.static()
    return _result(source, static, options, outcome, interrupted)


@contextlib.contextmanager
def _latched_interrupts() -> Iterator[list[int]]:
    """Ctrl-C that cannot be lost. Python raises KeyboardInterrupt wherever the interpreter is, and
    in a weakref callback (cpumem uncounts each freed tensor in one, thousands a step) an exception
    is printed and dropped: the probe ran on to the end. The latch remembers it for the search to
    stop after the trial. Where Ctrl-C is ignored (a background job) it stays ignored."""
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


def _why_restart(outside_limit: str | None) -> str | None:
    """Why the trials must run in a child process restarted after each failed trial, under the limit
    from outside the process that sets the edge; None where one process serves."""
    if outside_limit in ADDRESS_SPACE_LIMITS:  # measured in docs/probe.md
        return (f"a limit on address space from outside the process ({outside_limit}) sets the edge, and a failed "
                "trial leaves address space held in its process")
    if outside_limit in CGROUP_LIMITS:
        return (f"a limit from outside the process ({outside_limit}) sets the edge, and the kernel's out-of-memory "
                "killer ends the process that passes it")
    return None


def _world(model_file: Path, options: ProbeOptions, why_restart: str | None = None) -> TrialSource:
    from bsplan.distributed import World  # torch.distributed only where it is used

    return World(model_file, options, why_restart)


def _search(run: Callable[[int], Trial], options: ProbeOptions, device: DeviceInfo) -> SearchOutcome:
    """The search; under a limit from outside the process the largest fit is checked again, and
    the search goes on below it while the re-check fails (the edge is a band)."""
    limit = device.total_bytes if options.search == "predict" else None
    outcome = find_max_batch(run, options.min_batch, options.max_batch, options.multiple_of, limit, device.exact)
    while not device.exact and outcome.max_fit is not None and not run(outcome.max_fit).fits:
        failed = outcome.max_fit
        below = failed - options.multiple_of
        if below < options.min_batch:
            return SearchOutcome(None, failed, capped=False)
        outcome = find_max_batch(run, options.min_batch, below, options.multiple_of, limit, device.exact)
        outcome = SearchOutcome(outcome.max_fit, min(outcome.first_fail or failed, failed), capped=False)
    return outcome


def _outcome_of(trials: list[Trial]) -> SearchOutcome:
    fitted = [trial.batch for trial in trials if trial.fits]
    failed = [trial.batch for trial in trials if not trial.fits]
    return SearchOutcome(max(fitted, default=None), min(failed, default=None), capped=False)


def measure_static(
    workload: Workload, model: torch.nn.Module, runner: TrialRunner, mode: str, bucket_bytes: int = 0
) -> Static:
    """Parameters, gradients and optimizer state on this device (a shard's under FSDP)."""
    local = [_local(p) for p in model.parameters()]
    parameter_bytes = sum(p.numel() * p.element_size() for p in local)
    trainable_bytes = sum(p.numel() * p.element_size() for p, q in zip(local, model.parameters()) if q.requires_grad)
    train = mode == "train"
    state, measured = runner.optimizer_state_bytes, True
    if state is None:
        measured = False
        state = 0
        if train:
            optimizer = workload.optimizer(model.parameters())
            per_parameter = OPTIMIZER_STATES.get(type(optimizer).__name__.lower(), 0)
            if isinstance(optimizer, torch.optim.SGD):  # a momentum buffer only with momentum
                per_parameter = OPTIMIZER_STATES["sgd"] if optimizer.defaults.get("momentum", 0) else 0
            state = per_parameter * trainable_bytes
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return Static(
        model=ModelInfo(workload.name, sum(p.numel() for p in model.parameters()), has_batchnorm),
        parameter_bytes=parameter_bytes,
        gradient_bytes=trainable_bytes if train else 0,
        optimizer_state_bytes=state,
        optimizer_state_measured=measured,
        bucket_bytes=bucket_bytes,
        leaked_bytes=runner.leaked_bytes,
        gathered_bytes=gathered_bytes(model),
    )


def breakdown_of(static: Static, trials: list[Trial]) -> Breakdown:
    """The memory breakdown: the static parts, and the bytes each sample adds from the trials."""
    parts = (static.parameter_bytes, static.gradient_bytes, static.optimizer_state_bytes, static.bucket_bytes)
    return Breakdown(
        parameter_bytes=static.parameter_bytes,
        gradient_bytes=static.gradient_bytes,
        optimizer_state_bytes=static.optimizer_state_bytes,
        optimizer_state_measured=static.optimizer_state_measured,
        activation_bytes_per_sample=_per_sample(trials, sum(parts)),
        bucket_bytes=static.bucket_bytes,
        gathered_bytes=static.gathered_bytes,
    )


def measure_breakdown(workload: Workload, model: torch.nn.Module, runner: TrialRunner, mode: str) -> Breakdown:
    return breakdown_of(measure_static(workload, model, runner, mode), runner.trials)


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter's tensor on this device: an FSDP DTensor's shard, else the parameter."""
    to_local = getattr(parameter, "to_local", None)
    return to_local() if callable(to_local) else parameter


def _line(trials: list[Trial]) -> tuple[float, float] | None:
    """(intercept, slope) of peak bytes over batch from the fitting trials, by the rule plan and
    estimate use too (memory.fit_top), so a probe's recommended_batch is the one plan recomputes."""
    line = fit_top([(trial.batch, trial.peak_bytes) for trial in trials if trial.fits and trial.peak_bytes is not None])
    return None if line is None else (line.base_bytes, line.per_sample_bytes)


def _per_sample(trials: list[Trial], static_bytes: int) -> float | None:
    line = _line(trials)
    if line is not None:
        return line[1]
    fitted = [trial for trial in trials if trial.fits and trial.peak_bytes is not None]
    if not fitted:
        return None
    return max(0.0, (fitted[0].peak_bytes - static_bytes) / fitted[0].batch)  # type: ignore[operator]


def _recommended(trials: list[Trial], max_batch: int | None, budget: float) -> int | None:
    """Largest batch whose peak stays within the budget: measured where a trial shows it, else
    predicted on the line of peak over batch (_line); rounded down to a multiple of 8 from 8 up."""
    if max_batch is None:
        return None
    within = [trial.batch for trial in trials if trial.fits and trial.peak_bytes is not None and trial.peak_bytes <= budget]
    best = max(within, default=0)
    line = _line(trials)
    if line is not None and line[1] > 0:
        best = max(best, min(max_batch, math.floor((budget - line[0]) / line[1])))
    return round_recommended(best) or None


def _result(source: TrialSource, static: Static, options: ProbeOptions, outcome: SearchOutcome, interrupted: bool) -> ProbeResult:
    trials, device = source.trials, source.device
    breakdown = breakdown_of(static, trials)
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
        recommended_batch=_recommended(trials, outcome.max_fit, (1 - options.headroom) * device.total_bytes),
        peak_bytes=peak,
        breakdown=breakdown,
        trials=trials,
        **_throughput(trials),
        capped_at=options.max_batch if outcome.capped else None,
        interrupted=interrupted,
        notes=notes,
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
