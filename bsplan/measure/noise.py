"""`bsplan noise`: the gradient noise scale of a model's training gradient on its real data, at fixed
weights (no optimizer step), and the exact value over a finite dataset to check it against
(docs/noise.md). The arithmetic is planning/noise.py's.

Each step draws B_big samples as B_big / B_small micro-batches of B_small, as gradient accumulation
does: every micro-batch's gradient is a small-batch gradient and their mean is the big-batch one, so
one pass over B_big samples gives both, and only B_small has to fit in memory.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from bsplan.backends import cuda
from bsplan.backends.device import open_device
from bsplan.measure.oom import Failure, classify
from bsplan.measure.workload import Batch, Workload, _is_batch, _to_device, load_workload, user_error
from bsplan.models.source import ModelSource
from bsplan.planning.errors import BadInput, BsplanError, first_line
from bsplan.planning.noise import (
    MIN_STEPS, ExactNoise, NoiseOptions, NoiseResult, NoiseSample, batch_sizes, ratio, relative_error, unbiased,
)
from bsplan.planning.results import LAST_PROBE
from bsplan.planning.saved import load_probe

SYNTHETIC = ("{name} defines no train_batches(batch_size): the noise scale of make_batch's batches measures that generator, "
             "not your data, so define train_batches to yield real batches (docs/noise.md) or pass --allow-synthetic")


class NoiseProgress(Protocol):
    """What `bsplan noise` reports while it runs (the CLI prints it on stderr)."""

    def measured(self, steps: int, noise_scale: float | None, relative_error: float) -> None: ...
    def note(self, text: str) -> None: ...


def run_noise(source: ModelSource | Path | str, options: NoiseOptions, progress: NoiseProgress) -> NoiseResult:
    """Measure B_simple step by step until its standard error is below --rel-error (after MIN_STEPS
    steps) or --max-steps; Ctrl-C keeps the steps measured so far."""
    started = time.perf_counter()
    random.seed(options.seed)
    torch.manual_seed(options.seed)  # the model file's draws: its weights without --checkpoint, its batches
    workload = load_workload(source)
    real = callable(getattr(workload.module, "train_batches", None))
    if not real and not options.allow_synthetic:
        raise BadInput(SYNTHETIC.format(name=workload.name))
    small, big, notes = _batch_sizes(workload, options)
    device = _device(options.device)
    model = _model(workload, options.checkpoint, device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise BadInput(f"the model of {workload.name} has no trainable parameters, so no gradient to measure")
    if not real:
        notes.append("measured on make_batch's synthetic batches (--allow-synthetic): "
                     "the number describes that generator, not your data")
    batches = _batches(workload, small, device, real)
    samples: list[NoiseSample] = []
    stopped = "max-steps"
    try:
        while len(samples) < options.max_steps:
            samples.append(unbiased(*_step(workload, model, parameters, batches, big // small), small, big))
            error = relative_error(samples)
            progress.measured(len(samples), ratio(samples), error)
            if len(samples) >= MIN_STEPS and error <= options.rel_error:
                stopped = "rel-error"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    return NoiseResult.of(
        samples, notes, model=workload.name, device=str(device), data="train_batches" if real else "make_batch (synthetic)",
        checkpoint=None if options.checkpoint is None else str(options.checkpoint), small_batch=small, big_batch=big,
        stopped=stopped, max_steps=options.max_steps, rel_error=options.rel_error, seed=options.seed,
        seconds=round(time.perf_counter() - started, 3),
    )


def _batch_sizes(workload: Workload, options: NoiseOptions) -> tuple[int, int, list[str]]:
    """The batch sizes, the small one kept to a saved probe's recommended batch of this model when
    it is not given: a probe measured what fits."""
    recommended, notes = None, []
    if LAST_PROBE.is_file() and options.small_batch is None:
        try:
            probe = load_probe(LAST_PROBE)
        except BadInput:
            probe = None
        if probe is not None and Path(probe.model_file).resolve() == Path(workload.name).resolve():
            recommended = probe.recommended_batch
    small, big = batch_sizes(options.small_batch, options.big_batch, recommended)
    if recommended is not None and small == recommended:
        notes.append(f"--small-batch {small}: the recommended batch of the probe in {LAST_PROBE}")
    return small, big, notes


def _device(spec: str | None) -> torch.device:
    if spec is None:
        return torch.device("cuda:0" if cuda.available() else "cpu")
    return open_device(spec, None).torch_device


def _model(workload: Workload, checkpoint: Path | None, device: torch.device) -> torch.nn.Module:
    """The model in training mode (dropout as in training), with the checkpoint's weights if given."""
    model = workload.build_model()
    if checkpoint is not None:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as error:
            raise BadInput(f"cannot read --checkpoint {checkpoint} as a state dict that torch.save wrote ({_said(error)})") from None
        if not isinstance(state, dict):
            raise BadInput(f"--checkpoint {checkpoint} holds a {type(state).__name__}, "
                           "not a state dict (torch.save(model.state_dict()))")
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise BadInput(f"--checkpoint {checkpoint} does not fit the model of {workload.name}: {_said(error)}") from None
    return model.to(device).train()


