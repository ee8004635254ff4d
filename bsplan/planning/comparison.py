"""`plan --strategy auto`: every data-parallel strategy's per-device limit at the plan's world size,
and the simplest of those that need the fewest accumulation steps."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from bsplan.planning.decomposition import micro_batches
from bsplan.planning.errors import BadInput
from bsplan.planning.limit import NothingFits, saved_probe, strategy_limit
from bsplan.planning.plan import Limit, PlanOptions, StrategyOption
from bsplan.planning.choices import Strategy
from bsplan.planning.strategies import BY_SIMPLICITY


def choose_strategy(options: PlanOptions, cwd: Path) -> tuple[Limit, list[str], tuple[StrategyOption, ...]]:
    """`--strategy auto`: each strategy's limit at this world size and its split with the fewest
    accumulation steps; the recommendation is the simplest (BY_SIMPLICITY) of those needing the fewest."""
    probe = saved_probe(options, cwd)
    if probe is None:
        raise BadInput("--strategy auto compares strategies from a probe's memory breakdown: run `bsplan probe MODEL.py` "
                       "here first, or pass --from FILE (a saved probe or estimate)")
    per_device, remainder = divmod(options.global_batch, options.world_size)
    limits: dict[str, tuple[Limit, list[str]]] = {}
    rows = []
    for strategy in BY_SIMPLICITY:
        try:
            limits[strategy] = strategy_limit(probe, options, strategy)
        except NothingFits:
            rows.append(StrategyOption(strategy, None, None, None))
            continue
        most = limits[strategy][0].micro_batch
        rows.append(StrategyOption(strategy, most, None, None) if remainder else fewest_steps(strategy, most, per_device,
                                                                                               options.multiple_of))
    if not limits:
        raise BadInput(f"by {probe.describe()}, not even batch 1 fits on one device under any strategy at {options.world_size} devices")
    best = simplest_of_fewest(rows)
    fewest = None if best is None else best.accumulation_steps
    # With no exact split anywhere, the roomiest strategy's decomposition explains why, naming the nearest targets.
    chosen = best.strategy if best is not None else max(limits, key=lambda name: limits[name][0].micro_batch or 0)
    limit, notes = limits[chosen]
    notes = [f"--strategy auto recommends {chosen}: the simplest of the strategies that need the fewest accumulation "
             f"steps ({fewest}); simplest first: {', '.join(BY_SIMPLICITY)}", *notes]
    return limit, notes, tuple(rows)


def fewest_steps(strategy: Strategy, most: int | None, per_device: int, multiple_of: int) -> StrategyOption:
    """A strategy's split of a device's share with the fewest accumulation steps within its limit `most`
    (None: no limit); no micro-batch and steps where none divides the share exactly."""
    micros = micro_batches(per_device, most, multiple_of)
    return StrategyOption(strategy, most, *((micros[0], per_device // micros[0]) if micros else (None, None)))


def simplest_of_fewest(rows: Sequence[StrategyOption]) -> StrategyOption | None:
    """Of the rows that split (in BY_SIMPLICITY order), the first of those needing the fewest accumulation
    steps: the recommendation of `--strategy auto`; None where none splits."""
    return min((row for row in rows if row.accumulation_steps is not None), key=lambda row: row.accumulation_steps or 0,
               default=None)
