"""The gradient noise scale's arithmetic: McCandlish et al.'s unbiased estimates from two batch sizes,
their average and uncertainty over steps, a moving average for training loops, what a plan makes of
the number, and the result of `bsplan noise`. Pure: no torch (docs/noise.md has the method).

With G the true gradient and Σ the per-sample covariance of the gradient, a batch of B samples drawn
independently gives E|G_B|² = |G|² + tr(Σ)/B. Two batch sizes make that two equations in |G|² and
tr(Σ); the simple noise scale is B_simple = tr(Σ) / |G|².
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bsplan.planning import checks
from bsplan.planning.errors import BadInput
from bsplan.planning.record import Record

NOISE_SCHEMA = "bsplan.noise/1"
MCCANDLISH = "McCandlish et al. 2018, arXiv:1812.06162"
MERRILL = "Merrill et al. 2025, arXiv:2505.23971"
# The stopping rule is read only after this many steps: a standard error from fewer is itself noise.
MIN_STEPS = 30
# B_small when neither --small-batch nor a smaller saved probe gives one, and B_big / B_small.
DEFAULT_SMALL_BATCH = 32
DEFAULT_BIG_FACTOR = 8
BOOTSTRAP_LEVEL = 0.9  # the interval noise_scale_low .. noise_scale_high covers 90% of the bootstrap replicates
BOOTSTRAP_RESAMPLES = 1000
# A plan warns when the global batch exceeds this many noise scales: the training then takes more than
# 1 + 2 = 3 times the fewest examples, while its steps are within 1 + 1/2 = 1.5 times the fewest.
EFFICIENT_MULTIPLE = 2.0


@dataclass(frozen=True)
class NoiseSample(Record):
    """One step's unbiased estimates of |G|² and tr(Σ) (each may come out negative on its own)."""

    gradient_norm_squared: float
    trace_sigma: float


def unbiased(small_sq: float, big_sq: float, small_batch: float, big_batch: float) -> NoiseSample:
    """McCandlish et al. 2018, Appendix A.1: |G_small|² and |G_big|², the squared norms of gradients
    averaged over B_small and B_big samples, give unbiased estimates of |G|² and tr(Σ)."""
    if not 0 < small_batch < big_batch:
        raise ValueError(f"the batch sizes must satisfy 0 < B_small < B_big, not {small_batch} and {big_batch}")
    norm = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
    trace = (small_sq - big_sq) / (1 / small_batch - 1 / big_batch)
    return NoiseSample(norm, trace)


def ratio(samples: Sequence[NoiseSample]) -> float | None:
    """B_simple from the steps: numerator and denominator averaged separately, then divided (the
    mean of per-step ratios is biased, and a step's |G|² estimate can be near zero or negative).
    None while the mean |G|² is not positive: the noise still hides the gradient."""
    norm = sum(s.gradient_norm_squared for s in samples)
    return None if norm <= 0 else sum(s.trace_sigma for s in samples) / norm


def relative_error(samples: Sequence[NoiseSample]) -> float:
    """The standard error of ratio() over its value, by the delta method for a ratio of means;
    infinite while it is undefined (fewer than two steps, or no positive estimate)."""
    n = len(samples)
    value = ratio(samples)
    if n < 2 or value is None or value <= 0:
        return math.inf
    norms = [s.gradient_norm_squared for s in samples]
    traces = [s.trace_sigma for s in samples]
    mean_norm, mean_trace = sum(norms) / n, sum(traces) / n
    var_norm = sum((x - mean_norm) ** 2 for x in norms) / (n - 1)
    var_trace = sum((x - mean_trace) ** 2 for x in traces) / (n - 1)
    cov = sum((a - mean_norm) * (b - mean_trace) for a, b in zip(norms, traces)) / (n - 1)
    variance = (var_trace - 2 * value * cov + value**2 * var_norm) / (n * mean_norm**2)
    return math.sqrt(max(variance, 0.0)) / value


def bootstrap(samples: Sequence[NoiseSample], level: float = BOOTSTRAP_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
              seed: int = 0) -> tuple[float | None, float | None]:
    """A percentile interval of ratio() over steps resampled with replacement (seeded: the same
    steps give the same interval). A replicate without a positive |G|² counts as an unbounded noise
    scale, so an interval that reaches it has no upper end (None)."""
    if len(samples) < 2:
        return None, None
    rng = random.Random(seed)
    replicates = sorted(math.inf if (value := ratio(rng.choices(samples, k=len(samples)))) is None else value
                        for _ in range(resamples))
    tail = (1 - level) / 2
    low, high = replicates[int(tail * (resamples - 1))], replicates[math.ceil((1 - tail) * (resamples - 1))]
    return (None if math.isinf(low) else low), (None if math.isinf(high) else high)


