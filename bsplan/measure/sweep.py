"""A sweep over sequence lengths: the same probe or estimate at each length, in the order given. No
torch here: the command passes the function that measures one length."""

from __future__ import annotations

from typing import Callable, Protocol

from bsplan.models.source import ModelSource
from bsplan.planning.results import EstimateResult, ProbeResult, SweepResult, SweepRow


class Notes(Protocol):
    def note(self, text: str) -> None: ...


def sweep(command: str, measure: Callable[[ModelSource], ProbeResult | EstimateResult], source: ModelSource,
          lengths: tuple[int, ...], progress: Notes) -> SweepResult:
    """Measure each length; an interrupted probe (Ctrl-C) ends the sweep there, keeping what was measured."""
    rows: list[SweepRow] = []
    for number, length in enumerate(lengths, 1):
        progress.note(f"seq_len {length} ({number} of {len(lengths)})")
        result = measure(source.at(length))
        rows.append(SweepRow(length, result))
        if getattr(result, "interrupted", False):
            return SweepResult(command, tuple(rows), interrupted=True)
    return SweepResult(command, tuple(rows))
