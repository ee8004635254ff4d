"""One trial: real training steps at one batch size, then the process put back as it was.

A trial runs `steps` (>= 2) full steps of make_batch, forward, backward, optimizer.step()
and zero_grad(set_to_none=True); the first step of the first trial allocates the optimizer state,
so it counts. The optimizer and its state are then kept from trial to trial, as training keeps them
from step to step: every later trial starts at the memory training holds between steps, so its
first step already reaches the steady peak, and a batch that does not fit fails in that first step
instead of the second (a failing trial costs one step, not two). After an out-of-memory everything
else the trial made is released (batch, activations, gradients, the exception's frames) and the
allocator's cache emptied, so the next trial starts from the same memory: otherwise every failure
shrinks what later trials can fit.
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any, Callable

import torch

from bsplan.backends.device import Device
from bsplan.measure.oom import Failure, classify
from bsplan.measure.workload import Workload, user_error
from bsplan.models.knobs import MasterWeights, kept_tensors, to_bf16
from bsplan.planning.errors import BsplanError, first_line
from bsplan.planning.results import Trial

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "mixed": torch.bfloat16}  # mixed: bf16 weights and compute


class TrialRunner:
    """Runs trials on one model on one device; remembers every trial and what it measured."""

    def __init__(self, workload: Workload, model: torch.nn.Module, device: Device, *, steps: int, precision: str, mode: str,
                 on_phase: Callable[[str], None] | None = None) -> None:
        self.workload = workload
        self.model = model
        self.device = device
        self.steps = steps
        self.precision = precision
        self.train = mode == "train"
        self.trials: list[Trial] = []
        self.optimizer_state_bytes: int | None = None  # measured after the first completed optimizer step
        self.leaked_bytes = 0  # bytes a failed trial left behind (should stay 0)
        self.fitted_elsewhere: list[int] = []  # batches that fitted in earlier processes of the same probe
        # told each phase of a step as it begins ("optimizer" as the optimizer is made and steps,
        # "forward" with the batch, "backward"): measure/attribution.py labels the tensors so
        self._on_phase = on_phase or (lambda phase: None)
        self._optimizer: torch.optim.Optimizer | None = None
        self._state_added = 0  # device bytes this trial added as optimizer state, which is kept
        if precision == "mixed":  # bf16 weights (a wrapped model was cast before its wrapper: measure/sources.py)
            to_bf16(model)

    def __call__(self, batch: int) -> Trial:
        counted = self.device.counts_tensors
        if counted and not self.trials and self.device.current_bytes() != storage_bytes([*self.model.parameters(), *self.model.buffers()]):
            gc.collect()  # building the model left something more behind (a wrapper's buckets, or garbage)
        self._state_added = 0
        # The parameters that have optimizer state now; None while there is no optimizer yet.
        kept = None if self._optimizer is None else {id(parameter) for parameter in self._optimizer.state}
        before = self.device.current_bytes()
        self.device.reset_peak()
        start = time.perf_counter()
        try:
            rate, phase_peaks, earlier_peak = self._run_steps(batch)
            peak = max(earlier_peak, self.device.peak_bytes())
            trial = Trial(batch, True, peak, time.perf_counter() - start, rate, **phase_peaks)
        except BsplanError:
            raise
        except Exception as error:  # noqa: BLE001 - classified right here
            trial = self._failed(batch, error, time.perf_counter() - start)
            self._forget_new_state(kept)
        finally:
            self._release(before + self._state_added)
        if counted and not trial.fits:
            self.leaked_bytes = max(self.leaked_bytes, self.device.current_bytes() - before - self._state_added)
        self.trials.append(trial)
        return trial

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer, once the first trial has made it; it and its state live across trials."""
        return self._optimizer

    def _forget_new_state(self, kept: set[int] | None) -> None:
        """After a failed trial, the optimizer state it began goes with it, since it may be half made
        (Adam's exp_avg without its exp_avg_sq, which the next step would not repair): an optimizer
        built in the trial is dropped whole (Adagrad makes its state when built), else the state of
        parameters that had none before the trial (a branch that only larger batches take)."""
        if kept is None:
            self._optimizer = None
        elif self._optimizer is not None:
            for parameter in [p for p in self._optimizer.state if id(p) not in kept]:
                del self._optimizer.state[parameter]
        self._state_added = 0

    def _failed(self, batch: int, error: Exception, seconds: float) -> Trial:
        """An out-of-memory becomes a failed trial; anything else is the user's error."""
        failure = classify(error)
        evidence = None
        if failure is Failure.AMBIGUOUS:
            fitted = [trial.batch for trial in self.trials if trial.fits] + self.fitted_elsewhere
            smaller = [fit for fit in fitted if fit < batch]
            if not smaller:
                raise user_error(
                    f"a training step of {self.workload.name} at batch {batch} (an error that out-of-memory also "
                    "causes, but no smaller batch fitted to show it was)",
                    error,
                ) from None
            evidence = f"{first_line(error)!r} taken as out-of-memory: batch {max(smaller)} fitted"
        elif failure is Failure.OTHER:
            raise user_error(f"a training step of {self.workload.name} at batch {batch}", error) from None
        return Trial(batch, False, None, seconds, None, error=first_line(error), oom_evidence=evidence)

    def _run_steps(self, batch_size: int) -> tuple[float, dict[str, int], int]:
        """Run the steps. Returns samples per second over the steps after the first (the warm-up),
        the peaks of the last step's forward and of its forward and backward in what the device's
        limit counts (the optimizer step's own peak does not grow with the batch, so leaving it out
        keeps these close to affine in the batch, for the search), and the peak of the steps before
        the last."""
        device, model = self.device, self.model
        autocast = (
            torch.autocast(device.torch_device.type, dtype=_AUTOCAST[self.precision])
            if self.precision in _AUTOCAST
            else contextlib.nullcontext()
        )
        if self.train and self._optimizer is None:
            self._on_phase("optimizer")
            held = device.current_bytes()
            make = self.workload.optimizer
            self._optimizer = MasterWeights(model.parameters(), make) if self.precision == "mixed" else make(model.parameters())
            self._state_added = device.current_bytes() - held  # Adagrad makes its state here
        optimizer = self._optimizer
        scaler = _SteppingScaler(device.torch_device.type, init_scale=1.0) if self.train and self.precision == "fp16" else None
        timed_from = 0.0
        earlier_peak = forward_peak = step_peak = 0
        for step in range(self.steps):
            if step == 1:
                device.synchronize()
                timed_from = time.perf_counter()
            if step == self.steps - 1:
                earlier_peak = device.peak_bytes()
                device.reset_peak()
            self._on_phase("forward")
            batch = self.workload.make_batch(batch_size, device.torch_device)
            if optimizer is None:
                with torch.inference_mode(), autocast:
                    self.workload.loss(model, batch)
                forward_peak = step_peak = device.limit_peak_bytes()
                continue
            with autocast:
                loss = self.workload.loss(model, batch)
            forward_peak = device.limit_peak_bytes()
            self._on_phase("backward")
            (loss if scaler is None else scaler.scale(loss)).backward()
            step_peak = device.limit_peak_bytes()
            held = device.current_bytes()
            self._on_phase("optimizer")
            with device.stepping() if _reads_scale_only(optimizer) else contextlib.nullcontext():
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)
                    scaler.update()
            self._state_added += device.current_bytes() - held  # state the step made (most make it in their first)
            if self.optimizer_state_bytes is None and kept_tensors(optimizer):  # SGD without momentum keeps none, masters aside
                self.optimizer_state_bytes = state_bytes(optimizer)
            optimizer.zero_grad(set_to_none=True)
            del batch, loss
        device.synchronize()
        rate = batch_size * (self.steps - 1) / max(time.perf_counter() - timed_from, 1e-9)
        return rate, {"forward_peak_bytes": forward_peak, "step_peak_bytes": step_peak}, earlier_peak

    def _release(self, resting: int) -> None:
        """Back to the memory between trials (before the trial, plus the optimizer state this trial
        made and keeps). Dropping the references frees almost everything; a garbage collection (a
        few hundred ms with torch loaded) runs only when something more is still held, such as a
        reference cycle through an exception's frames."""
        for parameter in self.model.parameters():
            parameter.grad = None
        torch.clear_autocast_cache()
        if self.device.counts_tensors and self.device.current_bytes() != resting:
            gc.collect()
        self.device.release()