class MovingNoise:
    """Exponential moving averages of the |G|² and tr(Σ) estimates, bias-corrected as Adam's moments
    are, so the value is readable from the first step; the noise scale changes as training goes, which
    a plain average over the run would hide. `beta` 0.99 averages over about the last 100 steps."""

    def __init__(self, beta: float = 0.99) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"beta must lie in [0, 1), not {beta}")
        self.beta = beta
        self.steps = 0
        self._norm = 0.0
        self._trace = 0.0

    def update(self, sample: NoiseSample) -> None:
        self.steps += 1
        self._norm = self.beta * self._norm + (1 - self.beta) * sample.gradient_norm_squared
        self._trace = self.beta * self._trace + (1 - self.beta) * sample.trace_sigma

    @property
    def gradient_norm_squared(self) -> float | None:
        return None if self.steps == 0 else self._norm / (1 - self.beta**self.steps)

    @property
    def trace_sigma(self) -> float | None:
        return None if self.steps == 0 else self._trace / (1 - self.beta**self.steps)

    @property
    def value(self) -> float | None:
        """B_simple now; None before the first step, or while the |G|² average is not positive."""
        return None if self.steps == 0 or self._norm <= 0 else self._trace / self._norm


@dataclass(frozen=True)
class NoiseOptions:
    """What `bsplan noise` is asked; None batch sizes take the defaults (docs/noise.md)."""

    small_batch: int | None = None
    big_batch: int | None = None
    max_steps: int = 200
    rel_error: float = 0.1
    checkpoint: Path | None = None
    allow_synthetic: bool = False
    device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks.at_least("--small-batch", self.small_batch)
        checks.at_least("--big-batch", self.big_batch, 2)
        checks.at_least("--max-steps", self.max_steps, 2)
        checks.positive("--rel-error", self.rel_error)
        if self.small_batch is not None and self.big_batch is not None:
            batch_sizes(self.small_batch, self.big_batch, None)
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise BadInput(f"--checkpoint {self.checkpoint} does not exist" if not self.checkpoint.exists()
                           else f"--checkpoint {self.checkpoint} is not a file")


