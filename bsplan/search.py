"""The search for the largest batch that fits: a pure function over a `fits(batch)` callable, so
it is tested against a fake in microseconds and knows nothing of devices or models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class SearchOutcome:
    max_fit: int | None  # largest batch that fitted; None when the smallest did not
    first_fail: int | None  # smallest batch that failed; None when none did
    capped: bool  # every batch up to max_batch fitted


def find_max_batch(fits: Callable[[int], bool], min_batch: int, max_batch: int, multiple_of: int = 1) -> SearchOutcome:
    """Double from min_batch until a trial fails (or max_batch fits), then bisect the bracket down
    to one step of `multiple_of`: the exact boundary, assuming a batch that fails makes every larger
    one fail too. Only multiples of `multiple_of` within [min_batch, max_batch] are tried."""
    low_unit = -(-min_batch // multiple_of)
    top_unit = max_batch // multiple_of
    if low_unit > top_unit:
        raise ValueError(f"no multiple of {multiple_of} lies in [{min_batch}, {max_batch}]")
    fitted: int | None = None
    unit = low_unit
    while fits(unit * multiple_of):
        fitted = unit
        if unit == top_unit:
            return SearchOutcome(unit * multiple_of, None, capped=True)
        unit = min(unit * 2, top_unit)
    failed = unit
    if fitted is None:
        return SearchOutcome(None, failed * multiple_of, capped=False)
    while failed - fitted > 1:
        middle = (fitted + failed) // 2
        if fits(middle * multiple_of):
            fitted = middle
        else:
            failed = middle
    return SearchOutcome(fitted * multiple_of, failed * multiple_of, capped=False)
