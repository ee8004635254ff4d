"""CPU memory: an exact, reproducible limit on tensor bytes, and the limits the OS imposes.

An OS limit (prlimit, a cgroup) gives a band, not a number: the allocator, oneDNN's scratch
memory and the thread count move the edge between runs (design.md section 3). So `--memory-limit`
is enforced by counting the bytes of live tensor storages, which is what a CUDA allocator's
counters report, and an OS limit is recognised when it bites but reported as a band.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from bsplan.units import format_bytes


class TensorBytesLimit(TorchDispatchMode):
    """Counts the bytes of live CPU tensor storages, keeps the peak, and raises
    torch.OutOfMemoryError when an allocation takes the count past the limit.

    Each storage is counted once (views share it) and uncounted by a weakref callback when it is
    freed. The allocation has happened when the check runs; raising drops it again, as the
    exception unwinds.
    """

    def __init__(self, limit_bytes: int) -> None:
        super().__init__()
        self.limit_bytes = limit_bytes
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, tuple[weakref.ref[Any], int]] = {}

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """Opt out of torch wrapping __torch_dispatch__ in torch._dynamo.disable (PyTorch's documented
        switch): counting needs no compile guard, and the wrapper adds a call to every operator."""
        return False

    def __enter__(self) -> TensorBytesLimit:
        # FSDP frees and re-allocates its gathered parameters with UntypedStorage.resize_, which
        # no operator reports: count those resizes too, while the limit is active.
        self._resize = resize = torch.UntypedStorage.resize_

        def counted_resize(storage: torch.UntypedStorage, size: int) -> Any:
            result = resize(storage, size)
            if storage.device.type == "cpu":
                self._count(storage)
            return result

        torch.UntypedStorage.resize_ = counted_resize  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                for storage in _storages(tensor):
                    self._count(storage)
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        known = self._live.get(key)
        grown = size - (known[1] if known else 0)
        if grown == 0:
            return
        self._live[key] = (known[0] if known else weakref.ref(storage, lambda _, key=key: self._forget(key)), size)
        self.current_bytes += grown
        if self.current_bytes > self.limit_bytes:
            # Worded as PyTorch's CPU allocator words it, so that code which recognises a real CPU
            # out-of-memory by its message (Lightning's is_oom_error, say) recognises this one too.
            raise torch.OutOfMemoryError(
                f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {grown} bytes "
                f"(bsplan's limit: {format_bytes(self.current_bytes - grown)} of {format_bytes(self.limit_bytes)} already in use)"
            )
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _forget(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current_bytes -= entry[1]


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages that hold a tensor's bytes: a wrapper subclass's (FSDP's DTensor) are its inner
    tensors' (a DTensor's own storage reports the global size, not this rank's shard)."""
    if is_traceable_wrapper_subclass(tensor):
        inner = (getattr(tensor, name) for name in tensor.__tensor_flatten__()[0])
        return [storage for part in inner if isinstance(part, torch.Tensor) for storage in _storages(part)]
    return [tensor.untyped_storage()]

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


@dataclass(frozen=True)
class HostLimit:
    """A limit on this process's memory from outside it, and how much of it is left."""

    source: str
    remaining_bytes: int


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
            remaining = HostLimit(source, max(0, limit - max(0, usage - reclaimable)))
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