def batch_sizes(small: int | None, big: int | None, recommended: int | None) -> tuple[int, int]:
    """B_small and B_big: given, or DEFAULT_SMALL_BATCH (a saved probe's smaller recommended batch:
    only B_small has to fit, since B_big is accumulated from micro-batches of it) and 8 times it;
    with only B_big given, B_small is its largest divisor up to an eighth of it (and the probe's)."""
    if small is None:
        ceiling = DEFAULT_SMALL_BATCH if big is None else max(1, big // DEFAULT_BIG_FACTOR)
        ceiling = min(ceiling, recommended or ceiling)
        small = ceiling if big is None else max(d for d in range(1, ceiling + 1) if big % d == 0)
    big = DEFAULT_BIG_FACTOR * small if big is None else big
    if big <= small:
        raise BadInput(f"--big-batch {big} must be larger than --small-batch {small}: "
                       "the noise scale comes from their difference")
    if big % small:
        raise BadInput(f"--big-batch {big} is not a multiple of --small-batch {small}: the big batch is summed from "
                       "micro-batches of the small one")
    return small, big


@dataclass(frozen=True)
class ExactNoise(Record):
    """The noise scale over a finite dataset from every sample's own gradient g_i (docs/noise.md):
    G = mean of g_i, tr(Σ) = mean of |g_i - G|², the covariance of one sample drawn at random."""

    samples: int
    gradient_norm_squared: float
    trace_sigma: float

    @property
    def noise_scale(self) -> float:
        return self.trace_sigma / self.gradient_norm_squared

    def document(self) -> dict[str, Any]:
        return {**super().document(), "noise_scale": self.noise_scale}


@dataclass(frozen=True)
class NoiseResult(Record):
    """What `bsplan noise` measured (schema bsplan.noise/1, docs/json.md)."""

    model: str
    device: str
    data: str  # "train_batches", or "make_batch (synthetic)" with --allow-synthetic
    checkpoint: str | None
    small_batch: int
    big_batch: int
    steps: int
    stopped: str  # "rel-error", "max-steps" or "interrupted"
    noise_scale: float | None
    noise_scale_low: float | None
    noise_scale_high: float | None
    relative_error: float | None  # the standard error of noise_scale over it (delta method); None while undefined
    gradient_norm_squared: float | None  # the mean of the steps' unbiased estimates
    trace_sigma: float | None
    max_steps: int
    rel_error: float
    seed: int
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def interrupted(self) -> bool:
        return self.stopped == "interrupted"

    @classmethod
    def of(cls, samples: Sequence[NoiseSample], notes: Sequence[str] = (), **rest: Any) -> NoiseResult:
        """The result of the measured steps: the ratio of the means, its bootstrap interval, and a note
        where the number cannot be read as a noise scale."""
        n, value = len(samples), ratio(samples)
        low, high = bootstrap(samples, seed=rest.get("seed", 0))
        error = relative_error(samples)
        notes = list(notes)
        if n and value is None:
            notes.append("the mean |G|² estimate is not positive: the gradient noise hides the gradient at these batch sizes, "
                         "so the noise scale is larger than they resolve; raise --big-batch or --max-steps")
        elif value is not None and value <= 0:
            notes.append("the mean tr(Σ) estimate is not positive: the gradient barely varies between batches of "
                         "--small-batch, so the noise scale is below what they resolve; lower --small-batch")
        if 0 < n < MIN_STEPS:
            notes.append(f"only {n} steps measured: an interval and a standard error from so few are themselves noise "
                         f"(at least {MIN_STEPS} steps: raise --max-steps)")
        return cls(
            steps=n, noise_scale=value, noise_scale_low=low, noise_scale_high=high,
            relative_error=None if math.isinf(error) else error,
            gradient_norm_squared=sum(s.gradient_norm_squared for s in samples) / n if n else None,
            trace_sigma=sum(s.trace_sigma for s in samples) / n if n else None, notes=tuple(notes), **rest,
        )

    def document(self) -> dict[str, Any]:
        return {"schema": NOISE_SCHEMA, **super().document(), "interval": BOOTSTRAP_LEVEL,
                "method": f"B_simple = tr(Sigma) / |G|^2, {MCCANDLISH}, Appendix A.1"}


@dataclass(frozen=True)
class NoiseEfficiency(Record):
    """What a global batch G costs against the noise scale B (McCandlish et al. 2018, section 2.3):
    S = S_min (1 + B/G) optimizer steps and E = E_min (1 + G/B) training examples to reach a loss."""

    noise_scale: float
    source: str  # "--noise-scale", or the saved result it was read from

    def steps_ratio(self, global_batch: int) -> float:
        return 1 + self.noise_scale / global_batch

    def examples_ratio(self, global_batch: int) -> float:
        return 1 + global_batch / self.noise_scale

    @property
    def largest_efficient_batch(self) -> int:
        """The largest global batch a plan does not warn about: EFFICIENT_MULTIPLE noise scales."""
        return max(1, math.floor(EFFICIENT_MULTIPLE * self.noise_scale))

    def efficient_target(self, unit: int) -> int | None:
        """The largest efficient global batch that a plan can split: a multiple of `unit` (devices x
        --multiple-of), the --target to plan again with; None when one unit is already beyond it."""
        return self.largest_efficient_batch // unit * unit or None

    def at(self, global_batch: int, unit: int) -> dict[str, Any]:
        """The plan's "noise" field (docs/plan.md), for a plan whose global batches are multiples of `unit`."""
        return {**self.to_dict(), "steps_ratio": self.steps_ratio(global_batch),
                "examples_ratio": self.examples_ratio(global_batch), "largest_efficient_batch": self.largest_efficient_batch,
                "efficient_target": self.efficient_target(unit)}

    def describe(self, global_batch: int) -> str:
        return (f"{self.noise_scale:.4g} ({self.source}): {self.steps_ratio(global_batch):.3g}x the fewest optimizer steps "
                f"(1 + B/G), {self.examples_ratio(global_batch):.3g}x the fewest training examples (1 + G/B); "
                f"largest efficient global batch {self.largest_efficient_batch} ({EFFICIENT_MULTIPLE:g}B)")


def noise_efficiency(given: str | float | None) -> NoiseEfficiency | None:
    """`plan --noise-scale`: a number, or a saved `bsplan noise --output FILE` result."""
    if given is None:
        return None
    try:
        value, source = float(given), "--noise-scale"
    except ValueError:
        value, source = _saved_noise_scale(Path(str(given))), str(given)
    checks.positive("--noise-scale", value)
    return NoiseEfficiency(value, source)


def _saved_noise_scale(path: Path) -> float:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"--noise-scale {path} is neither a number nor a file: "
                       "give B, or a saved `bsplan noise --output` result") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"cannot read --noise-scale {path} as a saved noise result: {error}") from None
    if not isinstance(data, dict) or data.get("schema") != NOISE_SCHEMA:
        raise BadInput(f"{path} is not a {NOISE_SCHEMA} result of `bsplan noise`")
    if not isinstance(data.get("noise_scale"), (int, float)):
        raise BadInput(f"{path} holds no noise scale (its measurement did not resolve one): measure again")
    return float(data["noise_scale"])
