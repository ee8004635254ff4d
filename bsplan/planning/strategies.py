"""Memory per device under data parallelism (DDP, ZeRO stages 1-3, FSDP), as plain arithmetic.

Each device holds a replica's model states (parameters, gradients, optimizer state) whole or
sharded over the N devices, as the ZeRO paper's Figure 1 counts them (docs/strategies.md); the
activations per sample do not change. `bsplan estimate` and `bsplan plan` share this, and it imports
no torch, as nothing `plan` imports may. docs/strategies.md gives the formulas and their sources.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bsplan.planning.choices import Strategy
from bsplan.planning.memory_line import MemoryLine
from bsplan.planning.record import Record

ZERO_PAPER = "Rajbhandari et al. 2019 (ZeRO), arXiv:1910.02054"
# Simplest first: `plan --strategy auto` recommends the first of those needing the fewest
# accumulation steps. FSDP comes before ZeRO-3: the same memory, and it ships with PyTorch.
BY_SIMPLICITY = (Strategy.ddp, Strategy.zero1, Strategy.zero2, Strategy.fsdp, Strategy.zero3)
SHARDED_PARAMETERS = frozenset({Strategy.zero3, Strategy.fsdp})
# fp32 tensors of optimizer state per parameter, by lower-cased torch.optim class name (PyTorch's
# torch/optim sources: SGD's momentum_buffer, when it has momentum; the Adam family's exp_avg and
# exp_avg_sq, or Adamax's exp_inf, Adadelta's acc_delta; Adagrad's sum; RMSprop's square_avg).
# LAMB keeps Adam's two moments; LARS is SGD with momentum. The probe reads it when no optimizer step
# completed; plan and estimate for their --optimizer.
OPTIMIZER_STATES = {
    "sgd": 1, "adam": 2, "adamw": 2, "nadam": 2, "radam": 2, "adamax": 2, "adadelta": 2, "adagrad": 1, "rmsprop": 1,
    "lamb": 2, "lars": 1,
}
# FSDP and ZeRO-3 gather a unit's parameters whole while it computes, and prefetch the next one.
UNITS_IN_FLIGHT = 2


@dataclass(frozen=True)
class Layout:
    """How training is spread over devices: the strategy, the world size, DDP's bucket view."""

    strategy: Strategy = Strategy.none
    world_size: int = 1
    bucket_view: bool = False  # DDP's gradient_as_bucket_view: the gradients live in its buckets

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", Strategy.parse(self.strategy, "--strategy"))

    def describe(self) -> str:
        if self.strategy == "none":
            return "one process"
        view = " with gradient_as_bucket_view" if self.bucket_view else ""
        return f"{self.strategy}{view} on {self.world_size} device{'s' if self.world_size > 1 else ''}"


SINGLE = Layout()


@dataclass(frozen=True)
class ModelStates:
    """One whole replica's model states in bytes, as a single process holds them."""

    parameter_bytes: float
    gradient_bytes: float
    optimizer_state_bytes: float  # in mixed precision with the fp32 master weights
    bucket_bytes: float  # DDP's gradient buckets: a second copy of the gradients, allocated when it wraps
    gathered_bytes: float = 0.0  # what FSDP and ZeRO-3 hold unsharded at once (gathered_bytes()); 0: unknown
    live_gradient_bytes: float | None = None  # of the gradients, those live at the peak; None: all

    @classmethod
    def count(cls, parameters: float, optimizer: str, precision: str) -> ModelStates:
        """The states of a parameter count alone, as DeepSpeed's estimators count them: fp32 and
        autocast keep fp32 weights and gradients; mixed keeps half-precision ones and an fp32 master
        copy with the optimizer state (ZERO_PAPER, section 3.1: 2 + 2 + 12 bytes for Adam)."""
        moments = 4 * OPTIMIZER_STATES[optimizer]
        weight, state = (2, 4 + moments) if precision == "mixed" else (4, moments)
        return cls(parameters * weight, parameters * weight, parameters * state, parameters * weight)


