"""Where a probe's trials run, and what a trial source knows of its model beyond the trials.

Two sources share one protocol: LocalTrials runs them in this process, on one device; World
(measure/world.py) runs a LocalTrials in each of N rank processes under a strategy, or in one child
process restarted after each failed trial. World builds on this module, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch

from bsplan.backends.device import Device, open_device
from bsplan.measure.oom import Failure, classify
from bsplan.measure.options import ProbeOptions
from bsplan.measure.trial import TrialRunner, local
from bsplan.measure.workload import Workload
from bsplan.models.blocks import fsdp_units
from bsplan.models.knobs import to_bf16
from bsplan.planning.errors import NoFit, first_line
from bsplan.planning.memory_line import fit_top
from bsplan.planning.results import Breakdown, DeviceInfo, ModelInfo, Trial
from bsplan.planning.strategies import OPTIMIZER_STATES, gathered_bytes
from bsplan.planning.units import format_bytes


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

    def breakdown(self, trials: list[Trial]) -> Breakdown:
        """The memory breakdown: the static parts, and the bytes each sample adds from the trials."""
        parts = (self.parameter_bytes, self.gradient_bytes, self.optimizer_state_bytes, self.bucket_bytes)
        return Breakdown(
            parameter_bytes=self.parameter_bytes,
            gradient_bytes=self.gradient_bytes,
            optimizer_state_bytes=self.optimizer_state_bytes,
            optimizer_state_measured=self.optimizer_state_measured,
            activation_bytes_per_sample=_per_sample(trials, sum(parts)),
            bucket_bytes=self.bucket_bytes,
            gathered_bytes=self.gathered_bytes,
        )


class TrialSource(Protocol):
    """Where trials run: this process (LocalTrials) or other processes (World)."""

    device: DeviceInfo
    notes: list[str]
    trials: list[Trial]

    def __enter__(self) -> TrialSource: ...
    def __exit__(self, *exc: object) -> None: ...
    def __call__(self, batch: int) -> Trial: ...
    def static(self) -> Static: ...


class LocalTrials:
    """Trials in this process: the model built once on the device, every tensor counted on the CPU
    (but in the fresh trial process of a probe under a limit from outside it: `count_tensors`).
    `wrap` applies a data-parallel strategy (measure/world.py) after the model is built."""

    def __init__(self, workload: Workload, options: ProbeOptions, device_spec: str | None = None,
                 wrap: Callable[[torch.nn.Module, torch.device], torch.nn.Module] | None = None,
                 backend: Device | None = None, count_tensors: bool = True) -> None:
        self.workload, self.options, self.wrap = workload, options, wrap
        spec = options.device if device_spec is None else device_spec
        self.device_backend = open_device(spec, options.memory_limit, count_tensors) if backend is None else backend
        self.device = self.device_backend.info
        self.notes = list(self.device_backend.notes)
        self.trials: list[Trial] = []

    def __enter__(self) -> LocalTrials:
        backend, options = self.device_backend, self.options
        self._tracking = backend.tracking()
        self._tracking.__enter__()
        try:
            model = backend.place(self.workload.build_model())
            if options.precision == "mixed":  # bf16 weights before a wrapper takes them; the masters are the optimizer's
                to_bf16(model)
            model.train(options.mode == "train")
            self._plain = model
            before = backend.current_bytes()
            if self.wrap is not None:
                model = self.wrap(model, backend.torch_device)
        except Exception as error:
            self._tracking.__exit__(None, None, None)
            if classify(error) is Failure.OTHER:
                raise
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


class RebuiltAfterFailure:
    """Trials in this process with the model built and wrapped again after each failed trial, as
    World (measure/world.py) starts a fresh world after one: a strategy's wrapper that ran out of
    memory mid-step keeps what it had gathered and bucketed, and later trials would carry it (a
    traced FSDP search found 26830 on examples/mlp.py at 300 MiB and world size 2 with the model
    kept, where the two-process probe, which restarts, found 27300; rebuilt, the two agree)."""

    def __init__(self, make: Callable[[], LocalTrials]) -> None:
        self._make = make
        self._current = make()
        self.device, self.notes = self._current.device, self._current.notes
        self.trials: list[Trial] = []
        self._static: Static | None = None

    def __enter__(self) -> RebuiltAfterFailure:
        self._current.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._current.__exit__(*exc)

    def __call__(self, batch: int) -> Trial:
        trial = self._current(batch)
        self.trials.append(trial)
        self._keep_static()
        if not trial.fits:
            self._current.__exit__(None, None, None)
            self._current = self._make()
            self._current.__enter__()
            self._current.runner.fitted_elsewhere = [t.batch for t in self.trials if t.fits]  # evidence for its OOMs
        return trial

    def _keep_static(self) -> None:
        self._static = latest_static(self._static, self._current.static())

    def static(self) -> Static:
        self._keep_static()
        assert self._static is not None
        return self._static


def latest_static(kept: Static | None, latest: Static) -> Static:
    """The latest static memory, but a fresh model's unmeasured optimizer state (no step completed in
    it yet) never replaces a measured one: after a restart, as World and RebuiltAfterFailure make."""
    return latest if kept is None or latest.optimizer_state_measured or not kept.optimizer_state_measured else kept


def measure_static(
    workload: Workload, model: torch.nn.Module, runner: TrialRunner, mode: str, bucket_bytes: int = 0
) -> Static:
    """Parameters, gradients and optimizer state on this device (a shard's under FSDP)."""
    shards = [local(p) for p in model.parameters()]
    parameter_bytes = sum(p.numel() * p.element_size() for p in shards)
    trainable_bytes = sum(p.numel() * p.element_size() for p, q in zip(shards, model.parameters()) if q.requires_grad)
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
        model=workload.info(model, has_batchnorm),
        parameter_bytes=parameter_bytes,
        gradient_bytes=trainable_bytes if train else 0,
        optimizer_state_bytes=state,
        optimizer_state_measured=measured,
        bucket_bytes=bucket_bytes,
        leaked_bytes=runner.leaked_bytes,
        gathered_bytes=gathered_bytes(model, fsdp_units(model)),
    )


def _per_sample(trials: list[Trial], static_bytes: int) -> float | None:
    """The slope of the memory line (memory_line.fit_top, the rule plan and estimate use too), or with
    one fitting trial what it held beyond the static memory, per sample."""
    line = fit_top([trial.point for trial in trials if trial.point is not None])
    if line is not None:
        return line.per_sample_bytes
    fitted = [trial for trial in trials if trial.point is not None]
    if not fitted:
        return None
    return max(0.0, (fitted[0].peak_bytes - static_bytes) / fitted[0].batch)  # type: ignore[operator]
