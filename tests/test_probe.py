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