_PARTS = ("parameter_bytes", "gradient_bytes", "optimizer_state_bytes", "bucket_bytes", "gathered_bytes")


@dataclass(frozen=True)
class DeviceStates(Record):
    """The model states one device holds under a layout."""

    layout: Layout
    parameter_bytes: float
    gradient_bytes: float
    optimizer_state_bytes: float
    bucket_bytes: float
    gathered_bytes: float

    @property
    def static_bytes(self) -> float:
        return sum(getattr(self, part) for part in _PARTS)

    def document(self) -> dict[str, Any]:
        layout = self.layout
        parts = {part: round(getattr(self, part)) for part in _PARTS}
        return {"strategy": layout.strategy, "world_size": layout.world_size, "bucket_view": layout.bucket_view,
                **parts, "static_bytes": round(self.static_bytes)}


def per_device(states: ModelStates, layout: Layout) -> DeviceStates:
    """ZERO_PAPER, Figure 1, plus DDP's buckets (its docs: gradient_as_bucket_view saves a copy of the
    gradients) and FSDP's gathered units. Gradients kept whole count as far as they are live at the
    peak (live_gradient_bytes); a shard counts whole, since ZeRO may keep it from step to step."""
    n = layout.world_size
    p, g, o = states.parameter_bytes, states.gradient_bytes, states.optimizer_state_bytes
    live = g if states.live_gradient_bytes is None else states.live_gradient_bytes
    if layout.strategy == "none":
        parts = (p, live, o, 0.0, 0.0)
    elif layout.strategy == "ddp":
        parts = (p, 0.0 if layout.bucket_view else live, o, states.bucket_bytes, 0.0)
    elif layout.strategy == "zero1":
        parts = (p, live, o / n, 0.0, 0.0)
    elif layout.strategy == "zero2":
        parts = (p, g / n, o / n, 0.0, 0.0)
    else:  # zero3, fsdp
        parts = (p / n, g / n, o / n, 0.0, states.gathered_bytes)
    return DeviceStates(layout, *parts)


def per_device_line(line: MemoryLine, states: ModelStates, target: Layout, measured: Layout = SINGLE) -> MemoryLine:
    """The line of peak over batch on one device under `target`, from one measured under `measured`:
    the per-sample part stays, the fixed part trades the states the measured layout held for those
    the target holds. The gradients live at the peak are what the single-process fixed part leaves
    after parameters and optimizer state, none once activations dominate (the peak then falls at the
    start of the backward pass, before zero_grad(set_to_none=True)'s gradients exist): sharding them
    frees only those, while DDP's buckets stay allocated."""
    whole = replace(states, live_gradient_bytes=None)
    single = line.base_bytes - per_device(whole, measured).static_bytes + per_device(whole, SINGLE).static_bytes
    live = min(max(single - states.parameter_bytes - states.optimizer_state_bytes, 0.0), states.gradient_bytes)
    at_peak = replace(states, live_gradient_bytes=live)
    base = single - per_device(at_peak, SINGLE).static_bytes + per_device(at_peak, target).static_bytes
    return MemoryLine(base, line.per_sample_bytes)


def gathered_bytes(model: Any, units: list[Any]) -> int:
    """What FSDP holds unsharded at once with these units (children before parents, as
    models/blocks.py fsdp_units gives them; each parameter in its innermost unit, the rest in the
    root's): the root's unit (FSDP2 keeps it gathered from forward to backward) and UNITS_IN_FLIGHT
    of the largest other. Duck-typed on torch.nn.Module, so this module needs no torch."""
    owner: dict[int, int] = {}
    for index, unit in enumerate(units):
        for parameter in unit.parameters():
            owner.setdefault(id(parameter), index)
    sizes, root = [0] * len(units), 0
    for parameter in model.parameters():
        size = parameter.numel() * parameter.element_size()
        index = owner.get(id(parameter))
        if index is None:
            root += size
        else:
            sizes[index] += size
    return root + UNITS_IN_FLIGHT * max(sizes, default=0)