def _said(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"


def _batches(workload: Workload, size: int, device: torch.device, real: bool) -> Iterator[Batch]:
    """Batches of exactly `size` samples on the device, without end: train_batches called again
    each time it runs out (an epoch), or make_batch."""
    if not real:
        while True:
            yield workload.make_batch(size, device)
    train_batches: Callable[[int], Any] = workload.module.train_batches
    what = f"train_batches({size}) in {workload.name}"
    while True:
        yielded = 0
        try:
            for batch in train_batches(size):
                if not _is_batch(batch):
                    raise BadInput(f"{what} yielded {type(batch).__name__}: it must yield what make_batch returns, "
                                   "a tensor, a tuple/list of tensors or a dict of tensors")
                if _samples(batch) != size:
                    raise BadInput(f"{what} yielded a batch of {_samples(batch)} samples: "
                                   "it must yield exactly the batch size asked for")
                yielded += 1
                yield _to_device(batch, device)
        except BsplanError:
            raise
        except Exception as error:
            raise user_error(what, error) from None
        if not yielded:
            raise BadInput(f"{what} yielded no batch")


def _samples(batch: Batch) -> int:
    first = batch if isinstance(batch, torch.Tensor) else next(iter(batch.values() if isinstance(batch, dict) else batch))
    return int(first.shape[0]) if first.dim() else 0


def _map(function: Callable[[torch.Tensor], torch.Tensor], batch: Batch) -> Batch:
    """The batch with each of its tensors replaced by function(tensor)."""
    if isinstance(batch, torch.Tensor):
        return function(batch)
    if isinstance(batch, dict):
        return {key: function(value) for key, value in batch.items()}
    return type(batch)(function(item) for item in batch)


def _step(workload: Workload, model: torch.nn.Module, parameters: Sequence[torch.nn.Parameter], batches: Iterator[Batch],
          micro_batches: int) -> tuple[float, float]:
    """|G_small|² averaged over the step's micro-batches, and |G_big|² of their mean gradient."""
    total = [torch.zeros_like(p) for p in parameters]
    small_sq = 0.0
    for _ in range(micro_batches):
        batch = next(batches)
        try:
            loss = workload.loss(model, batch)
            grads = torch.autograd.grad(loss, parameters, allow_unused=True, materialize_grads=True)
        except BsplanError:
            raise
        except Exception as error:
            if classify(error) is not Failure.OTHER:
                raise BadInput(f"--small-batch {_samples(batch)} does not fit in memory here: give a smaller one") from None
            raise user_error(f"the loss of {workload.name}", error) from None
        small_sq += squared_norm(grads)
        torch._foreach_add_(total, grads)
    return small_sq / micro_batches, squared_norm(total) / micro_batches**2


def squared_norm(tensors: Sequence[torch.Tensor]) -> float:
    """The squared norm of the vector of all the tensors, summed in float64."""
    return float(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]).square().sum())


def exact_noise(workload: Workload, model: torch.nn.Module, data: Batch, chunk: int = 256) -> ExactNoise:
    """The exact noise scale of the model's loss over a finite dataset (`data`: every sample, as one
    batch), from each sample's own gradient, by torch.func.vmap over grad, `chunk` samples at a time.
    The loss must be a mean over the batch's samples with no coupling between them (no BatchNorm in
    training mode): then a batch's gradient is the mean of its samples' gradients."""
    trainable = {f"model.{name}": p.detach() for name, p in model.named_parameters() if p.requires_grad}
    fixed = {f"model.{name}": t.detach() for name, t in [*model.named_parameters(), *model.named_buffers()]
             if f"model.{name}" not in trainable}
    loss = _Loss(workload, model)

    def sample_loss(weights: dict[str, torch.Tensor], sample: Batch) -> torch.Tensor:
        return torch.func.functional_call(loss, {**weights, **fixed}, (_map(lambda t: t.unsqueeze(0), sample),))

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0), randomness="different")
    count = _samples(data)
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in trainable.items()}
    sum_sq = 0.0
    for start in range(0, count, chunk):
        part = _map(lambda t: t[start:start + chunk], data)
        grads = per_sample(trainable, part)
        sum_sq += float(sum(g.double().flatten(1).square().sum() for g in grads.values()))
        for name, g in grads.items():
            total[name] += g.double().sum(0)
    norm = squared_norm([t / count for t in total.values()])
    return ExactNoise(count, norm, sum_sq / count - norm)


class _Loss(torch.nn.Module):
    """The workload's loss as a module, so torch.func.functional_call can swap the model's weights."""

    def __init__(self, workload: Workload, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.workload = workload

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.workload.loss(self.model, batch)
