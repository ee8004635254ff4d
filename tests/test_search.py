"""The search against a fake fits-function: exact boundaries without any model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bsplan.search import find_max_batch


class Boundary:
    """Fits up to `largest` (None: nothing fits); counts the trials."""

    def __init__(self, largest: int | None) -> None:
        self.largest = largest
        self.tried: list[int] = []

    def __call__(self, batch: int) -> bool:
        self.tried.append(batch)
        return self.largest is not None and batch <= self.largest


@given(largest=st.integers(1, 5000), min_batch=st.integers(1, 64), multiple_of=st.sampled_from([1, 2, 8, 32]))
def test_finds_the_exact_boundary_at_the_granularity(largest: int, min_batch: int, multiple_of: int) -> None:
    fits = Boundary(largest)
    outcome = find_max_batch(fits, min_batch, 100_000, multiple_of)
    expected = largest // multiple_of * multiple_of
    lowest = -(-min_batch // multiple_of) * multiple_of
    if expected < lowest:
        assert outcome.max_fit is None and outcome.first_fail == lowest
    else:
        assert outcome.max_fit == expected
        assert outcome.first_fail == expected + multiple_of
    assert all(batch % multiple_of == 0 and batch >= min_batch for batch in fits.tried)
    assert len(set(fits.tried)) == len(fits.tried), "no batch is tried twice"


def test_boundary_of_one_sample() -> None:
    fits = Boundary(300)
    outcome = find_max_batch(fits, 1, 65536)
    assert (outcome.max_fit, outcome.first_fail, outcome.capped) == (300, 301, False)
    assert fits.tried[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def test_fails_at_one() -> None:
    fits = Boundary(None)
    outcome = find_max_batch(fits, 1, 65536)
    assert (outcome.max_fit, outcome.first_fail) == (None, 1)
    assert fits.tried == [1]


def test_never_fails_stops_at_the_cap() -> None:
    fits = Boundary(10**9)
    outcome = find_max_batch(fits, 1, 1000)
    assert (outcome.max_fit, outcome.first_fail, outcome.capped) == (1000, None, True)
    assert fits.tried[-1] == 1000 and fits.tried.count(1000) == 1


def test_cap_on_a_multiple_rounds_down() -> None:
    outcome = find_max_batch(Boundary(10**9), 1, 1000, multiple_of=64)
    assert outcome.max_fit == 960 and outcome.capped


def test_equal_min_and_max_checks_exactly_that_batch() -> None:
    fits = Boundary(40)
    assert find_max_batch(fits, 37, 37).max_fit == 37
    assert fits.tried == [37]
    fits = Boundary(36)
    outcome = find_max_batch(fits, 37, 37)
    assert (outcome.max_fit, outcome.first_fail) == (None, 37)


def test_boundary_just_below_the_cap() -> None:
    outcome = find_max_batch(Boundary(999), 1, 1000)
    assert (outcome.max_fit, outcome.first_fail) == (999, 1000)


def test_no_multiple_in_range_is_refused() -> None:
    with pytest.raises(ValueError):
        find_max_batch(Boundary(5), 9, 15, multiple_of=16)
