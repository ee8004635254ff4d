"""The search against fake trials: exact boundaries, in few trials where memory is affine, and
exact still where it is not."""

from __future__ import annotations

from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bsplan.measure.search import find_max_batch
from bsplan.planning.results import Trial

MIB = 2**20


class FakeDevice:
    """A device whose step peak is `memory(batch)` bytes (its forward's `forward(batch)`), failing
    past `limit` (or past `largest`)."""

    def __init__(
        self, memory: Callable[[int], float], limit: int, largest: int | None = None,
        forward: Callable[[int], float] | None = None,
    ) -> None:
        self.memory = memory
        self.forward = forward
        self.limit = limit
        self.largest = largest
        self.tried: list[int] = []

    def __call__(self, batch: int) -> Trial:
        self.tried.append(batch)
        peak = int(self.memory(batch))
        fits = peak <= self.limit if self.largest is None else batch <= self.largest
        if not fits:
            return Trial(batch, False, None, 0.1, None, error="out of memory")
        forward = None if self.forward is None else int(self.forward(batch))
        return Trial(batch, True, peak, 0.1, 1.0, forward_peak_bytes=forward, step_peak_bytes=peak)


def affine(static: float, per_sample: float) -> Callable[[int], float]:
    return lambda batch: static + per_sample * batch


def truth(memory: Callable[[int], float], limit: int) -> int:
    batch = 0
    while memory(batch + 1) <= limit:
        batch += 1
    return batch


@pytest.mark.parametrize(
    ("static", "per_sample"), [(30 * MIB, 11_000), (1 * MIB, 2.7 * MIB), (120 * MIB, 15.8 * MIB), (0, 1000), (299 * MIB, 4096)]
)
def test_affine_memory_is_found_exactly_in_four_trials(static: float, per_sample: float) -> None:
    memory = affine(static, per_sample)
    device = FakeDevice(memory, 300 * MIB, forward=affine(static * 0.9, per_sample * 0.8))
    outcome = find_max_batch(device, 1, 2**20, 1, 300 * MIB)
    expected = truth(memory, 300 * MIB)
    assert (outcome.max_fit, outcome.first_fail) == (expected, expected + 1)
    assert len(device.tried) <= 4, device.tried


# The MLP example's memory (measured): the peak of forward and backward moves from the end of
# backward (gradients) to the end of forward (activations) as the batch grows, a max of two lines,
# so small batches see too flat a slope; the forward's own peak rises at the activations' rate.
MLP_STEP = lambda b: max(10_720_520 + 5192 * (b - 1), 54_489_280 + 11_336 * (b - 4096))  # noqa: E731
MLP_FORWARD = lambda b: 8_000_000 + 9_200 * b  # noqa: E731


def test_convex_memory_grows_until_the_step_line_is_steep_enough() -> None:
    device = FakeDevice(MLP_STEP, 300 * MIB, forward=MLP_FORWARD)
    outcome = find_max_batch(device, 1, 65536, 1, 300 * MIB)
    assert outcome.max_fit == truth(MLP_STEP, 300 * MIB)
    assert device.tried[:5] == [1, 8, 64, 512, 4096]  # cheap trials until the slopes agree
    assert len(device.tried) <= 7, device.tried


def test_convex_memory_without_forward_peaks_falls_back_and_stays_exact() -> None:
    device = FakeDevice(MLP_STEP, 300 * MIB)
    outcome = find_max_batch(device, 1, 65536, 1, 300 * MIB)
    assert outcome.max_fit == truth(MLP_STEP, 300 * MIB)
    assert len(device.tried) <= 12, device.tried


def test_a_jump_in_memory_falls_back_and_stays_exact() -> None:
    # A kernel switch at batch 64 adds 100 MiB of workspace: the line from small batches misleads.
    memory = lambda b: 20 * MIB + 1 * MIB * b + (100 * MIB if b >= 64 else 0)  # noqa: E731
    device = FakeDevice(memory, 300 * MIB)
    outcome = find_max_batch(device, 1, 65536, 1, 300 * MIB)
    assert outcome.max_fit == truth(memory, 300 * MIB) == 180


