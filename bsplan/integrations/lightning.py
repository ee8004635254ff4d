"""bsplan's exact batch search inside a Lightning Trainer: a drop-in for Lightning's BatchSizeFinder.

    trainer = Trainer(callbacks=[bsplan.integrations.lightning.BatchSizeFinder()])

At the start of fit it probes the LightningModule's own training step (its training_step, its
configure_optimizers, batches of the real training data collated as its DataLoader collates them),
sets the largest batch that fits on the model or datamodule as Lightning's finder does, and puts
the weights back. Needs lightning (pip install lightning). docs/integrations.md.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.parsing import lightning_setattr

from bsplan.api import plan, probe
from bsplan.planning.errors import BadInput, BsplanError
from bsplan.planning.results import ProbeResult


class BatchSizeFinder(Callback):
    """Lightning's knobs where they mean the same: batch_arg_name (the attribute set), init_val and
    max_val (the search's bounds), steps_per_trial (training steps per trial, at least 2: the first
    allocates the optimizer state), margin (taken off the largest batch that fits; 0 keeps it).
    memory_limit ("300MiB", bytes) counts tensor bytes on the CPU as `bsplan probe --memory-limit`
    does; on a GPU the device's memory is the limit. target_global_batch keeps that many samples
    per optimizer step: the micro-batch and the Trainer's accumulate_grad_batches are set together."""

    def __init__(self, batch_arg_name: str = "batch_size", init_val: int = 1, max_val: int = 65536, steps_per_trial: int = 3,
                 margin: float = 0.0, memory_limit: int | str | None = None, target_global_batch: int | None = None) -> None:
        if not 0 <= margin < 1:
            raise BadInput(f"margin must lie in [0, 1), not {margin}")
        self.batch_arg_name, self.init_val, self.max_val = batch_arg_name, init_val, max_val
        self.steps_per_trial, self.margin, self.memory_limit = max(2, steps_per_trial), margin, memory_limit
        self.target_global_batch = target_global_batch
        self.optimal_batch_size: int | None = None  # Lightning's name for what was found and set
        self.result: ProbeResult | None = None  # the probe: every trial, the peak, the breakdown

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scale_batch_size(trainer, pl_module)

    def scale_batch_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Probe, agree across ranks on the smallest answer, set it, and return it."""
        try:
            self.result = self._probe(trainer, pl_module)
        except Exception:
            _smallest_over_ranks(trainer, _FAILED)  # the other ranks learn of it instead of waiting for this one
            raise
        largest = self.result.max_batch
        # Every rank takes part in the agreement, one that fits nothing too (0), so that none waits for it.
        found = _smallest_over_ranks(trainer, 0 if largest is None else max(1, math.floor(largest * (1 - self.margin))))
        if found == 0:
            raise BadInput(f"not even batch {self.init_val} fits on every device: {'; '.join(self.result.notes)}")
        if self.target_global_batch is not None:
            split = plan(self.target_global_batch, gpus=trainer.world_size, max_micro=found)
            found = split.micro_batch
            trainer.accumulate_grad_batches = split.accumulation_steps
        lightning_setattr(pl_module, self.batch_arg_name, found)
        self.optimal_batch_size = found
        return found

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeResult:
        """This rank's probe of the module's step on its own device; the module's weights put back after."""
        loader = _train_dataloader(trainer, pl_module)
        dataset, collate = loader.dataset, loader.collate_fn
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise BadInput("bsplan's BatchSizeFinder makes batches from a map-style training dataset (with __len__ and "
                           "__getitem__); an iterable dataset has no random access to make one of any size from")
        device = pl_module.device
        counted = device.type == "cpu" and self.memory_limit is not None
        saved = {name: value.detach().to("cpu", copy=True) for name, value in pl_module.state_dict().items()}
        held: dict[str, pl.LightningModule] = {}

        def build_model() -> pl.LightningModule:
            # A counted CPU limit counts what is allocated while it runs: there a copy of the module is
            # built in it, so its weights count; elsewhere the module itself, already on its device.
            held["module"] = _detached_copy(pl_module) if counted else pl_module
            return held["module"]

        def make_batch(batch_size: int) -> Any:
            return collate([dataset[index % len(dataset)] for index in range(batch_size)])

        def loss(model: pl.LightningModule, batch: Any) -> torch.Tensor:
            output = model.training_step(batch, 0)
            return output["loss"] if isinstance(output, dict) else output

        def optimizer(parameters: Any) -> torch.optim.Optimizer:
            return _first_optimizer(held["module"].configure_optimizers())

        precision = str(trainer.precision)
        autocast = "bf16" if "bf16" in precision else "fp16" if precision.startswith("16") else "fp32"
        try:
            with _no_logging(pl_module):
                return probe(build_model, make_batch, loss=loss, optimizer=optimizer, device=str(device),
                             memory_limit=self.memory_limit, steps=self.steps_per_trial, min_batch=self.init_val,
                             max_batch=self.max_val, precision=autocast)
        finally:  # the trials trained the module (or a copy of it): its weights as they were, whatever happened
            pl_module.load_state_dict(saved)


def _train_dataloader(trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.utils.data.DataLoader:
    """The training DataLoader as the datamodule or the module makes it."""
    source = trainer.datamodule if trainer.datamodule is not None else pl_module
    loader = source.train_dataloader()
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise BadInput("bsplan's BatchSizeFinder needs train_dataloader() to return one torch DataLoader")
    return loader


def _detached_copy(module: pl.LightningModule) -> pl.LightningModule:
    """A copy of the module's layers, weights and buffers, sharing everything else it holds (a dataset
    kept as an attribute) and attached to the same Trainer: what training keeps on the device, and no more."""
    shared = {id(value): value for name, value in vars(module).items() if name not in ("_parameters", "_buffers", "_modules")}
    copied = copy.deepcopy(module, shared)
    copied.trainer = module.trainer  # deepcopy drops it (LightningModule.__getstate__); a step reads global_rank, device from it
    return copied


def _first_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The optimizer configure_optimizers returns: alone, in a list, in a (list, schedulers) pair or a dict."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return _first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    raise BadInput("configure_optimizers() must return an optimizer for bsplan's BatchSizeFinder to train with")


@contextlib.contextmanager
def _no_logging(module: pl.LightningModule) -> Iterator[None]:
    """training_step's self.log calls do nothing while the probe runs (no loop collects them yet), on
    the module and on any copy of it."""
    cls = type(module)
    original = cls.log, cls.log_dict
    cls.log = cls.log_dict = lambda self, *args, **kwargs: None  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        cls.log, cls.log_dict = original  # type: ignore[method-assign]


_FAILED = -1  # what a rank whose probe raised contributes to the agreement


def _smallest_over_ranks(trainer: pl.Trainer, batch: int) -> int:
    """Under DDP every rank probed its own device (no collective in its trials, so a rank's
    out-of-memory cannot leave another waiting there); here all take the smallest answer, so the
    batch fits on every device. A rank whose probe raised sends _FAILED and raises its own error;
    the others stop too, rather than train without it or wait for it."""
    if trainer.world_size == 1:
        return batch
    gathered = trainer.strategy.all_gather(torch.tensor(batch, device=trainer.strategy.root_device)).flatten().tolist()
    failed = [rank for rank, value in enumerate(gathered) if value == _FAILED]
    if failed and batch != _FAILED:
        raise BsplanError(f"bsplan's BatchSizeFinder stopped on rank(s) {failed} with their own error (see their traceback); "
                          f"rank {trainer.global_rank} stops too")
    return int(min(gathered))
