"""The search for the largest batch that fits: a pure function over a `run(batch) -> Trial`
callable, so it is tested against fakes in microseconds and knows nothing of devices or models.

Training memory is close to affine in the batch (design.md section 5): the peak of a step's
forward and backward is static + per-sample x b. Two cheap trials at small batches give the
line; the search jumps to where it crosses the memory limit and confirms the boundary with one
fitting and one failing trial. Where memory is not affine (cuDNN algorithm switches, attention
kernels, allocator rounding) the prediction misses; every candidate stays strictly inside the
bracket of the largest fit and the smallest failure, and bisection takes over whenever
predictions stop halving it, so the answer is exact in every case, only slower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bsplan.result import Trial

# The second trial is this many times the first: far enough apart that allocator rounding and
# per-call constants do not swamp the per-sample slope, still a small, cheap batch.
SECOND_POINT_FACTOR = 8


@dataclass(frozen=True)
class SearchOutcome:
    max_fit: int | None  # largest batch that fitted; None when the smallest did not
    first_fail: int | None  # smallest batch that failed; None when none did
    capped: bool  # every batch up to max_batch fitted


class _Bracket:
    """What the trials so far say, in units of `multiple_of`."""

    def __init__(self) -> None:
        self.fit: int | None = None  # largest unit that fitted
        self.fail: int | None = None  # smallest unit that failed
        self.step_peaks: dict[int, int] = {}  # unit -> peak bytes of a fitting trial's forward and backward

    def record(self, unit: int, trial: Trial) -> None:
        if trial.fits:
            self.fit = unit if self.fit is None else max(self.fit, unit)
            if trial.step_peak_bytes is not None:
                self.step_peaks[unit] = trial.step_peak_bytes
        else:
            self.fail = unit if self.fail is None else min(self.fail, unit)

    def width(self) -> float:
        return float("inf") if self.fail is None or self.fit is None else self.fail - self.fit

    def predicted_boundary(self, limit_bytes: int, multiple_of: int) -> int | None:
        """The largest unit whose predicted peak fits, on the line through the two largest fitting
        trials (the nearest the boundary, so the local slope); None without a rising line."""
        if len(self.step_peaks) < 2:
            return None
        (u1, p1), (u2, p2) = sorted(self.step_peaks.items())[-2:]
        slope = (p2 - p1) / ((u2 - u1) * multiple_of)
        if slope <= 0:
            return None
        return int((limit_bytes - p2) / slope // multiple_of) + u2


def find_max_batch(
    run: Callable[[int], Trial], min_batch: int, max_batch: int, multiple_of: int = 1, limit_bytes: int | None = None
) -> SearchOutcome:
    """The exact largest multiple of `multiple_of` in [min_batch, max_batch] that fits, assuming a
    batch that fails makes every larger one fail too. With `limit_bytes` (the device's memory)
    the search predicts the boundary from the trials' step peaks; without, it doubles and bisects."""
    low = -(-min_batch // multiple_of)
    top = max_batch // multiple_of
    if low > top:
        raise ValueError(f"no multiple of {multiple_of} lies in [{min_batch}, {max_batch}]")
    bracket = _Bracket()
    predicted: list[bool] = []  # whether each candidate after the first came from a prediction
    widths: list[float] = []
    unit = low
    while True:
        bracket.record(unit, run(unit * multiple_of))
        widths.append(bracket.width())
        if bracket.fit is None:
            return SearchOutcome(None, low * multiple_of, capped=False)
        if bracket.fit == top:
            return SearchOutcome(top * multiple_of, None, capped=True)
        if bracket.width() == 1:
            return SearchOutcome(bracket.fit * multiple_of, bracket.fail * multiple_of, capped=False)  # type: ignore[operator]
        unit, from_prediction = _next_unit(bracket, top, limit_bytes, multiple_of, predicted, widths)
        predicted.append(from_prediction)


def _next_unit(
    bracket: _Bracket, top: int, limit_bytes: int | None, multiple_of: int, predicted: list[bool], widths: list[float]
) -> tuple[int, bool]:
    """The next unit to try, strictly inside the bracket: the predicted boundary while predictions
    keep halving the bracket, else the bisection point (doubling while nothing has failed)."""
    fit = bracket.fit
    assert fit is not None
    ceiling = top if bracket.fail is None else bracket.fail - 1
    if len(widths) == 1 and limit_bytes is not None:
        return min(ceiling, fit * SECOND_POINT_FACTOR), False
    guess = None if limit_bytes is None else bracket.predicted_boundary(limit_bytes, multiple_of)
    # A prediction that a trial already refuted (a boundary below a fit or at a failure) is stale.
    refuted = guess is None or guess < fit or (bracket.fail is not None and guess >= bracket.fail)
    stalled = len(predicted) >= 2 and predicted[-1] and predicted[-2] and widths[-1] > widths[-3] / 2
    if not refuted and not stalled:
        return min(max(guess, fit + 1), ceiling), True  # type: ignore[type-var]
    if bracket.fail is None:
        return min(top, fit * 2), False
    return (fit + bracket.fail) // 2, False
