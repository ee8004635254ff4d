"""The template process that trial processes are forked from (multiprocessing's forkserver): it
imports measure/rank.py, and torch with it, once, so that a fresh trial process is ready in
milliseconds. A probe that will need trial processes starts it before it imports torch itself, so
that the two imports run side by side. No torch here.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from multiprocessing import forkserver
from multiprocessing.context import BaseContext

from bsplan.backends.host import host_limits, outside_limit
from bsplan.measure.options import ProbeOptions


def context() -> BaseContext:
    """Processes forked from a template that imported measure/rank.py (torch with it), and the main
    module, so that a child does not import it again; spawned where the platform cannot fork."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    forkserving = multiprocessing.get_context("forkserver")
    forkserving.set_forkserver_preload(["__main__", "bsplan.measure.rank"])
    return forkserving


def start_early(options: ProbeOptions) -> None:
    """Start the template now where the probe's trials will run in other processes: the ranks of a
    strategy, or, on the CPU, the fresh trial processes of a limit from outside the process
    (measure/probe.py decides that for certain once the device is open)."""
    # No --device: the CPU unless an NVIDIA device is there (its driver's control file), cheaply.
    on_cpu = options.device.startswith("cpu") if options.device else not Path("/dev/nvidiactl").exists()
    needed = options.strategy != "none" or (on_cpu and outside_limit(host_limits(), options.memory_limit) is not None)
    if needed and context().get_start_method() == "forkserver":
        forkserver.ensure_running()
