"""A sweep over sequence lengths: the same probe or estimate at each length, in the order given."""

from __future__ import annotations

from typing import Callable, Protocol

from bsplan.measure.workload import load_workload
from bsplan.models.source import ModelSource
from bsplan.planning.results import EstimateResult, ProbeResult, SweepResult, SweepRow


class Notes(Protocol):
    def note(self, text: str) -> None: ...


def sweep(command: str, measure: Callable[[ModelSource], ProbeResult | EstimateResult], source: ModelSource,
          lengths: tuple[int, ...], progress: Notes) -> SweepResult:
    """Measure each length. The lengths are checked before the first is measured (a length the model
    cannot take is refused at once, not after the others ran): the longest is the one a config's
    positions can refuse, and a model file's make_batch takes any or none; Ctrl-C ends the sweep,
    keeping the lengths measured until then."""
    load_workload(source.at(max(lengths)))
    rows: list[SweepRow] = []
    for number, length in enumerate(lengths, 1):
        progress.note(f"seq_len {length} ({number} of {len(lengths)})")
        try:
            result = measure(source.at(length))
        except KeyboardInterrupt:
            return SweepResult(command, tuple(rows), interrupted=True)
        if getattr(result, "interrupted", False):  # a probe keeps what it measured at this length
            return SweepResult(command, (*rows, SweepRow(length, result)), interrupted=True)
        rows.append(SweepRow(length, result))
    return SweepResult(command, tuple(rows))
