"""The floating-point operations of a training step's forward and backward passes, counted on one
traced step: torch.utils.flop_counter counts the matrix multiplications, convolutions and attention
(nearly all of a step's arithmetic) from the shapes of fake tensors, so any model size counts on a
laptop. `bsplan routes` turns them into seconds at a GPU's peak (planning/routes.py)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from bsplan.backends.fake import FakeDevice
from bsplan.measure.trace import UNBOUNDED
from bsplan.measure.workload import load_workload
from bsplan.models.source import ModelSource

aten = torch.ops.aten


def _as_registered(formula: Callable[..., int]) -> Callable[..., int]:
    """A formula from torch's registry (which takes the operator's own arguments), marked so that
    FlopCounterMode does not wrap it a second time."""
    def count(*args: Any, **kwargs: Any) -> int:
        return formula(*args, **kwargs)
    count._get_raw = True  # type: ignore[attr-defined]
    return count


# The CPU's fused attention, which a trace on the CPU runs, has no formula of torch's own: it is the same
# arithmetic as the CUDA kernels' (arguments in the same order), so theirs count it.
_CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _as_registered(flop_registry[aten._scaled_dot_product_flash_attention]),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        _as_registered(flop_registry[aten._scaled_dot_product_flash_attention_backward]),
}

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
        with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
            workload.loss(model, batch).backward()
    return counter.get_total_flops() / FLOP_BATCH
