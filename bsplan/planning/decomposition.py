"""A global batch as micro-batch x accumulation steps x devices: every exact split, and the choice
among them (the fewest accumulation steps, or the fastest step a probe's timings predict).

global batch = micro-batch per device x accumulation steps x devices (docs/plan.md).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import Sequence

from bsplan.planning.errors import BadInput
from bsplan.planning.plan import Split
from bsplan.planning.results import SAME_THROUGHPUT

MAX_ALTERNATIVES = 4


@dataclass(frozen=True)
class Decomposition:
    choice: Split
    alternatives: tuple[Split, ...]  # the runners-up, best first
    chosen_by: str


def micro_batches(per_device: int, limit: int | None, multiple_of: int = 1) -> list[int]:
    """Every micro-batch that divides the per-device share exactly, largest first. With no limit
    there is no reason to accumulate, so the only one is the whole share."""
    if limit is None:
        return [per_device] if per_device % multiple_of == 0 else []
    divisors = set()
    for small in range(1, math.isqrt(per_device) + 1):
        if per_device % small == 0:
            divisors.update((small, per_device // small))
    return sorted((d for d in divisors if d <= limit and d % multiple_of == 0), reverse=True)


def decompose(
    global_batch: int,
    world_size: int,
    limit: int | None,
    multiple_of: int = 1,
    throughput: Sequence[tuple[int, float]] = (),
    min_micro: int = 1,
) -> Decomposition:
    """Choose among every exact (micro, accumulation): the fewest accumulation steps, or, with a
    probe's (batch, samples per second), the fastest predicted optimizer step. Timings choose only
    among micro-batches of at least min_micro when one exists (BatchNorm's statistics need them:
    a faster step that trains worse is no gain)."""
    if limit is not None and limit < multiple_of:
        raise BadInput(f"--multiple-of {multiple_of} is above the per-device limit of {limit}, so no micro-batch fits")
    per_device, remainder = divmod(global_batch, world_size)
    micros = [] if remainder else micro_batches(per_device, limit, multiple_of)
    if not micros:
        raise BadInput(_no_split(global_batch, world_size, limit, multiple_of))
    points = _seconds_per_sample_points(throughput)
    splits = [_timed_split(micro, per_device // micro, points) for micro in micros]
    if limit is None:
        return Decomposition(splits[0], (), "no per-device limit: accumulation 1")
    seconds = {split.micro_batch: split.seconds_per_step for split in splits if split.seconds_per_step is not None}
    if not seconds:
        return Decomposition(splits[0], tuple(splits[1 : MAX_ALTERNATIVES + 1]), "fewest accumulation steps")
    allowed = {micro: time for micro, time in seconds.items() if micro >= min_micro} or seconds
    fastest = min(allowed.values())
    choice = next(split for split in splits if allowed.get(split.micro_batch, math.inf) <= fastest * SAME_THROUGHPUT)
    rest = sorted(  # timed ones fastest first, then the untimed (below the probed batches) by accumulation
        (s for s in splits if s is not choice), key=lambda s: (seconds.get(s.micro_batch, math.inf), s.accumulation_steps)
    )
    why = "fastest predicted optimizer step (probe timings)"
    if len(allowed) < len(seconds):
        why = f"fastest predicted optimizer step at micro-batch {min_micro} or more (probe timings; BatchNorm)"
    return Decomposition(choice, tuple(rest[:MAX_ALTERNATIVES]), why)


def nearest_achievable(global_batch: int, world_size: int, multiple_of: int = 1) -> tuple[int | None, int]:
    """The global batches nearest below (None if none) and above that split exactly. With a limit of
    at least multiple_of they are the multiples of devices x multiple_of: micro multiple_of always fits."""
    step = world_size * multiple_of
    below = global_batch // step * step
    return (below or None), below + step


def _no_split(global_batch: int, world_size: int, limit: int | None, multiple_of: int) -> str:
    """One sentence: why the target does not split, and the nearest global batches that do."""
    if global_batch % world_size:
        why = f"{global_batch} is not a multiple of the {world_size} devices"
    else:
        why = f"its {global_batch // world_size} per device is not a multiple of --multiple-of {multiple_of}"
    nearest = [
        f"{g} (micro-batch {micro} x {accumulation} accumulation step{'s' if accumulation > 1 else ''})"
        for g in nearest_achievable(global_batch, world_size, multiple_of) if g is not None
        for micro, accumulation in [_best(g // world_size, limit, multiple_of)]
    ]
    named = f"batch is {nearest[0]}" if len(nearest) == 1 else f"batches are {nearest[0]} and {nearest[1]}"
    return f"cannot split global batch {global_batch} exactly: {why}; the nearest achievable global {named}"


def _best(per_device: int, limit: int | None, multiple_of: int) -> tuple[int, int]:
    micro = micro_batches(per_device, limit, multiple_of)[0]
    return micro, per_device // micro


def _seconds_per_sample_points(throughput: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """(batch, seconds per sample), one per batch (repeated trials averaged), sorted by batch."""
    by_batch: dict[int, list[float]] = {}
    for batch, samples_per_second in throughput:
        by_batch.setdefault(batch, []).append(1 / samples_per_second)
    return [(batch, sum(times) / len(times)) for batch, times in sorted(by_batch.items())]


def _timed_split(micro: int, accumulation: int, points: list[tuple[int, float]]) -> Split:
    """Predicted time per optimizer step = accumulation x micro x seconds per sample at that micro:
    linear between measured batches, flat past the largest (larger batches rarely run slower per
    sample, so the tie rule decides there), and none below the smallest, where flat would flatter."""
    if not points or micro < points[0][0]:
        return Split(micro, accumulation)
    index = bisect_left(points, micro, key=lambda point: point[0])
    if index < len(points) and points[index][0] == micro:
        per_sample, timing = points[index][1], "measured"
    elif index == len(points):
        per_sample, timing = points[-1][1], "extrapolated"
    else:
        (b0, t0), (b1, t1) = points[index - 1], points[index]
        per_sample, timing = t0 + (t1 - t0) * (micro - b0) / (b1 - b0), "interpolated"
    return Split(micro, accumulation, accumulation * micro * per_sample, timing)