class _SteppingScaler(torch.amp.GradScaler):
    """fp16's GradScaler, which always takes the optimizer step. The probe measures memory: a skipped
    step (gradients that overflowed) would leave the optimizer state out of the peak, and whether
    they overflowed is a value, which a traced step's fake tensors do not have. The scale and its
    update still run, so every tensor a real step allocates is allocated."""

    def _maybe_opt_step(self, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any], *args: Any,
                        **kwargs: Any) -> float | None:
        return optimizer.step(*args, **kwargs)  # type: ignore[no-any-return]


def _reads_scale_only(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the values the optimizer's step reads only scale its updates: torch's own optimizers'
    (Adafactor's step count and RMS), which a traced step may answer (backends/fake.py). Another
    optimizer may branch on a value to allocate (a preconditioner refreshed every k steps), so its
    reads stay errors, and a step that reads is run for real instead of traced."""
    inner = optimizer.inner if isinstance(optimizer, MasterWeights) else optimizer
    return type(inner).__module__.split(".")[:2] == ["torch", "optim"]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (each storage once), master weights included."""
    return storage_bytes(kept_tensors(optimizer))  # type: ignore[arg-type]


def storage_bytes(values: list[object]) -> int:
    """Bytes of the storages of the tensors among values, each once (an FSDP DTensor: its shard)."""
    storages = {}
    for value in values:
        if isinstance(value, torch.Tensor):
            storage = local(value).untyped_storage()
            storages[storage._cdata] = storage.nbytes()  # fake storages have no data pointer: 0 for all
    return sum(storages.values())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's part on this device: an FSDP DTensor's shard, else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor
