"""Learning-rate scaling and warmup for a new global batch, each rule with the paper it comes from.

docs/plan.md gives the formulas and what each paper measured. Pure arithmetic: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bsplan.planning.choices import Optimizer
from bsplan.planning.errors import BadInput
from bsplan.planning.record import Record

GOYAL = "Goyal et al. 2017, arXiv:1706.02677"
KRIZHEVSKY = "Krizhevsky 2014, arXiv:1404.5997"
MALLADI = "Malladi et al. 2022, arXiv:2205.10287"
LARS = "You et al. 2017 (LARS), arXiv:1708.03888"
LAMB = "You et al. 2019 (LAMB), arXiv:1904.00962"
MA_YARATS = "Ma & Yarats 2019, arXiv:1910.04209"
WU_HE = "Wu & He 2018, arXiv:1803.08494"

ADAM_FAMILY = frozenset({Optimizer.adam, Optimizer.adamw, Optimizer.lamb})  # the rest (sgd, lars) are SGD with momentum

# Goyal et al. 2017, section 2.2: warm up over the first 5 epochs when the linear rule raises the rate.
GOYAL_WARMUP_EPOCHS = 5

# What --scaling auto picks for each optimizer, and where that rule comes from.
_AUTO_RULE = {
    # Goyal et al. 2017, section 2.1: multiply the learning rate by k when the minibatch grows k-fold.
    "sgd": ("linear", f"{GOYAL} (linear scaling rule)"),
    # LARS extends SGD with momentum and trains with its gradual warmup; its paper tunes the global
    # rate per batch size rather than stating a rule, so the SGD rule is the starting point.
    "lars": ("linear", f"{GOYAL}; {LARS} (tunes the global rate per batch: start here, then tune)"),
    # Krizhevsky 2014: sqrt(k) keeps the variance of the gradient estimate constant;
    # Malladi et al. 2022 derive the square-root rule for Adam and RMSprop from their SDE.
    "adam": ("sqrt", f"{MALLADI}; {KRIZHEVSKY} (square-root scaling rule)"),
    "adamw": ("sqrt", f"{MALLADI}; {KRIZHEVSKY} (square-root scaling rule)"),
    # You et al. 2019 scale the rate by the square root of the batch in their untuned-LAMB runs.
    "lamb": ("sqrt", f"{LAMB} (square-root scaling, as in its untuned-LAMB runs)"),
}
_FACTOR = {"linear": lambda k: k, "sqrt": math.sqrt, "none": lambda k: 1.0}


@dataclass(frozen=True)
class LearningRate(Record):
    """The reference recipe's rate carried to the new global batch."""

    value: float
    base_lr: float
    base_batch: int
    rule: str  # "linear", "sqrt" or "none"
    factor: float  # value / base_lr
    source: str

    @property
    def grows_linearly(self) -> bool:
        return self.rule == "linear" and self.factor > 1


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps, counted the way data loaders count them (a last partial batch is a step)."""

    dataset_size: int
    epochs: float | None
    steps_per_epoch: int
    total_steps: int | None

    @classmethod
    def of(cls, dataset_size: int, epochs: float | None, global_batch: int) -> Schedule:
        per_epoch = math.ceil(dataset_size / global_batch)
        total = None if epochs is None else math.ceil(epochs * per_epoch)
        return cls(dataset_size, epochs, per_epoch, total)


@dataclass(frozen=True)
class Warmup(Record):
    """A linear ramp of the learning rate from start_lr to the planned rate."""

    steps: int | None  # optimizer steps; None when known only in epochs (no --dataset-size)
    epochs: float | None
    start_lr: float
    rule: str
    source: str


def scale_learning_rate(
    base_lr: float, base_batch: int, global_batch: int, scaling: str, optimizer: str
) -> LearningRate:
    """lr = base_lr x f(global / base), f from --scaling (auto: the optimizer's own rule)."""
    if scaling == "auto":
        rule, source = _AUTO_RULE[optimizer]
    elif scaling == "none":
        rule, source = "none", "--scaling none: the reference rate unchanged"
    else:
        rule, source = scaling, f"--scaling {scaling}: " + (GOYAL if scaling == "linear" else f"{KRIZHEVSKY}; {MALLADI}")
    factor = _FACTOR[rule](global_batch / base_batch)
    return LearningRate(_round(base_lr * factor), base_lr, base_batch, rule, factor, source)


def adam_warmup_steps(beta2: float) -> int:
    """Ma & Yarats 2019: untuned linear warmup over 2 / (1 - beta2) steps, the time Adam's
    second-moment average needs before its adaptive step sizes can be trusted."""
    return math.ceil(round(2 / (1 - beta2), 6))


def choose_warmup(
    *,
    warmup_steps: int | None,
    warmup_epochs: float | None,
    warmup_ratio: float | None,
    optimizer: str,
    beta2: float,
    learning_rate: LearningRate | None,
    schedule: Schedule | None,
) -> Warmup | None:
    """The warmup the user gave, or the rule that applies; None where no rule applies and none was given."""
    start = learning_rate.base_lr if learning_rate is not None and learning_rate.grows_linearly else 0.0
    per_epoch = None if schedule is None else schedule.steps_per_epoch
    if warmup_steps is not None:
        epochs = None if per_epoch is None else warmup_steps / per_epoch
        return Warmup(warmup_steps, epochs, start, "--warmup-steps", "given")
    if warmup_epochs is not None:
        return Warmup(_epochs_to_steps(warmup_epochs, per_epoch), warmup_epochs, start, "--warmup-epochs", "given")
    if warmup_ratio is not None:
        if schedule is None or schedule.total_steps is None:
            raise BadInput("--warmup-ratio is a fraction of the total steps: give --dataset-size and --epochs too")
        steps = math.ceil(warmup_ratio * schedule.total_steps)
        return Warmup(steps, steps / schedule.steps_per_epoch, start, f"--warmup-ratio {warmup_ratio}", "given")
    return _auto_warmup(optimizer, beta2, learning_rate, per_epoch, start)


def _auto_warmup(
    optimizer: str, beta2: float, learning_rate: LearningRate | None, per_epoch: int | None, start: float
) -> Warmup | None:
    adam = adam_warmup_steps(beta2) if optimizer in ADAM_FAMILY else None
    adam_rule = f"at least 2 / (1 - beta2) = {adam} steps for {optimizer} (beta2 {beta2:g})"
    if learning_rate is not None and learning_rate.grows_linearly:
        rule = f"{GOYAL_WARMUP_EPOCHS} epochs, as linear scaling raised the rate {learning_rate.factor:g}x"
        steps = _epochs_to_steps(GOYAL_WARMUP_EPOCHS, per_epoch)
        if adam is None:
            return Warmup(steps, GOYAL_WARMUP_EPOCHS, start, rule, GOYAL)
        source = f"{GOYAL}; {MA_YARATS}"
        if steps is None or per_epoch is None:
            return Warmup(None, GOYAL_WARMUP_EPOCHS, start, f"{rule}, and {adam_rule}", source)
        longer = max(steps, adam)
        return Warmup(longer, longer / per_epoch, start, f"{rule}, and {adam_rule}", source)
    if adam is not None:
        return Warmup(adam, None if per_epoch is None else adam / per_epoch, start, adam_rule, MA_YARATS)
    if learning_rate is not None:
        return Warmup(0, 0.0, start, "none: the scaled rate is not above the reference rate", GOYAL)
    return None


def _epochs_to_steps(epochs: float, per_epoch: int | None) -> int | None:
    return None if per_epoch is None else math.ceil(epochs * per_epoch)


def _round(value: float) -> float:
    """Six significant figures: 3.2, not 3.2000000000000006; far finer than any rate is tuned."""
    return float(f"{value:.6g}")
