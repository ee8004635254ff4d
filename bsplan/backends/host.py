"""Limits on this process's memory from outside it: MemAvailable, rlimits, cgroups (v1 and v2), and
the kernel's out-of-memory kills. Plain file reading, no torch.

An OS limit gives a band, not a number: the allocator, oneDNN's scratch memory and the thread
count move the edge between runs (docs/probe.md). So it is recognised when it bites and reported
as a band, while `--memory-limit` counts tensor bytes exactly (backends/cpu.py).
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

# Limits from outside the process that count its address space, and cgroups' limits (see _cgroup_remaining).
ADDRESS_SPACE_LIMITS = ("RLIMIT_DATA", "RLIMIT_AS")
CGROUP_LIMITS = ("cgroup memory.max", "cgroup memory limit")

# (limit file, usage file, the memory.stat key of file pages the kernel drops before it kills, name)
_CGROUP_FILES = {
    "v2": ("memory.max", "memory.current", "inactive_file", CGROUP_LIMITS[0]),
    "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file", CGROUP_LIMITS[1]),
}
# where each version counts the processes its out-of-memory killer ended (the cgroup's own and its descendants')
_CGROUP_OOM_KILLS = {"v2": "memory.events", "v1": "memory.oom_control"}
# What an rlimit counts, as a field of /proc/self/statm (in pages): the whole address space (size), or
# the private writable mappings RLIMIT_DATA counts (data; it adds the main thread's few pages of stack).
_STATM_FIELD = {"RLIMIT_AS": 0, "RLIMIT_DATA": 5}


@dataclass(frozen=True)
class HostLimit:
    """A limit on this process's memory from outside it, and how much of it is left."""

    source: str
    remaining_bytes: int
    usage_file: Path | None = None  # a cgroup's usage (what its limit counts); rlimits: /proc/self/statm


class UsageMeter:
    """What a limit from outside the process counts, in bytes since the meter was made: the data or
    the whole address space of this process for an rlimit, the cgroup's charge for a cgroup. Cheap
    enough to read after every operator of a trial (one pread of a file kept open): the peak of a
    step in what the limit counts, where counted tensor bytes leave out the allocator's slack, the
    threads' arenas and oneDNN's scratch memory (docs/probe.md)."""

    def __init__(self, limit: HostLimit) -> None:
        if limit.usage_file is None:
            path, self._field, self._scale = Path("/proc/self/statm"), _STATM_FIELD[limit.source], resource.getpagesize()
        else:
            path, self._field, self._scale = limit.usage_file, 0, 1
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        self.base = 0
        self.base = self()
        self._address_space = limit.source == "RLIMIT_AS"
        self._highest = 0
        self._sampler: threading.Thread | None = None
        # The kernel keeps the highest address space a process has had (VmPeak): what RLIMIT_AS
        # counts, at every allocation. A forked process starts with it at its VmSize.
        self._size, self._vm_peak = _vm_size_and_peak()

    def __call__(self) -> int:
        return int(os.pread(self._fd, 256, 0).split()[self._field]) * self._scale - self.base

    def peak(self) -> int:
        """The most the limit has counted since the meter was made, or since its sampling began:
        for RLIMIT_AS every allocation (the kernel's VmPeak, once it passes where it stood when the
        meter was made); for the rest, which the kernel keeps no peak of, the most the sampler saw."""
        value = self()  # read first: the sampler may raise the highest while this read waits
        self._highest = max(self._highest, value)
        if self._address_space:
            _, vm_peak = _vm_size_and_peak()
            if vm_peak > self._vm_peak:
                self._highest = max(self._highest, vm_peak - self._size)
        return self._highest

    def sample(self) -> None:
        """Read the meter every SAMPLE_SECONDS in a thread, for peak(): where nothing counts tensors, a
        step's peak between its ends. The thread's stack is small, so that it holds next to nothing
        of what the limit counts (a thread's default stack is 8 MiB of data)."""
        if self._sampler is not None or self._address_space:
            return
        previous = threading.stack_size(SAMPLER_STACK_BYTES)
        try:
            self._sampler = threading.Thread(target=self._sample, name="bsplan-meter", daemon=True)
            self._sampler.start()
        finally:
            threading.stack_size(previous)

    def _sample(self) -> None:
        while True:
            try:
                value = self()
            except OSError:  # the file closed as the interpreter exits
                return
            if value > self._highest:
                self._highest = value
            time.sleep(SAMPLE_SECONDS)


# The sampler's period: most tensor operators of a step that grow the heap take longer than this.
SAMPLE_SECONDS = 0.0005
SAMPLER_STACK_BYTES = 256 * 1024


def _vm_size_and_peak() -> tuple[int, int]:
    """This process's address space now and at its highest (VmSize, VmPeak), in bytes."""
    status = _read_counters(Path("/proc/self/status"))
    return status.get("VmSize", 0), status.get("VmPeak", 0)


