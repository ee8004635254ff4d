"""Checks of option values that several commands share, each refusing a bad value with one sentence
(a choice's value is checked by choices.Choice.parse)."""

from __future__ import annotations

import math

from bsplan.planning.choices import Strategy
from bsplan.planning.errors import BadInput


def at_least(option: str, value: int | None, minimum: int = 1) -> None:
    """A whole number option (None: not given)."""
    if value is not None and value < minimum:
        raise BadInput(f"{option} must be a whole number of at least {minimum}, not {value}")


def positive(option: str, value: float | None) -> None:
    """A real number option that must be finite and above 0 (None: not given)."""
    if value is not None and not 0 < value < math.inf:
        raise BadInput(f"{option} must be a finite number more than 0, not {value}")


def headroom(value: float) -> None:
    if not 0 <= value < 1:
        raise BadInput(f"--headroom must be a fraction from 0 up to (not including) 1, e.g. 0.1, not {value}")


def bucket_view(given: bool, strategy: str, *also: str) -> None:
    """--bucket-view is DDP's; a command that compares strategies may allow it with `also` too."""
    if given and strategy not in (Strategy.ddp, *also):
        extra = f" (or {', '.join(also)})" if also else ""
        raise BadInput(f"--bucket-view is DDP's gradient_as_bucket_view: it goes with --strategy ddp{extra}")
