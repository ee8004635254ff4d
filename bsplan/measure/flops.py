"""The floating-point operations of a training step's forward and backward passes, counted on one
traced step: torch.utils.flop_counter counts the matrix multiplications, convolutions and attention
(nearly all of a step's arithmetic) from the shapes of fake tensors, so any model size counts on a
laptop. `bsplan routes` turns them into seconds at a GPU's peak (planning/routes.py)."""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode

from bsplan.backends.fake import FakeDevice
from bsplan.measure.trace import UNBOUNDED
from bsplan.measure.workload import load_workload
from bsplan.models.source import ModelSource

# Samples in the counted step: the count divided by them is per sample (a batch of 1 can take
# shortcuts a larger one does not, such as squeezed dimensions).
FLOP_BATCH = 2


def flops_per_sample(source: ModelSource) -> float:
    """A training step's forward and backward FLOPs per sample, with the source's knobs (checkpointing
    recomputes its blocks' forward in backward, and is counted so; LoRA skips the frozen weights'
    gradients). The optimizer's step is left out: elementwise, a few FLOPs per parameter."""
    workload = load_workload(source)
    device = FakeDevice(UNBOUNDED, f"{source} counted")
    with device.tracking():
        model = device.place(workload.build_model())
        model.train()
        batch = workload.make_batch(FLOP_BATCH, device.torch_device)
        with FlopCounterMode(display=False) as counter:
            workload.loss(model, batch).backward()
    return counter.get_total_flops() / FLOP_BATCH