def host_limits() -> list[HostLimit]:
    """What the OS lets this process still allocate: memory available, cgroup and rlimits."""
    limits = []
    meminfo = _read_counters(Path("/proc/meminfo"))
    if "MemAvailable" in meminfo:
        limits.append(HostLimit("MemAvailable", meminfo["MemAvailable"]))
    status = _read_counters(Path("/proc/self/status"))
    for name, used_field in zip(ADDRESS_SPACE_LIMITS, ("VmData", "VmSize")):
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft != resource.RLIM_INFINITY:
            limits.append(HostLimit(name, max(0, soft - status.get(used_field, 0))))
    cgroup = _cgroup_remaining()
    if cgroup is not None:
        limits.append(cgroup)
    return limits


def outside_limit(limits: list[HostLimit], memory_limit: int | None) -> HostLimit | None:
    """The limit from outside the process that sets a probe's edge, if one does: the tightest of
    `limits`, where it bites before the --memory-limit and is not the memory available (MemAvailable
    is no edge to aim at: backends/cpu.py keeps a reserve below it)."""
    tightest = min(limits, key=lambda limit: limit.remaining_bytes, default=None)
    if tightest is None or tightest.source == "MemAvailable":
        return None
    return tightest if memory_limit is None or tightest.remaining_bytes <= memory_limit else None


def trim_heap() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so that the next trial under an
    OS limit starts where the last one did."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def return_freed_memory() -> None:
    """Collect garbage (cycles through an exception's frames hold tensors), then trim the heap."""
    gc.collect()
    trim_heap()


def _cgroup_remaining(membership: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")) -> HostLimit | None:
    """The least memory left under this process's cgroup or any of its ancestors: a container's
    limit sits at the root of its namespace, but a Slurm job's or a systemd unit's on an ancestor
    of the process's own cgroup. Usage less the inactive file pages is what the kernel weighs
    before it kills (the working set, as the kubelet counts it)."""
    tightest: HostLimit | None = None
    for version, base, path in _cgroup_paths(membership, mount):
        limit_file, usage_file, reclaimable_key, source = _CGROUP_FILES[version]
        for directory in [base / path, *(base / parent for parent in path.parents)]:
            try:
                text = (directory / limit_file).read_text().strip()
                limit = 1 << 60 if text == "max" else int(text)
                usage = int((directory / usage_file).read_text().strip())
            except (OSError, ValueError):
                continue
            if limit >= 1 << 60:  # "max", or v1's page-rounded largest number: no limit
                continue
            reclaimable = _read_counters(directory / "memory.stat").get(reclaimable_key, 0)
            remaining = HostLimit(source, max(0, limit - max(0, usage - reclaimable)), directory / usage_file)
            if tightest is None or remaining.remaining_bytes < tightest.remaining_bytes:
                tightest = remaining
    return tightest


def _cgroup_paths(membership: Path, mount: Path) -> list[tuple[str, Path, Path]]:
    """(version, mount of the memory controller, the process's cgroup relative to it) from
    /proc/self/cgroup: the unified hierarchy's line is "0::/path", cgroup v1's memory controller's
    "N:memory:/path"."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        # A cgroup outside this namespace's root reads "/../x": only the root of the mount is ours.
        relative = Path() if ".." in Path(path).parts else Path(path.lstrip("/"))
        if controllers == "" and path:
            found.append(("v2", mount, relative))
        elif "memory" in controllers.split(","):
            found.append(("v1", mount / "memory", relative))
    return found or [("v2", mount, Path()), ("v1", mount / "memory", Path())]


def oom_kills(
    membership: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup"), vmstat: Path = Path("/proc/vmstat")
) -> int | None:
    """How many processes of this process's cgroup (and below it) the kernel's out-of-memory killer
    has ended: a child that died of SIGKILL while this rose was killed for memory. The cgroup's own
    count, not the host's, so another job's kill on a shared node does not count; the host's
    (/proc/vmstat) only where no cgroup's can be read. None where neither can."""
    for version, base, path in _cgroup_paths(membership, mount):
        for directory in (base / path, base):  # base: a container whose path from outside is not mounted
            count = _read_counters(directory / _CGROUP_OOM_KILLS[version]).get("oom_kill")
            if count is not None:
                return count
    return _read_counters(vmstat).get("oom_kill")


def _read_counters(path: Path) -> dict[str, int]:
    """A file of "name value" lines as numbers: a cgroup's memory.stat and /proc/vmstat ("oom_kill 3"),
    /proc/meminfo and /proc/self/status ("VmData:   1024 kB", in bytes). Other lines are passed over."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    counters = {}
    for parts in (line.split() for line in lines):
        if len(parts) in (2, 3) and parts[1].isdigit() and parts[2:] in ([], ["kB"]):
            counters[parts[0].removesuffix(":")] = int(parts[1]) * (1024 if parts[2:] else 1)
    return counters
