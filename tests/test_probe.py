"""run_probe itself: what the search around the trials does that the CLI cannot show cheaply."""

from __future__ import annotations

import os
import signal
import weakref

import pytest
from conftest import MODELS

from bsplan.measure.options import ProbeOptions
from bsplan.measure.probe import run_probe
from bsplan.planning.results import Trial


class _Referent:
    pass


class InterruptInACallback:
    """Progress that presses Ctrl-C after the second trial, from inside a weakref callback (where
    the counted CPU limit uncounts freed tensors): there Python prints the KeyboardInterrupt and drops it."""

    def __init__(self) -> None:
        self.finished_batches: list[int] = []

    def started(self, batch: int) -> None: ...
    def note(self, text: str) -> None: ...

    def finished(self, trial: Trial) -> None:
        self.finished_batches.append(trial.batch)
        if len(self.finished_batches) == 2:
            referent = _Referent()
            self._ref = weakref.ref(referent, lambda _: os.kill(os.getpid(), signal.SIGINT))
            del referent  # the callback runs here, and the handler inside it


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, as Python reports it
def test_a_ctrl_c_lost_in_a_weakref_callback_still_stops_the_probe_after_its_trial() -> None:
    progress = InterruptInACallback()
    result = run_probe(MODELS / "tiny.py", ProbeOptions(device="cpu", memory_limit=2**30, max_batch=4096, search="bisect"), progress)
    assert result.interrupted and progress.finished_batches == [1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


class Recorded:
    """Progress that keeps what it is told."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.notes: list[str] = []

    def started(self, batch: int) -> None:
        self.batches.append(batch)

    def finished(self, trial: Trial) -> None: ...

    def note(self, text: str) -> None:
        self.notes.append(text)


def test_the_trace_aims_the_probe_so_an_exact_limit_settles_in_three_real_trials() -> None:
    """The traced answer fits, the batch above it does not, and half of it draws the memory line; the
    answer is the one the search finds from scratch."""
    options = ProbeOptions(device="cpu", memory_limit=64 * 2**20)
    progress = Recorded()
    aimed = run_probe(MODELS / "tiny.py", options, progress)
    answer = aimed.max_batch
    assert answer is not None and [(t.batch, t.fits) for t in aimed.trials] == [
        (answer, True), (answer + 1, False), (-(-answer // 2), True)]
    assert any(f"batch {answer} predicted" in note for note in progress.notes) and progress.batches == [t.batch for t in aimed.trials]
    assert aimed.recommended_batch is not None
    scratch = run_probe(MODELS / "tiny.py", ProbeOptions(device="cpu", memory_limit=64 * 2**20, search="bisect"), Recorded())
    assert scratch.max_batch == answer and len(scratch.trials) > 3


def test_a_step_that_cannot_be_traced_is_searched_from_scratch_saying_why() -> None:
    progress = Recorded()
    result = run_probe(MODELS / "data_dependent.py", ProbeOptions(device="cpu", memory_limit=64 * 2**20), progress)
    assert result.max_batch is not None and result.trials[0].batch == 1
    assert any("could not be traced" in note for note in progress.notes)
