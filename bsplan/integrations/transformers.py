"""bsplan's exact batch search for a Hugging Face Trainer, keeping its global batch.

    fit_batch(trainer, global_batch=256)
    trainer.train()

probes the Trainer's own model with batches its own data collator makes from its own training
dataset, with its optimizer class and precision, then sets per_device_train_batch_size and
gradient_accumulation_steps so that per-device batch x accumulation x devices is the global batch
(the Trainer's auto_find_batch_size halves the batch and changes the global batch instead). Needs
transformers (pip install 'bsplan[hf]'). docs/integrations.md.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import Trainer

from bsplan.api import plan, probe
from bsplan.models.knobs import checkpoint_blocks
from bsplan.planning.errors import BadInput
from bsplan.planning.results import ProbeResult


def fit_batch(trainer: Trainer, global_batch: int | None = None, memory_limit: int | str | None = None,
              max_batch: int = 65536, steps: int = 3) -> ProbeResult:
    """Probe and set the Trainer's batch arguments; returns the probe (its trials, peak, breakdown).
    global_batch: samples per optimizer step over all devices (default: what the arguments give now).
    memory_limit ("300MiB", bytes): a counted limit on the CPU, as `bsplan probe --memory-limit`."""
    args, dataset, collate = trainer.args, trainer.train_dataset, trainer.data_collator
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise BadInput("fit_batch makes batches from the Trainer's train_dataset: give it a map-style dataset")
    world = args.world_size
    target = global_batch or args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    device = args.device
    counted = device.type == "cpu" and memory_limit is not None
    optimizer_class, optimizer_options = Trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
    saved = {name: value.detach().to("cpu", copy=True) for name, value in trainer.model.state_dict().items()}

    def build_model() -> torch.nn.Module:
        # A counted CPU limit counts what is allocated while it runs: a copy is built in it there.
        model = copy.deepcopy(trainer.model) if counted else trainer.model
        if args.gradient_checkpointing:  # the Trainer turns it on when it trains
            checkpoint_blocks(model, type(model).__name__)
        return model

    def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
        return dict(collate([dataset[index % len(dataset)] for index in range(batch_size)]))

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return trainer.compute_loss(model, batch)  # type: ignore[return-value]

    def optimizer(parameters: Any) -> torch.optim.Optimizer:
        return optimizer_class(parameters, **optimizer_options)  # type: ignore[no-any-return]

    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    try:
        result = probe(build_model, make_batch, loss=loss, optimizer=optimizer, device=str(device), memory_limit=memory_limit,
                       precision=precision, steps=max(2, steps), max_batch=max_batch)
    finally:  # the trials trained the model (or a copy of it): its weights as they were, whatever happened
        trainer.model.load_state_dict(saved)
    if result.max_batch is None:
        raise BadInput(f"not even batch 1 fits: {'; '.join(result.notes)}")
    split = plan(target, gpus=world, max_micro=result.max_batch)
    args.per_device_train_batch_size = split.micro_batch
    args.gradient_accumulation_steps = split.accumulation_steps
    if hasattr(trainer, "_train_batch_size"):  # the Trainer copies the batch size when it is made, and trains with the copy
        trainer._train_batch_size = args.train_batch_size
    return result
