"""The search for the largest batch that fits: a pure function over a `run(batch) -> Trial`
callable, so it is tested against fakes in microseconds and knows nothing of devices or models.

Training memory is close to affine in the batch (docs/probe.md): the peak of a step's
forward and backward is static + per-sample x b. Two cheap trials at small batches give the
line; the search jumps to where it crosses the memory limit and confirms the boundary with one
fitting and one failing trial. Where memory is not affine (cuDNN algorithm switches, attention
kernels, allocator rounding) the prediction misses; every candidate stays strictly inside the
bracket of the largest fit and the smallest failure, and bisection takes over whenever
predictions stop halving it, so the answer is exact in every case, only slower.

A limit from outside the process is a band, not an edge: the same batch fits in one fresh process
and not in the next. There the search is given the band's width (`tolerance`) and stops once the
bracket is that narrow, or once a fit's peak comes that close to the limit (a larger batch would
meet the band); a failed prediction is retried that far below, then twice as far each time the
step back fails too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from bsplan.planning.results import Trial

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
        self.failures: list[int] = []  # the failed units, in the order tried
        # unit -> a fitting trial's phase peaks: its forward's, and its forward and backward's
        self.phase_peaks: dict[int, tuple[int | None, int | None]] = {}

    def record(self, unit: int, trial: Trial) -> None:
        if trial.fits:
            self.fit = unit if self.fit is None else max(self.fit, unit)
            self.phase_peaks[unit] = (trial.forward_peak_bytes, trial.step_peak_bytes)
        else:
            self.fail = unit if self.fail is None else min(self.fail, unit)
            self.failures.append(unit)

    def slopes_and_crossings(self, limit_bytes: int, multiple_of: int) -> list[tuple[float, int] | None]:
        """For each phase (forward; forward and backward): the slope in bytes per sample of the line
        through the two largest fitting trials (the nearest the boundary, so the local slope) and
        the unit where it crosses the limit; None where there is no rising line."""
        lines: list[tuple[float, int] | None] = []
        for phase in range(2):
            points = sorted((unit, peaks[phase]) for unit, peaks in self.phase_peaks.items() if peaks[phase] is not None)
            line = None
            if len(points) >= 2:
                (u1, p1), (u2, p2) = points[-2:]
                slope = (p2 - p1) / ((u2 - u1) * multiple_of)
                if slope > 0:
                    line = (slope, int((limit_bytes - p2) / slope // multiple_of) + u2)
            lines.append(line)
        return lines


def find_max_batch(
    run: Callable[[int], Trial], min_batch: int, max_batch: int, multiple_of: int = 1, limit_bytes: int | None = None,
    tolerance: float = 0.0, known: Sequence[Trial] = (),
) -> SearchOutcome:
    """The largest multiple of `multiple_of` in [min_batch, max_batch] that fits, assuming a batch
    that fails makes every larger one fail too: exact, or within `tolerance` (a fraction of the
    batch) of the smallest failure where the edge is a band. With `limit_bytes` (the device's
    memory) the search predicts the boundary from the trials' phase peaks; without, it doubles and
    bisects. Under a band the predictions stop once a step back below a failed one fails too: the
    line aims at a limit the peaks do not quite meet. `known` trials (of an earlier search in the
    same range) are taken as run."""
    low = -(-min_batch // multiple_of)
    top = max_batch // multiple_of
    if low > top:
        raise ValueError(f"no multiple of {multiple_of} lies in [{min_batch}, {max_batch}]")
    bracket = _Bracket()
    for trial in known:
        if trial.batch % multiple_of == 0 and low <= trial.batch // multiple_of <= top:
            bracket.record(trial.batch // multiple_of, trial)
    kinds: list[str] = []  # how each candidate after the first was chosen
    widths: list[int] = []  # the bracket's width after each trial (the cap standing in for a failure)
    unit, aim = low, limit_bytes
    if bracket.fit == top:
        return SearchOutcome(top * multiple_of, None, capped=True)
    if bracket.fit is not None and bracket.fail is not None and bracket.fail - bracket.fit <= _band(bracket.fail, tolerance):
        return SearchOutcome(bracket.fit * multiple_of, bracket.fail * multiple_of, capped=False)  # known settles it
    if bracket.fit is None and bracket.fail is not None and bracket.fail <= low:
        return SearchOutcome(None, low * multiple_of, capped=False)  # known: the smallest failed
    if bracket.fit is not None:  # go on from what is known
        widths.append((top + 1 if bracket.fail is None else bracket.fail) - bracket.fit)
        unit, kind = _next_unit(bracket, bracket.fit, top, aim, multiple_of, tolerance, kinds, widths)
        kinds.append(kind)
    while True:
        trial = run(unit * multiple_of)
        bracket.record(unit, trial)
        if tolerance and kinds[-1:] == ["retry"] and not trial.fits:
            aim = None
        if bracket.fit is None:
            return SearchOutcome(None, low * multiple_of, capped=False)
        if bracket.fit == top:
            return SearchOutcome(top * multiple_of, None, capped=True)
        if bracket.fail is not None and bracket.fail - bracket.fit <= _band(bracket.fail, tolerance):
            return SearchOutcome(bracket.fit * multiple_of, bracket.fail * multiple_of, capped=False)
        if tolerance and limit_bytes is not None and trial.fits and unit == bracket.fit and _near(trial, limit_bytes, tolerance):
            return SearchOutcome(bracket.fit * multiple_of, None if bracket.fail is None else bracket.fail * multiple_of, capped=False)
        widths.append((top + 1 if bracket.fail is None else bracket.fail) - bracket.fit)
        unit, kind = _next_unit(bracket, unit, top, aim, multiple_of, tolerance, kinds, widths)
        kinds.append(kind)


def _band(unit: int, tolerance: float) -> int:
    """How far below a failure a fit settles the search: the next unit down, or the band's width."""
    return max(1, int(unit * tolerance))


