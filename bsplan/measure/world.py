"""Trials in other processes: N local ranks, one device each, the model wrapped in DDP or FSDP2, the
same trials and search as one process, measured per device (the ranks restart after each failed
trial). With no strategy, one such process serves a probe under a limit from outside the process
(an address-space rlimit, a cgroup's limit; probe.why_restart), and every trial runs in a fresh
one: a process that ran other trials holds address space a plain training process does not (a
failed trial's, the heap's fragments), and the limit counts it. A process the kernel's
out-of-memory killer ended fails its trial like an out-of-memory error. The processes are forked
from a template that imported torch once (measure/rank.py), so a fresh one costs milliseconds.

The parent process runs the search and is the only one that decides whether a trial fits: every
rank runs the trial and reports to it over a pipe, and the batch fits only if it fitted on every
rank. The agreement is not a collective between the ranks on purpose: a rank that runs out of
memory mid-step leaves its peers inside DDP's or FSDP's own collectives, where a further
collective would hang. So the first out-of-memory a rank reports ends the trial: the parent stops
every rank and starts a fresh world for the next trial (a fresh process is also what the
exactness checks compare against). A rank that does not answer within --timeout ends the probe
with a clear error instead of hanging.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import Any

from bsplan.backends import cuda
from bsplan.backends.host import oom_kills
from bsplan.measure import template
from bsplan.measure.options import ProbeOptions
from bsplan.measure.rank import rank_main
from bsplan.measure.sources import Static, latest_static
from bsplan.models.source import SourceLike
from bsplan.planning.errors import BadInput, BsplanError, NoFit, UserCodeError
from bsplan.planning.results import DeviceInfo, Trial


class World:
    """The ranks of a strategy probe, or the one restarted trial process of a probe without one,
    driven by the parent; a TrialSource (measure/sources.py) for run_probe."""

    def __init__(self, model_source: SourceLike, options: ProbeOptions, why_restart: str | None = None) -> None:
        device = options.device or ("cuda" if cuda.available() else "cpu")
        if device.startswith("cuda") and options.nproc > cuda.device_count():
            raise BadInput(f"--nproc {options.nproc} needs as many CUDA devices; this machine has {cuda.device_count()}")
        self.model_source, self.options = model_source, replace(options, device="cuda" if device.startswith("cuda") else "cpu")
        self.trials: list[Trial] = []
        self.notes: list[str] = []
        self._ranks: list[tuple[Any, Connection]] = []
        self._static: Static | None = None
        self._why_restart = why_restart  # why a probe without a strategy runs in a child process
        self._trial_began: tuple[float, int | None] = (0.0, None)  # when the trial began, and oom_kills() then
        self.device: DeviceInfo

    def __enter__(self) -> World:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def static(self) -> Static:
        assert self._static is not None
        return self._static

    def __call__(self, batch: int) -> Trial:
        """One trial on every rank; fits only where it fitted on all of them."""
        if not self._ranks:
            self._start()
        self._trial_began = (time.monotonic(), oom_kills())
        for _, connection in self._ranks:
            connection.send((batch, [trial.batch for trial in self.trials if trial.fits]))  # evidence for its OOMs
        replies: dict[int, tuple[Trial, Static]] = {}
        while len(replies) < len(self._ranks):
            rank, reply = self._next_reply(f"batch {batch}", batch)
            trial, static = reply
            if not trial.fits:  # one rank out of memory: the trial failed everywhere
                self._stop()
                failed = Trial(batch, False, None, trial.seconds, None, error=f"{self._where(rank)}{trial.error}",
                               oom_evidence=trial.oom_evidence)
                self.trials.append(failed)
                return failed
            replies[rank] = (trial, static)
        if self._why_restart:  # the next trial in a fresh process too
            self._stop()
        self._static = latest_static(self._static, replies[0][1])
        per_rank = [trial for trial, _ in replies.values()]
        combined = Trial(
            batch, True, max(t.peak_bytes or 0 for t in per_rank), max(t.seconds for t in per_rank),
            min(t.samples_per_second or 0.0 for t in per_rank),
            forward_peak_bytes=max(t.forward_peak_bytes or 0 for t in per_rank),
            step_peak_bytes=max(t.step_peak_bytes or 0 for t in per_rank),
        )
        self.trials.append(combined)
        return combined

    def _start(self) -> None:
        """Start every rank and wait until each has built and wrapped its model."""
        context = template.context()
        port = _free_port()
        place = (dict(os.environ), os.getcwd())  # the template's are those of when it started
        for rank in range(self.options.nproc):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=rank_main, args=(rank, port, self.model_source, self.options, theirs, place), daemon=True,
                name=f"bsplan-rank-{rank}",
            )
            process.start()
            theirs.close()
            self._ranks.append((process, ours))
        ready = {}
        while len(ready) < len(self._ranks):
            rank, reply = self._next_reply("starting")
            ready[rank] = reply
        device, notes, static = ready[0]
        if self._static is None:  # the first world's limit is the one the search aims at and the result reports
            self.device, self.notes = device, notes
            if self._why_restart:
                self.notes = [*notes, f"{self._why_restart}: each trial ran in a fresh process, as a plain training "
                                      f"process starts, for {self.options.steps} steps"]
        self._static = latest_static(self._static, static)

    def _next_reply(self, doing: str, batch: int | None = None) -> tuple[int, Any]:
        """The next message from any rank; a rank's error, death or silence ends the probe, but for
        a death in the trial of `batch` at the hands of the kernel's out-of-memory killer, which is
        that trial's failure."""
        connections = {connection: rank for rank, (_, connection) in enumerate(self._ranks)}
        # One plain process has no collective to hang in: it may take as long as its trial takes.
        ready = wait(list(connections), timeout=None if self.options.strategy == "none" else self.options.timeout)
        if not ready:
            self._stop()
            raise BsplanError(
                f"no rank answered within {self.options.timeout:.0f} s ({doing}): a rank may hang in a collective; "
                "raise --timeout for a slow model"
            )
        connection = ready[0]
        rank = connections[connection]  # type: ignore[index]
        try:
            kind, payload = connection.recv()  # type: ignore[union-attr]
        except EOFError:
            process = self._ranks[rank][0]
            process.join(timeout=5)
            killed = self._killed_for_memory(batch)
            self._stop()
            if killed is not None:
                return killed
            who = "the trial process" if self.options.strategy == "none" else f"rank {rank}'s process"
            raise BsplanError(f"{who} ended with exit code {process.exitcode} ({doing})") from None
        if kind == "error":
            killed = self._killed_for_memory(batch)  # a rank killed mid-collective fails its peers' step too
            self._stop()
            if killed is not None:
                return killed
            error_kind, message, traceback_text = payload
            message = f"{self._where(rank)}{message}"
            if traceback_text:
                raise UserCodeError(message, traceback_text)
            raise {"BadInput": BadInput, "NoFit": NoFit}.get(error_kind, BsplanError)(message)
        return rank, payload

    def _killed_for_memory(self, batch: int | None) -> tuple[int, tuple[Trial, None]] | None:
        """The rank that the kernel's out-of-memory killer ended during the trial of `batch`, with
        that trial's failure: a rank that died of SIGKILL while its cgroup's oom_kill count rose.
        None where no trial runs, no rank died so, or the count cannot be read."""
        began, kills = self._trial_began
        if batch is None or kills is None or (oom_kills() or 0) <= kills:
            return None
        # A killed rank is gone before its peers' collectives fail: a second is plenty to see it end.
        deadline = time.monotonic() + 1.0
        running: dict[Any, tuple[int, Any]] = {process.sentinel: (rank, process) for rank, (process, _) in enumerate(self._ranks)}
        while running and (ended := wait(list(running), timeout=max(0.0, deadline - time.monotonic()))):
            for sentinel in ended:
                rank, process = running.pop(sentinel)
                process.join()
                if process.exitcode == -signal.SIGKILL:
                    return rank, (Trial(batch, False, None, time.monotonic() - began, None,
                                        error="killed by the kernel's out-of-memory killer (SIGKILL)",
                                        oom_evidence="the process died of SIGKILL while its cgroup's oom_kill count rose"), None)
        return None

    def _where(self, rank: int) -> str:
        """Which rank a message came from; nothing for the one process of a probe without a strategy."""
        return "" if self.options.strategy == "none" else f"rank {rank}: "

    def _stop(self) -> None:
        for process, connection in self._ranks:
            connection.close()
            process.terminate()
        for process, _ in self._ranks:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        self._ranks = []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
