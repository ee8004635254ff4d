"""The memory model's arithmetic: fitting the line, CUDA overheads, the largest batch for a budget."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bsplan.planning.memory_line import (
    ALLOCATOR_RESERVE_BYTES, DEFAULT_CUDA_CONTEXT_BYTES, MIB, MemoryLine, Overheads, cuda_overheads, fit_line, fit_top, predict,
    round_recommended,
)


def test_fit_line_is_least_squares_and_needs_two_batches() -> None:
    assert fit_line([(1, 10.0), (3, 30.0), (2, 20.0)]) == MemoryLine(0.0, 10.0)
    assert fit_line([(4, 5.0), (4, 7.0)]) is None
    assert fit_line([]) is None


def test_fit_top_takes_the_regime_of_the_largest_batches() -> None:
    # examples/mlp.py on the CPU: the optimizer step sets the peak at small batches, activations above ~600.
    measured = [(1, 13929732), (256, 14731452), (512, 15536316), (1024, 19665088), (2048, 31273152), (4096, 54489280)]
    assert fit_top(measured) == MemoryLine(8057024.0, 11336.0)
    assert fit_line(measured).per_sample_bytes < 11336  # type: ignore[union-attr]


def test_fit_top_uses_every_point_when_the_largest_are_too_close() -> None:
    # a probe's trials: two small batches, then the bracket at the boundary (1 apart)
    points = [(1, 110.0), (8, 180.0), (113, 1230.0), (114, 1240.0)]
    assert fit_top(points) == fit_line(points)


def test_the_cuda_overheads_follow_pytorch_s_defaults() -> None:
    hopper = cuda_overheads((9, 0), train=True)
    assert hopper.cublas_workspace_bytes == 2 * (32 * MIB + 1 * MIB)  # forward and backward threads
    ampere = cuda_overheads((8, 0), train=False)
    assert ampere.cublas_workspace_bytes == 8 * MIB + 128 * 1024 + 1 * MIB  # ":4096:2:16:8" and cuBLASLt
    assert ampere.cuda_context_bytes == DEFAULT_CUDA_CONTEXT_BYTES and ampere.allocator_reserve_bytes == 22 * MIB
    assert cuda_overheads((9, 0), train=True, workspaces_measured=True).cublas_workspace_bytes == 0
    assert hopper.to_dict()["total_bytes"] == hopper.total_bytes == DEFAULT_CUDA_CONTEXT_BYTES + 66 * MIB + ALLOCATOR_RESERVE_BYTES


def test_a_cpu_budget_is_what_the_probe_counts() -> None:
    # examples/cnn.py: 906192 + 2736136 x b; the CPU probe under 300 MiB finds 114 and recommends 96.
    line = MemoryLine(906192, 2736136)
    result = predict(line, 300 * MIB, Overheads(), headroom=0.1, cap=65536)
    assert (result.max_batch, result.recommended_batch, result.capped) == (114, 96, False)
    assert result.peak_bytes == 906192 + 114 * 2736136 <= 300 * MIB


def test_overheads_come_off_the_device_and_workspaces_count_in_the_peak() -> None:
    line = MemoryLine(1000, 1000)
    overheads = Overheads(cuda_context_bytes=3000, cublas_workspace_bytes=500, allocator_reserve_bytes=500)
    result = predict(line, 20_000, overheads, headroom=0.0, cap=100)
    assert result.max_batch == 15  # 1000 + 15 x 1000 + 500 + 3000 + 500 = 20000
    assert result.peak_bytes == 16_500  # what max_memory_allocated would show: the step plus the workspaces


def test_nothing_fits_and_caps() -> None:
    assert predict(MemoryLine(500, 100), 550, Overheads(), 0.1, 100).max_batch is None
    flat = predict(MemoryLine(500, 0), 550, Overheads(), 0.1, 100)
    assert (flat.max_batch, flat.capped) == (100, True)
    big = predict(MemoryLine(0, 1), 10**9, Overheads(), 0.1, 65536)
    assert (big.max_batch, big.recommended_batch, big.capped) == (65536, 65536, True)


def test_small_recommendations_are_not_rounded_to_8() -> None:
    result = predict(MemoryLine(0, 100), 1000, Overheads(), headroom=0.35, cap=100)
    assert (result.max_batch, result.recommended_batch) == (10, 6)


@given(
    base=st.integers(0, 10**9), per_sample=st.integers(1, 10**8), total=st.integers(1, 10**11),
    headroom=st.floats(0, 0.9), context=st.integers(0, 2 * 10**9),
)
def test_the_largest_batch_fits_and_one_more_does_not(base: int, per_sample: int, total: int, headroom: float, context: int) -> None:
    overheads = Overheads(context, 0, 0)
    result = predict(MemoryLine(base, per_sample), total, overheads, headroom, cap=10**12)
    used = lambda batch: base + per_sample * batch + context  # noqa: E731
    if result.max_batch is None:
        assert used(1) > total
        return
    assert used(result.max_batch) <= total < used(result.max_batch + 1)
    if result.recommended_batch is not None:
        assert result.recommended_batch <= result.max_batch
        assert used(result.recommended_batch) <= (1 - headroom) * total


def test_the_probe_recommends_on_the_line_plan_recomputes_from_its_trials() -> None:
    """probe's recommended_batch and plan's recomputation (SavedProbe.memory) share memory_line.fit_top:
    on a convex shape (the mlp's: flat while the optimizer step sets the peak) a least-squares line
    over every trial would recommend another batch."""
    import math

    from bsplan.measure.probe import recommended_batch
    from bsplan.planning.results import Trial

    peaks = {1: 10_700_000, 8: 10_750_000, 64: 11_000_000, 512: 13_900_000, 4096: 54_500_000, 6000: 76_000_000}
    trials = [Trial(batch, True, peak, 1.0, 1.0) for batch, peak in peaks.items()]
    line = fit_top(list(peaks.items()))
    budget = 0.9 * 300 * 2**20
    assert line is not None
    on_fit_top = round_recommended(math.floor((budget - line.base_bytes) / line.per_sample_bytes))
    least_squares = fit_line(list(peaks.items()))
    assert least_squares is not None
    assert round_recommended(math.floor((budget - least_squares.base_bytes) / least_squares.per_sample_bytes)) != on_fit_top
    assert recommended_batch(trials, 27039, budget) == on_fit_top
