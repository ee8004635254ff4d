"""The named choices of bsplan's options, one str enum each: the CLI offers their values, the option
dataclasses hold their members, and `Choice.parse` is the one place a value is checked.

A member is a str: it compares, hashes, prints and goes to JSON as its value, so `strategy ==
"ddp"` and `{"ddp": ...}[strategy]` work wherever a plain string did. Where a command offers only
some of a choice's values (a probe runs ddp or fsdp, not ZeRO), the smaller enum is made here from
the larger one, so the values are written once.
"""

from __future__ import annotations

from enum import Enum
from typing import Iterable, TypeVar

from bsplan.planning.errors import BadInput

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A named choice of an option."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def parse(cls: type[C], value: object, option: str) -> C:
        """The member a value names; anything else is refused with one sentence naming the choices."""
        try:
            return cls(value)
        except ValueError:
            raise BadInput(f"unknown {option} {str(value)!r}: choose from {', '.join(cls.values())}") from None

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(member.value) for member in cls)


def _choice(name: str, values: Iterable[object]) -> type[Choice]:
    """A choice made of others' values (members of a larger choice, or one more), in their order."""
    return Choice(name, [(str(value), str(value)) for value in values], module=__name__)  # type: ignore[return-value]


class Precision(Choice):
    """fp32; autocast to bf16 or fp16; or mixed: bf16 weights and gradients with fp32 master copies and
    optimizer state (models/knobs.py MasterWeights; with --params, the memory model's 2 + 2 + 12 bytes)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    mixed = "mixed"


class Strategy(Choice):
    """How training spreads over devices: one process, or a data-parallel strategy."""

    none = "none"
    ddp = "ddp"
    zero1 = "zero1"
    zero2 = "zero2"
    zero3 = "zero3"
    fsdp = "fsdp"


class Mode(Choice):
    train = "train"  # forward, backward and optimizer step
    infer = "infer"  # forward under inference_mode


class Search(Choice):
    predict = "predict"  # aim at the boundary from the trials' memory line
    bisect = "bisect"  # double, then bisect


class Optimizer(Choice):
    """The optimizers plan's learning-rate rules and the memory model know."""

    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"
    lamb = "lamb"
    lars = "lars"


class Scaling(Choice):
    auto = "auto"  # the optimizer's own rule
    linear = "linear"
    sqrt = "sqrt"
    none = "none"


class Method(Choice):
    """How `bsplan estimate` measures a step: traced with fake tensors (no memory, no compute), or run
    for real on the CPU at small batches."""

    trace = "trace"
    run = "run"


class ProbeLimit(Choice):
    """Which of a probe's limits a plan takes: the recommended batch (keeps headroom) or the largest."""

    recommended = "recommended"
    max = "max"


class ExportFormat(Choice):
    """What one tool reads: a DeepSpeed config, Hugging Face TrainingArguments, a LightningCLI config,
    torchrun's arguments."""

    deepspeed = "deepspeed"
    hf = "hf"
    lightning = "lightning"
    torchrun = "torchrun"


# What a model run can do (autocast), the strategies a probe runs its ranks under, and what plan can
# also do: compare them all.
RunPrecision = _choice("RunPrecision", (Precision.fp32, Precision.bf16, Precision.fp16, Precision.mixed))
ProbeStrategy = _choice("ProbeStrategy", (Strategy.ddp, Strategy.fsdp))
PlanStrategy = _choice("PlanStrategy", (*Strategy, "auto"))
PlanFormat = _choice("PlanFormat", ("table", "json", *ExportFormat))