@settings(max_examples=300, deadline=None)
@given(
    largest=st.integers(0, 50_000),
    min_batch=st.integers(1, 64),
    multiple_of=st.sampled_from([1, 2, 8, 32]),
    static=st.integers(0, 200 * MIB),
    per_sample=st.integers(-1000, 50_000),
    forward_per_sample=st.integers(-1000, 80_000),
    noise=st.integers(0, 5 * MIB),
)
def test_exact_for_any_monotone_boundary_even_with_misleading_peaks(
    largest: int, min_batch: int, multiple_of: int, static: int, per_sample: int, forward_per_sample: int, noise: int
) -> None:
    """Whatever the peaks say (wrong slope, noise), the answer is the true boundary."""
    memory = lambda b: static + per_sample * b + (noise if b % 3 == 0 else 0)  # noqa: E731
    forward = lambda b: static // 2 + forward_per_sample * b  # noqa: E731
    device = FakeDevice(memory, 300 * MIB, largest=largest, forward=forward)
    outcome = find_max_batch(device, min_batch, 100_000, multiple_of, 300 * MIB)
    expected = largest // multiple_of * multiple_of
    lowest = -(-min_batch // multiple_of) * multiple_of
    if expected < lowest:
        assert outcome.max_fit is None and outcome.first_fail == lowest
    else:
        assert outcome.max_fit == expected
        assert outcome.first_fail == expected + multiple_of
    assert all(batch % multiple_of == 0 and batch >= min_batch for batch in device.tried)
    assert len(set(device.tried)) == len(device.tried), "no batch is tried twice"
    assert len(device.tried) <= 2 * 17 + 3  # never much worse than doubling and bisecting


def test_without_a_limit_it_doubles_and_bisects() -> None:
    device = FakeDevice(affine(0, 1), 0, largest=300)
    outcome = find_max_batch(device, 1, 65536)
    assert (outcome.max_fit, outcome.first_fail, outcome.capped) == (300, 301, False)
    assert device.tried[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def test_fails_at_one() -> None:
    device = FakeDevice(affine(0, 1), 300 * MIB, largest=0)
    outcome = find_max_batch(device, 1, 65536, 1, 300 * MIB)
    assert (outcome.max_fit, outcome.first_fail) == (None, 1)
    assert device.tried == [1]


def test_never_fails_stops_at_the_cap() -> None:
    device = FakeDevice(affine(0, 1), 300 * MIB)
    outcome = find_max_batch(device, 1, 1000, 1, 300 * MIB)
    assert (outcome.max_fit, outcome.first_fail, outcome.capped) == (1000, None, True)
    assert device.tried.count(1000) == 1 and len(device.tried) <= 3


def test_cap_on_a_multiple_rounds_down() -> None:
    outcome = find_max_batch(FakeDevice(affine(0, 1), 300 * MIB), 1, 1000, 64, 300 * MIB)
    assert outcome.max_fit == 960 and outcome.capped


def test_equal_min_and_max_checks_exactly_that_batch() -> None:
    device = FakeDevice(affine(0, 1), 300 * MIB, largest=40)
    assert find_max_batch(device, 37, 37, 1, 300 * MIB).max_fit == 37
    assert device.tried == [37]
    device = FakeDevice(affine(0, 1), 300 * MIB, largest=36)
    outcome = find_max_batch(device, 37, 37, 1, 300 * MIB)
    assert (outcome.max_fit, outcome.first_fail) == (None, 37)


def test_boundary_just_below_the_cap() -> None:
    outcome = find_max_batch(FakeDevice(affine(0, 1), 300 * MIB, largest=999), 1, 1000, 1, 300 * MIB)
    assert (outcome.max_fit, outcome.first_fail) == (999, 1000)


def test_no_multiple_in_range_is_refused() -> None:
    with pytest.raises(ValueError):
        find_max_batch(FakeDevice(affine(0, 1), 1, largest=5), 9, 15, 16)


def test_a_failed_recheck_under_an_outside_limit_keeps_the_failure_and_goes_on_from_the_trials_it_has() -> None:
    """Under an OS limit the largest fit is re-checked; when it fails there, it is the first failure,
    and the search below it starts from the fits it has instead of from --min-batch again."""
    from bsplan.measure.options import ProbeOptions
    from bsplan.measure.probe import BAND_TOLERANCE, _search
    from bsplan.planning.results import DeviceInfo

    outcomes = {100: [True, False]}  # batch 100 fits once, then not
    trials: list[Trial] = []

    def run(batch: int) -> Trial:
        fits = outcomes[batch].pop(0) if batch in outcomes else batch < 100
        trials.append(Trial(batch, fits, 1 if fits else None, 0.1, 1.0 if fits else None))
        return trials[-1]

    device = DeviceInfo("cpu", "cpu", 300 * MIB, "RLIMIT_DATA", exact=False)
    outcome = _search(run, ProbeOptions(search="bisect", min_batch=100, max_batch=200), device, trials)
    tried = [trial.batch for trial in trials]
    assert tried[:3] == [100, 200, 150] and tried.count(100) == 2  # the re-check of 100 failed
    assert outcome.first_fail == 100 and not outcome.capped
    assert outcome.max_fit is None  # nothing below --min-batch 100 to go on with
    outcomes[100] = [True, False]
    trials.clear()
    outcome = _search(run, ProbeOptions(search="bisect", max_batch=4096), device, trials)
    tried = [trial.batch for trial in trials]
    assert outcome.first_fail == 100 and 100 - outcome.max_fit <= BAND_TOLERANCE * 100  # within the band below it
    assert tried.count(1) == 1  # the search below the failed re-check did not start again from 1


def test_under_a_band_a_failed_prediction_steps_back_by_the_band_then_twice_as_far() -> None:
    # The limit says 848 MiB but the peaks meet the edge at 583 MiB (something the peaks do not
    # count): aimed at the limit, the line overshoots. Under a band of 5% the search steps back 5%,
    # then twice as far while that fails, stops predicting, and settles within 5% of a failure.
    memory = lambda batch: 3 * MIB + 2.6 * MIB * batch + 100 * batch * batch  # noqa: E731 - slightly convex, as measured
    edge = 583 * MIB
    band, exact = FakeDevice(memory, edge), FakeDevice(memory, edge)
    outcome = find_max_batch(band, 1, 2**16, 1, 848 * MIB, tolerance=0.05)
    truth_max = truth(memory, edge)
    assert outcome.max_fit is not None and outcome.first_fail is not None
    assert outcome.max_fit <= truth_max < outcome.first_fail and outcome.first_fail - outcome.max_fit <= 0.05 * outcome.first_fail
    predicted, retry, back = band.tried[2:5]
    assert (retry, back) == (predicted - int(0.05 * predicted), retry - 2 * (predicted - retry))
    find_max_batch(exact, 1, 2**16, 1, 848 * MIB)  # an exact search pins the edge to one sample, in more trials
    assert len(band.tried) < len(exact.tried)


def test_under_a_band_a_fit_whose_peak_reaches_the_band_settles_the_search() -> None:
    memory = affine(30 * MIB, 2 * MIB)
    device = FakeDevice(memory, 300 * MIB)
    outcome = find_max_batch(device, 1, 2**16, 1, 300 * MIB, tolerance=0.05)
    assert outcome.first_fail is None and memory(outcome.max_fit) >= 0.95 * 300 * MIB  # no failure needed
    assert len(device.tried) == 3 and outcome.max_fit == truth(memory, 300 * MIB)


def test_a_search_from_a_known_fit_goes_on_as_from_its_own_trials() -> None:
    """The probe's aim (the traced answer) fitted, with the next batch above it, far below the real
    edge (a GPU's trace misses): the search grows from there, and a failed smallest batch ends it."""
    device = FakeDevice(lambda b: 1000 + 10 * b, limit=1000 + 10 * 1000)
    known = [device(300), device(301)]
    outcome = find_max_batch(device, 1, 65536, limit_bytes=1000 + 10 * 1000, known=known)
    assert outcome.max_fit == 1000 and outcome.first_fail == 1001
    assert device.tried == [300, 301, 2408, 1000, 1001]  # the line from the two known fits, then the edge
    small = FakeDevice(lambda b: 1000 + 10 * b, limit=500)
    outcome = find_max_batch(small, 1, 64, limit_bytes=500, known=[small(1)])
    assert (outcome.max_fit, outcome.first_fail, small.tried) == (None, 1, [1])