def _near(trial: Trial, limit_bytes: int, tolerance: float) -> bool:
    """A fit whose peak (in what the limit counts) is within the band's width of the limit."""
    peak = max(trial.forward_peak_bytes or 0, trial.step_peak_bytes or 0)
    return peak >= (1 - tolerance) * limit_bytes


def _next_unit(
    bracket: _Bracket, last: int, top: int, limit_bytes: int | None, multiple_of: int, tolerance: float, kinds: list[str],
    widths: list[int],
) -> tuple[int, str]:
    """The next unit to try, strictly inside the bracket, and how it was chosen: "grow" (geometric,
    while nothing has failed), "predict" (the predicted boundary, while predictions keep halving
    the bracket), "retry" (below a failed prediction, once: just below, or the band's width),
    "back off" (under a band, twice as far below each failed step back) or "bisect"."""
    fit, fail = bracket.fit, bracket.fail
    assert fit is not None
    ceiling = top if fail is None else fail - 1
    if tolerance and fail is not None and kinds[-1:] in (["retry"], ["back off"]) and last == fail:
        back = fail - 2 * (bracket.failures[-2] - fail)
        if back > fit:
            return back, "back off"
        return (fit + fail) // 2, "bisect"
    guess, settled = None, True
    if limit_bytes is not None:
        if not kinds:
            return min(ceiling, fit * SECOND_POINT_FACTOR), "grow"
        forward, step = bracket.slopes_and_crossings(limit_bytes, multiple_of)
        # Each phase's peak is a lower bound on the trial's peak, so each line crosses the limit at
        # or beyond the boundary: the nearest crossing is the best guess. At small batches the peak
        # of forward and backward is the end of backward (gradients, which do not grow with the
        # batch) and its line is too flat; it is trusted once it rises at least as fast as the
        # forward's, whose activations it holds at large batches. Until then the batch grows
        # geometrically toward the forward line's crossing, cheaply.
        guess = min((line[1] for line in (forward, step) if line is not None), default=None)
        settled = step is None or forward is None or step[0] >= forward[0]
    if guess is not None and not settled and fail is None and fit * SECOND_POINT_FACTOR < guess:
        return min(ceiling, fit * SECOND_POINT_FACTOR), "grow"
    if guess is not None and fail is not None and guess >= fail:
        # The line crosses at or past a failure: off by a little (rounding, a few bytes per sample)
        # or by much. Just below the failure settles the first at once; it is tried only right
        # after the prediction failed, so a line off by much costs one trial, then bisection.
        if kinds[-1] == "predict" and last == fail:
            return max(fit + 1, fail - _band(fail, tolerance)), "retry"
        guess = None
    stalled = kinds[-2:] in (["predict", "predict"], ["predict", "retry"]) and widths[-1] > widths[-3] / 2
    if guess is not None and guess >= fit and not stalled:
        return min(max(guess, fit + 1), ceiling), "predict"
    if fail is None:
        return min(top, fit * 2), "grow"
    return (fit + fail) // 2, "bisect"
